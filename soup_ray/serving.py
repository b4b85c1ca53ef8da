"""Serving helpers: image decoding and validation, model loading for Ray Serve, and ``serve_run``.

The Ray Serve application itself (deployments and the FastAPI ingress) lives in
the repository's ``serve/`` folder; this module holds what it needs from the
package and is free of Serve imports at module level, so it can be tested and
used without a running cluster:

- ``load_image`` turns PNG or JPEG bytes into the model's input (RGB, resized
  with bilinear filtering to the model's ``image_size``), refusing everything
  else with an ``ImageError`` that carries an HTTP status and an error code.
- ``load_model`` loads the run's soup (the latest in ``RUN_DIR/soup``, or a
  pinned ``RUN_DIR/soup_versions/vNNNN``) or one trial checkpoint, fully, so a
  server can swap it in with a single assignment.
- ``serve_run`` starts Serve with the application on the local Ray (or the
  cluster named by ``RAY_ADDRESS``) and prints the URL.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .ray_env import worker_env_vars

if TYPE_CHECKING:  # torch is imported lazily: the HTTP ingress never needs it
    import torch

    from .ingredients import TrialRecord
    from .model import CLIPClassifier

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096
ACCEPTED_FORMATS = ("PNG", "JPEG")
SOUP_MODEL = "soup"
APP_NAME = "soup-ray"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


# ---------------------------------------------------------------- options


class ServeOptions(BaseModel):
    """Arguments of the Serve application (the ``args`` of ``serve/config.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="The run folder (absolute, or relative to the current folder / repository root)")
    model: str = Field(SOUP_MODEL, description="'soup', a trial id from results.jsonl, or a checkpoint folder")
    soup_version: int | None = Field(None, ge=1,
                                     description="Pin RUN_DIR/soup_versions/vNNNN instead of following RUN_DIR/soup")
    follow: bool = Field(True, description="Reload the soup when a new version is published to RUN_DIR/soup")
    poll_interval_s: float = Field(2.0, gt=0, description="How often the model replica checks RUN_DIR/soup/soup.json")
    ensemble: int | list[str] = Field(
        3, description="Ensemble members: the top-K trials by held-out accuracy, or trial ids; 0 disables")
    num_cpus: float = Field(0.25, ge=0, description="CPUs per model replica (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (fractions allowed)")
    ingress_cpus: float = Field(0.1, ge=0, description="CPUs of the HTTP ingress and of the ensemble replica")
    max_batch_size: int = Field(16, ge=1, description="Dynamic batching: most images per forward pass")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="Dynamic batching: longest wait for a batch to fill")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1, description="Largest accepted request body")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Largest accepted image (width x height)")

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
    follow: bool = True
    poll_interval_s: float = Field(2.0, gt=0)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    device: str = "cpu"

    def source_key(self) -> tuple:
        """What is loaded (a change of it means loading another model)."""
        return (self.run_dir, self.model, self.soup_version, self.device)

    def follows_soup(self) -> bool:
        """Whether the replica should watch ``RUN_DIR/soup`` for new versions."""
        return self.model == SOUP_MODEL and self.soup_version is None and self.follow


# ---------------------------------------------------------------- images


class ImageError(ValueError):
    """A request body that cannot be turned into a model input; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def to_json(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.message}


def sniff_format(data: bytes) -> str | None:
    """'PNG' or 'JPEG' from the first bytes, else None."""
    if data.startswith(PNG_MAGIC):
        return "PNG"
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    return None


def _identify(data: bytes) -> str | None:
    """The format Pillow recognises in a non-PNG/JPEG body (header only), or None when it is no image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return str(img.format or "unknown")
    except Image.DecompressionBombError:
        return "oversized image"
    except Exception:  # noqa: BLE001 - anything Pillow cannot identify is not an image
        return None


