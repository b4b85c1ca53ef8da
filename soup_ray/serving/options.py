"""What the Serve application takes: its arguments (``serve/config.yaml``'s ``args``) and a model replica's ``user_config``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_DECODED_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_BATCH_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_BATCH_IMAGES = 64
CPU_BATCH, GPU_BATCH = 16, 128
SOUP_MODEL = "soup"
APP_NAME = "soup-ray"


class ServeOptions(BaseModel):
    """Arguments of the Serve application (the ``args`` of ``serve/config.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="The run folder (absolute, or relative to the current folder / repository root)")
    model: str = Field(SOUP_MODEL, description="'soup', a trial id from results.jsonl, or a checkpoint folder")
    soup_version: int | None = Field(
        None, ge=1, description="Pin RUN_DIR/soup_versions/vNNNN instead of following RUN_DIR/soup"
    )
    method: str | None = Field(
        None,
        description="Serve the recipe RUN_DIR/soups/NAME (written by `soup-ray soup "
        "RUN_DIR --method NAME` or at the end of `soup-ray run`) instead of "
        "the live greedy soup in RUN_DIR/soup",
    )
    follow: bool = Field(True, description="Reload the soup when a new version is published to RUN_DIR/soup")
    poll_interval_s: float = Field(2.0, gt=0, description="How often the model replica checks RUN_DIR/soup/soup.json")
    ensemble: int | list[str] = Field(
        3, description="Ensemble members: the top-K trials by held-out accuracy, or trial ids; 0 disables"
    )
    num_cpus: float = Field(0.25, ge=0, description="CPUs per model replica (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (fractions allowed)")
    ingress_cpus: float = Field(0.1, ge=0, description="CPUs of each HTTP ingress replica and of the ensemble replica")
    ingress_replicas: int | None = Field(
        None,
        ge=1,
        description="HTTP ingress replicas (each decodes images in its own thread pool, so decoding "
        "scales with them); null: one per 4 CPUs of the cluster, at least 1 and at most 8",
    )
    ingress_autoscaling: dict | None = Field(
        None,
        description="A Serve autoscaling_config for the ingress (min_replicas, max_replicas, "
        "target_ongoing_requests, ...) instead of a fixed ingress_replicas",
    )
    decode_threads: int = Field(
        2, ge=1, description="Threads per ingress replica that decode images (never the event loop)"
    )
    model_replicas: int = Field(1, ge=1, description="Replicas of the served model (each with num_cpus/num_gpus)")
    topology: Literal["fused", "split"] = Field(
        "fused",
        description="fused: each HTTP replica holds the served model too (decode, batching and the "
        "forward pass in one process: one Serve hop; model_replicas of them); split: HTTP ingress replicas "
        "(ingress_replicas) decode and send uint8 images to separate model replicas (model_replicas), so "
        "decoding scales apart from the model",
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        description=f"Dynamic batching: most images per forward pass; null: {CPU_BATCH} on CPU, "
        f"{GPU_BATCH} with num_gpus > 0",
    )
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="Dynamic batching: longest wait for a batch to fill")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1, description="Largest accepted request body")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Largest accepted image (width x height)")
    max_decoded_bytes: int = Field(
        DEFAULT_MAX_DECODED_BYTES,
        ge=1,
        description="Largest accepted decoded image: width x height x bytes per "
        "pixel as the header declares it (a 16-bit RGBA pixel is 8 bytes), checked before anything is decoded",
    )
    body_timeout_s: float = Field(30.0, gt=0, description="Longest time to receive a request body (then 408)")
    model_timeout_s: float = Field(30.0, gt=0, description="Longest wait for a model replica's answer (then 504)")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests a model replica works on at once (default: max(32, 2 x max_batch_size))"
    )
    max_batch_images: int = Field(
        DEFAULT_BATCH_IMAGES, ge=1, description="Most images in one POST /predict/batch request"
    )
    max_batch_body_bytes: int = Field(
        DEFAULT_MAX_BATCH_BODY_BYTES,
        ge=1,
        description="Largest POST /predict/batch body (every image within max_body_bytes too)",
    )
    max_queued_requests: int = Field(
        64,
        ge=1,
        description="Requests waiting for a busy model replica; beyond that the answer is 503 with "
        "Retry-After, never an unbounded wait",
    )
    ingress_max_ongoing_requests: int = Field(256, ge=1, description="Requests the HTTP ingress handles at once")
    ingress_max_queued_requests: int = Field(
        256,
        ge=1,
        description="Requests waiting for the ingress; beyond that Serve's proxy answers 503 with Retry-After",
    )
    retry_after_s: float = Field(1.0, ge=0, description="The Retry-After (seconds) sent with 503 answers")
    health_check_period_s: float = Field(
        2.0,
        gt=0,
        description="How often Serve checks each model replica; a dead one is replaced after a "
        "failed check, so this bounds how long requests wait for its successor",
    )
    auth_token_file: str | None = Field(
        None,
        description="A file holding a bearer token: every endpoint but /healthz then wants "
        "`Authorization: Bearer TOKEN` (401 otherwise). Read on the ingress replica's node",
    )

    def batch_size(self) -> int:
        """The dynamic batch size: the configured one, or one sized for the model's device."""
        return self.max_batch_size or (GPU_BATCH if self.num_gpus > 0 else CPU_BATCH)

    def model_max_ongoing(self) -> int:
        """``max_ongoing_requests`` of each model replica."""
        return self.max_ongoing_requests or max(32, 2 * self.batch_size())

    def ingress_count(self, cluster_cpus: float) -> int:
        """Fixed ingress replicas: the configured number, or one per 4 CPUs of the cluster (1 to 8)."""
        return self.ingress_replicas or max(1, min(8, int(cluster_cpus // 4)))

    @field_validator("method")
    @classmethod
    def _check_method(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError(f"method {v!r} is not a recipe name (e.g. greedy, uniform, model_stock)")
        return v

    @field_validator("ensemble")
    @classmethod
    def _check_ensemble(cls, v: int | list[str]) -> int | list[str]:
        if isinstance(v, int) and v < 0:
            raise ValueError("ensemble must be >= 0 (0 disables the ensemble endpoint)")
        return v


class ModelSpec(BaseModel):
    """The ``user_config`` of one model deployment: what to load and how to batch."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str
    model: str = SOUP_MODEL
    soup_version: int | None = None
    method: str | None = None
    follow: bool = True
    poll_interval_s: float = Field(2.0, gt=0)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    device: str = "cpu"

    def source_key(self) -> tuple:
        """What is loaded (a change of it means loading another model)."""
        return (self.run_dir, self.model, self.soup_version, self.method, self.device)

    def follows_soup(self) -> bool:
        """Whether the replica should watch ``RUN_DIR/soup`` for new versions."""
        return self.model == SOUP_MODEL and self.soup_version is None and self.follow