def _to_8bit(img: Any) -> Any:
    """A Pillow image in a mode ``convert('RGB')`` handles without clipping (16-bit grey is rescaled)."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr)
    return img


def load_image(data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """PNG or JPEG bytes -> ``uint8`` array ``[image_size, image_size, 3]`` (RGB, bilinear resize).

    Raises ``ImageError``: 400 empty body, not an image, truncated or corrupt
    image; 415 another image format (GIF, BMP, TIFF, WebP, ...); 422 more than
    ``max_pixels`` pixels (checked from the header, before anything is decoded).
    Grey images become three equal channels; alpha is dropped; no inversion.
    """
    from PIL import Image, ImageOps

    if not data:
        raise ImageError(400, "empty_body", "the request carried no image bytes")
    fmt = sniff_format(data)
    if fmt is None:
        other = _identify(data)
        if other is None:
            raise ImageError(400, "not_an_image", "the body is not a PNG or JPEG image (unrecognised bytes)")
        raise ImageError(415, "unsupported_image_type", f"{other} images are not accepted; send PNG or JPEG")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageError(400, "corrupt_image", f"the {fmt} image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise ImageError(422, "too_many_pixels", f"the image is {width}x{height} = {width * height} pixels; "
                                                         f"at most {max_pixels} are accepted")
            img.load()
            img = ImageOps.exif_transpose(img) if fmt == "JPEG" else img
            rgb = _to_8bit(img).convert("RGB")
            if rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).copy()
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(422, "too_many_pixels", f"the image is too large to decode safely: {err}") from None
    except Exception as err:  # noqa: BLE001 - truncated/corrupt data surfaces as many exception types
        raise ImageError(400, "corrupt_image", f"the {fmt} image is truncated or corrupt: {err}") from None


def to_model_input(images: Sequence[np.ndarray]) -> torch.Tensor:
    """``uint8`` arrays ``[S, S, 3]`` -> float tensor ``[N, 3, S, S]`` in [0, 1] (what ``CLIPClassifier`` takes)."""
    import torch

    x = torch.from_numpy(np.stack([np.asarray(a, dtype=np.uint8) for a in images]))
    return x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def decode_image(data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """PNG or JPEG bytes -> float tensor ``[3, S, S]`` in [0, 1], exactly as the server feeds the model."""
    return to_model_input([load_image(data, image_size, max_pixels)])[0]


def image_from_json(body: bytes) -> bytes:
    """The image bytes of a JSON body ``{"image_base64": "..."}`` (a ``data:`` URL prefix is allowed)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ImageError(400, "malformed_json", f"the JSON body cannot be parsed: {err}") from None
    if not isinstance(payload, dict) or "image_base64" not in payload:
        raise ImageError(422, "missing_field", 'the JSON body must be an object with an "image_base64" string')
    text = payload["image_base64"]
    if not isinstance(text, str):
        raise ImageError(422, "invalid_field", '"image_base64" must be a string')
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(400, "invalid_base64", f'"image_base64" is not valid base64: {err}') from None
    if not data:
        raise ImageError(400, "empty_body", '"image_base64" decodes to no bytes')
    return data


def top_predictions(logits: Sequence[float], classnames: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    """The ``top_k`` classes by probability (softmax of the logits, float32), best first."""
    z = np.asarray(list(logits), dtype=np.float32)
    e = np.exp(z - z.max())
    probs = e / e.sum()
    k = max(1, min(int(top_k), probs.size))
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": classnames[i], "index": int(i), "probability": float(probs[i])} for i in order.tolist()]


# ---------------------------------------------------------------- models


class ModelUnavailable(RuntimeError):
    """The requested model cannot be loaded yet (e.g. no soup has been published)."""


@dataclass
class LoadedModel:
    """A ready classifier and what the server reports about it."""

    classifier: CLIPClassifier
    name: str
    soup_version: int | None
    ingredients: list[str]
    heldout_accuracy: float | None
    classnames: list[str]
    image_size: int
    source: str
    stamp: tuple | None
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        """JSON-ready metadata (everything but the weights)."""
        return {
            "model": self.name,
            "soup_version": self.soup_version,
            "ingredients": list(self.ingredients),
            "heldout_accuracy": self.heldout_accuracy,
            "classes": list(self.classnames),
            "image_size": self.image_size,
            "source": self.source,
            "loaded_at": self.loaded_at,
        }


def soup_folder(run_dir: Path | str, soup_version: int | None = None) -> Path:
    """``RUN_DIR/soup`` (the latest soup) or ``RUN_DIR/soup_versions/vNNNN`` (a pinned version)."""
    from .actor import SOUP_DIR, VERSIONS_DIR

    run_dir = Path(run_dir)
    if soup_version is None:
        return run_dir / SOUP_DIR
    return run_dir / VERSIONS_DIR / f"v{int(soup_version):04d}"


def soup_stamp(folder: Path | str) -> tuple | None:
    """What identifies a published soup (version, publication time, ingredients); None if absent or mid-write."""
    from .export import SOUP_INFO

    try:
        info = json.loads((Path(folder) / SOUP_INFO).read_text())
    except (OSError, ValueError):
        return None
    return (info.get("version"), info.get("published_at"), tuple(info.get("ingredients") or ()))


def _stamp_of(info: dict[str, Any]) -> tuple:
    return (info.get("version"), info.get("published_at"), tuple(info.get("ingredients") or ()))


def _load_soup_folder(folder: Path, device: str, attempts: int = 3) -> LoadedModel:
    """Load a soup folder; retry when a new version replaced it while it was being read."""
    from .export import load_soup

    last: Exception | None = None
    for _ in range(attempts):
        if soup_stamp(folder) is None:
            raise ModelUnavailable(f"no soup published in {folder} yet")
        try:
            clf, info = load_soup(folder, device=device)
        except (OSError, RuntimeError, ValueError, KeyError) as err:  # replaced mid-read: try again
            last = err
            time.sleep(0.2)
            continue
        if soup_stamp(folder) != _stamp_of(info):
            time.sleep(0.2)
            continue
        return LoadedModel(clf.eval(), SOUP_MODEL, info.get("version"), list(info.get("ingredients") or []),
                           info.get("heldout_accuracy"), list(info["classnames"]), int(info["image_size"]),
                           str(folder), _stamp_of(info))
    raise ModelUnavailable(f"could not read a stable soup from {folder}: {last}")


def _results_rows(run_dir: Path) -> list[dict[str, Any]]:
    from .results import RESULTS_FILE, read_jsonl

    path = run_dir / RESULTS_FILE
    return read_jsonl(path) if path.is_file() else []


def resolve_trial(run_dir: Path | str, model: str) -> TrialRecord:
    """The ``TrialRecord`` of ``model``: a completed trial id of the run, or a checkpoint folder."""
    from .ingredients import TrialRecord, trial_records_from_results

    run_dir = Path(run_dir)
    has_results = (run_dir / "results.jsonl").is_file()
    records = {r.trial_id: r for r in trial_records_from_results(run_dir)} if has_results else {}
    if model in records:
        return records[model]
    if Path(model).is_dir():
        return TrialRecord(Path(model).name, str(Path(model).resolve()))
    known = ", ".join(sorted(records)) or "none"
    raise ValueError(f"model {model!r} is neither 'soup', a completed trial id of {run_dir} (known: {known}) "
                     "nor a checkpoint folder")


def check_model(run_dir: Path | str, model: str = SOUP_MODEL, soup_version: int | None = None) -> None:
    """Fail fast (before any replica starts) when ``model``/``soup_version`` cannot exist in ``run_dir``.

    The latest soup may be missing: a server started during a sweep waits for it.
    """
    if model != SOUP_MODEL:
        resolve_trial(run_dir, model)
    elif soup_version is not None and soup_stamp(soup_folder(run_dir, soup_version)) is None:
        raise ValueError(f"soup version {soup_version} is not in {soup_folder(run_dir, soup_version).parent} "
                         "(the actor keeps only the last few versions)")


def _load_trial(run_dir: Path, model: str, device: str) -> LoadedModel:
    """Load one trial checkpoint (by trial id from results.jsonl, or a checkpoint folder) onto the run's base."""
    from .ingredients import CheckpointRejected, TrialRecord, read_checkpoint
    from .model import BASE_META, classifier_from_dir

    record = resolve_trial(run_dir, model)
    base_dir = run_dir / "base"
    meta = json.loads((base_dir / BASE_META).read_text())
    clf = classifier_from_dir(base_dir)
    reference = {k: (tuple(v.shape), v.dtype) for k, v in clf.state_dict().items()}
    try:
        # heldout_correct=0: serving needs the weights, not the checkpoint's held-out score
        state, _ = read_checkpoint(TrialRecord(record.trial_id, record.checkpoint, 0), meta["fingerprint"], reference)
    except CheckpointRejected as err:
        raise ValueError(f"cannot serve trial {record.trial_id}: {err}") from None
    clf.load_state_dict(state)
    heldout = next((r.get("heldout") for r in _results_rows(run_dir) if r.get("trial_id") == record.trial_id), None)
    return LoadedModel(clf.eval().to(device), record.trial_id, None, [record.trial_id], heldout,
                       list(meta["classnames"]), int(meta["image_size"]), record.checkpoint, None)


def load_model(run_dir: Path | str, model: str = SOUP_MODEL, soup_version: int | None = None,
               device: str = "cpu") -> LoadedModel:
    """Load the soup (latest or pinned version) or one trial checkpoint of ``run_dir``, fully, ready to predict."""
    run_dir = Path(run_dir)
    if model == SOUP_MODEL:
        return _load_soup_folder(soup_folder(run_dir, soup_version), device)
    return _load_trial(run_dir, model, device)


class ModelSlot:
    """The model a replica serves: a new one is loaded fully, off the event loop, then swapped in at once.

    ``configure`` applies a ``ModelSpec`` (loading only when what to load
    changed); ``refresh`` reloads when a new soup was published to the folder
    followed; ``watch`` calls ``refresh`` every ``poll_interval_s``. Readers take
    ``slot.current`` once and use that object for a whole batch.
    """

    def __init__(self) -> None:
        import asyncio

        self.current: LoadedModel | None = None
        self.spec: ModelSpec | None = None
        self.last_error: str | None = None
        self.reloads = 0
        self._lock = asyncio.Lock()

    async def configure(self, spec: ModelSpec) -> bool:
        """Apply ``spec``; returns whether another model was loaded.

        A soup that is followed but not published yet leaves the slot empty
        (``watch`` loads it when it appears); any other load error is raised.
        """
        previous, self.spec = self.spec, spec
        if previous is not None and previous.source_key() == spec.source_key() and self.current is not None:
            return False
        try:
            return await self._load(spec, only_if_changed=False)
        except ModelUnavailable as err:
            if not spec.follows_soup():
                raise
            self.last_error = str(err)
            return False

    async def refresh(self) -> bool:
        """Load the followed soup again if a new version was published; returns whether it changed."""
        spec = self.spec
        if spec is None or not spec.follows_soup():
            return False
        return await self._load(spec, only_if_changed=True)

    async def watch(self, spec: ModelSpec, log: Callable[[str], None] = print,
                    on_change: Callable[[], None] | None = None) -> None:
        """Poll for new soup versions while ``spec`` is the configured one (cancel the task to stop)."""
        import asyncio

        while spec is self.spec and spec.follows_soup():
            await asyncio.sleep(spec.poll_interval_s)
            try:
                if await self.refresh() and on_change is not None:
                    on_change()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - keep serving the current model; retry at the next poll
                self.last_error = f"reloading the soup failed: {err}"
                log(self.last_error)

    async def _load(self, spec: ModelSpec, only_if_changed: bool) -> bool:
        import asyncio

        async with self._lock:
            if only_if_changed:
                stamp = await asyncio.to_thread(soup_stamp, soup_folder(spec.run_dir, spec.soup_version))
                if stamp is None or (self.current is not None and stamp == self.current.stamp):
                    return False
            loaded = await asyncio.to_thread(load_model, spec.run_dir, spec.model, spec.soup_version, spec.device)
            if spec is not self.spec:  # reconfigured while loading: the newer spec wins
                return False
            self.current = loaded  # the swap: one assignment, readers see the old or the new model, whole
            self.last_error = None
            self.reloads += 1
            return True


def ensemble_members(run_dir: Path | str, ensemble: int | list[str]) -> list[str]:
    """Trial ids of the ensemble: explicit ids (checked), or the top-K completed trials by held-out accuracy."""
    from .ingredients import trial_records_from_results

    run_dir = Path(run_dir)
    if not (run_dir / "results.jsonl").is_file():
        if ensemble in (0, []):
            return []
        raise ValueError(f"{run_dir} has no results.jsonl: cannot pick ensemble members (set ensemble: 0)")
    known = {r.trial_id for r in trial_records_from_results(run_dir)}
    if isinstance(ensemble, list):
        missing = [t for t in ensemble if t not in known]
        if missing:
            raise ValueError(f"ensemble members {missing} are not completed trials of {run_dir}")
        return list(ensemble)
    rows = [r for r in _results_rows(run_dir) if r.get("trial_id") in known]
    rows.sort(key=lambda r: (-(r.get("heldout") or 0.0), str(r["trial_id"])))
    return [str(r["trial_id"]) for r in rows[:ensemble]]


def repo_root() -> Path:
    """The source checkout holding ``soup_ray/`` and the ``serve/`` application."""
    return Path(__file__).resolve().parents[1]


def resolve_run_dir(run_dir: str | Path) -> Path:
    """An absolute run folder: as given, or relative to the current folder, or to the repository root."""
    p = Path(run_dir).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, repo_root() / p]
    for c in candidates:
        if (c / "base").is_dir():
            return c.resolve()
    raise FileNotFoundError(f"run_dir {run_dir}: no run folder there (expected a base/ folder inside; "
                            "set run_dir to a folder written by `soup-ray run`)")


def _ensure_app_importable() -> None:
    root = repo_root()
    if not (root / "serve" / "__init__.py").is_file():
        raise RuntimeError(f"the Serve application folder {root / 'serve'} is missing; serve from a source checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


# ---------------------------------------------------------------- serve_run


def serve_run(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True, *,
              address: str | None = None, app_name: str = APP_NAME, route_prefix: str = "/",
              log: Callable[[str], None] = print, on_ready: Callable[[str], None] | None = None,
              **options: Any) -> str:
    """Serve ``run_dir``'s soup over HTTP on ``host:port``; returns the base URL.

    Starts an embedded local Ray (or joins the cluster named by ``address`` or
    ``RAY_ADDRESS``) unless Ray is already initialised, starts Serve with those
    HTTP options and deploys the ``serve/`` application. ``options`` are the
    other ``ServeOptions`` fields (``model``, ``ensemble``, ``num_cpus``,
    ``num_gpus``, ``max_batch_size``, ``batch_wait_timeout_s``, ``follow``,
    ``poll_interval_s``, ``max_body_bytes``, ``max_pixels``, ...). With
    ``blocking`` it calls ``on_ready(url)`` once deployed, waits until Ctrl-C (or
    SIGTERM), then deletes the application and stops whatever it started. Serve's HTTP options are fixed when Serve first starts on
    a cluster: a running Serve keeps its own host and port.
    """
    import ray
    from ray import serve

    resolved = resolve_run_dir(run_dir)
    opts = ServeOptions(run_dir=str(resolved), **options)
    check_model(resolved, opts.model, opts.soup_version)
    ensemble_members(resolved, opts.ensemble)
    _ensure_app_importable()
    from serve.app import build_app

    started = own_ray = False
    if not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS") or "local"
        env = worker_env_vars()
        # serve/ is not an installed package: replicas import it from the repository, which a cluster has at the
        # same path on every node (cluster.yaml's file_mounts), whatever folder this command runs in
        paths = [str(repo_root())] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if target == "local":
            log("starting an embedded local Ray (address='local')")
            ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env})
            own_ray = True
        else:
            log(f"connecting to the Ray cluster at {target}")
            ray.init(address=target, runtime_env={"env_vars": env})
        started = True
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(build_app(opts), name=app_name, route_prefix=route_prefix, blocking=False)
    url = f"http://{host}:{int(port)}{route_prefix.rstrip('/')}"
    log(f"serving {resolved} at {url}  (API docs: {url}/docs)")
    if not blocking:
        return url
    sigterm_as_interrupt()
    try:
        if on_ready is not None:
            on_ready(url)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        log("stopping the server")
    finally:
        serve.delete(app_name)  # on a shared cluster only this application: other Serve apps keep running
        if own_ray:
            stop_serve_and_ray()
        elif started:
            ray.shutdown()
    return url


def stop_serve_and_ray() -> None:
    """Shut Serve down, then Ray (even when Serve's shutdown fails): for a Ray this process started itself."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def sigterm_as_interrupt() -> None:
    """Let SIGTERM stop blocking work (``serve_run``, a bench) like Ctrl-C does: Serve and Ray stop on the way out.

    Main thread only; call it after ``ray.init``, which installs a SIGTERM handler of its own.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
