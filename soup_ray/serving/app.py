"""The Ray Serve application: the soup (or one trial) over HTTP, an ensemble of trials, live soup updates.

Deployments:

- ``Model`` (``ClassifierModel``): one classifier with ``@serve.batch`` dynamic
  batching. Its ``user_config`` (``soup_ray.serving.options.ModelSpec``) names what to
  load; ``reconfigure`` loads it fully in a worker thread and swaps one
  reference, so a request never sees a half-loaded model. When it serves the
  latest soup it polls ``RUN_DIR/soup/soup.json`` and reloads the same way when
  a new version is published: the replica process stays the same.
- ``Member0..K-1`` + ``Ensemble``: K trial checkpoints composed through
  DeploymentHandles; the ensemble averages their logits.
- ``Ingress`` (FastAPI): ``POST /predict``, ``POST /predict/ensemble``,
  ``GET /info``, ``GET /healthz``, the live soup page at ``GET /`` (its data at
  ``GET /soup.json``); OpenAPI at ``/docs``. Images are decoded,
  checked and resized here, before batching; bad input gets a 4xx JSON error.

``build_app`` is the application builder that ``serve/config.yaml`` names
(through the thin ``serve/app.py``) and that ``serve_run`` deploys.
"""

import asyncio
import ipaddress
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import ray
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..live import snapshot, with_digest
from ..run_dir import RunDir
from .auth import BearerAuth, read_token
from .images import ACCEPTED_FORMATS, ImageError, base64_image, image_from_json, load_image, top_predictions

# ``.models`` (torch, open_clip, torchvision: seconds of imports) is imported where a model is loaded, so the
# ingress and ensemble replicas, which hold no model, start without it
if TYPE_CHECKING:
    from .models import LoadedModel
from .options import CPU_BATCH, DEFAULT_BATCH_IMAGES, ModelSpec, ServeOptions
from .page import JSON_PATH, render_page

logger = logging.getLogger("ray.serve")


def replica_id() -> str | None:
    """This Serve replica's id (None outside Serve, e.g. in tests driving the class directly)."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not in a replica
        return None


# ---------------------------------------------------------------- model replicas


@serve.deployment(name="Model", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class ClassifierModel:
    """One classifier (the soup or a trial checkpoint) behind dynamic batching."""

    def __init__(self) -> None:
        from .models import ModelSlot

        self.slot = ModelSlot()
        self._watcher: asyncio.Task | None = None
        self.largest_batch = 0
        self.batches = 0
        self.images = 0
        self.forward_s = 0.0  # summed over batches: the model's own time
        self.replica = replica_id()
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    async def reconfigure(self, user_config: dict) -> None:
        """Apply a new ``ModelSpec``: batching settings at once, a different model loaded then swapped in."""
        from .models import resolve_run_dir

        spec = ModelSpec.model_validate(user_config)
        spec = spec.model_copy(
            update={"run_dir": str(resolve_run_dir(spec.run_dir)), "device": self._pick_device(spec.device)}
        )
        self._predict_batch.set_max_batch_size(spec.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)
        if await self.slot.configure(spec):
            self._log_current()
        elif self.slot.current is None:
            logger.warning("%s; waiting for the first soup", self.slot.last_error)
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if spec.follows_soup():
            watch = self.slot.watch(spec, log=logger.warning, on_change=self._log_current)
            self._watcher = asyncio.get_running_loop().create_task(watch)

    def _log_current(self) -> None:
        cur = self.slot.current
        if cur is not None:
            logger.info("serving %s (soup version %s) from %s", cur.name, cur.soup_version, cur.source)

    @staticmethod
    def _pick_device(wanted: str) -> str:
        import torch

        if wanted.startswith("cuda") and not torch.cuda.is_available():
            logger.warning("device %s requested but CUDA is not available; using the CPU", wanted)
            return "cpu"
        return wanted

    async def predict(self, image: np.ndarray) -> dict[str, Any]:
        """Logits for one decoded image (``uint8 [S, S, 3]``); batched with concurrent calls.

        The answer also says how long the image waited for its batch (``wait_ms``), how long the batch's
        forward pass took (``forward_ms``), the batch's size and which replica answered.
        """
        return await self._predict_batch((image, time.perf_counter()))

    @serve.batch(max_batch_size=CPU_BATCH, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, items: list[tuple[np.ndarray, float]]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        current = self.slot.current  # one model for the whole batch, even if a swap happens meanwhile
        if current is None:
            detail = self.slot.last_error or "the model is still loading"
            return [{"ready": False, "detail": detail} for _ in items]
        logits = await asyncio.to_thread(self._forward, current, [image for image, _ in items])
        forward = time.perf_counter() - start
        self.largest_batch = max(self.largest_batch, len(items))
        self.batches += 1
        self.images += len(items)
        self.forward_s += forward
        return [
            {
                "ready": True,
                "logits": row,
                "model": current.name,
                "soup_version": current.soup_version,
                "wait_ms": round(1000 * (start - entered), 3),
                "forward_ms": round(1000 * forward, 3),
                "batch": len(items),
                "replica": self.replica,
            }
            for row, (_, entered) in zip(logits, items, strict=True)
        ]

    def _forward(self, current: "LoadedModel", images: list[np.ndarray]) -> list[list[float]]:
        """One forward pass: the uint8 images go to the model's device as they are, then become floats there."""
        import torch

        device = next(current.classifier.parameters()).device
        x = torch.from_numpy(np.stack(images))
        if device.type == "cuda":
            x = x.pin_memory()
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != current.image_size or x.shape[-2] != current.image_size:
            x = torch.nn.functional.interpolate(
                x, size=(current.image_size, current.image_size), mode="bilinear", align_corners=False
            )
        with torch.inference_mode():
            out = current.classifier(x.contiguous()).float().cpu()
        return out.tolist()

    def info(self) -> dict[str, Any]:
        """What this replica serves, its process id, actor name and Ray node, a rejected soup version, batching statistics."""
        spec = self.slot.spec
        current = self.slot.current
        out: dict[str, Any] = {
            "ready": current is not None,
            "pid": os.getpid(),
            "last_error": self.slot.last_error,
            "actor": ray.get_runtime_context().get_actor_name(),
            "node_id": self.node_id,
            "rejected": self.slot.rejected,
            "reloads": self.slot.reloads,
            "follow": bool(spec and spec.follows_soup()),
            "replica": self.replica,
            "batching": {
                "max_batch_size": spec.max_batch_size if spec else None,
                "batch_wait_timeout_s": spec.batch_wait_timeout_s if spec else None,
                "largest_batch": self.largest_batch,
                "batches": self.batches,
                "images": self.images,
                "forward_s": round(self.forward_s, 4),
            },
        }
        if current is not None:
            out.update(current.describe())
        elif spec is not None:
            out["model"] = spec.model
        return out


@serve.deployment(name="Ensemble", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class Ensemble:
    """K model deployments composed through handles; the prediction is the mean of their logits."""

    def __init__(self, members: list[DeploymentHandle], names: list[str]) -> None:
        self.members = list(members)
        self.names = list(names)

    async def predict(self, image: np.ndarray) -> dict[str, Any]:
        """Mean logits of every member for one decoded image."""
        outs = await asyncio.gather(*(m.predict.remote(image) for m in self.members))
        waiting = [o for o in outs if not o.get("ready")]
        if waiting:
            return {"ready": False, "detail": waiting[0].get("detail", "an ensemble member is not ready")}
        logits = np.asarray([o["logits"] for o in outs], dtype=np.float32).mean(axis=0)
        return {
            "ready": True,
            "logits": logits.tolist(),
            "model": "ensemble",
            "soup_version": None,
            "members": [o["model"] for o in outs],
        }

    async def info(self) -> dict[str, Any]:
        """The members' own ``info``."""
        infos = await asyncio.gather(*(m.info.remote() for m in self.members))
        return {"members": self.names, "models": list(infos)}


# ---------------------------------------------------------------- HTTP ingress


class Prediction(BaseModel):
    """One class of the answer."""

    label: str
    index: int
    probability: float


class PredictionResponse(BaseModel):
    """The answer of /predict and /predict/ensemble (``members`` only for the ensemble)."""

    predictions: list[Prediction]
    soup_version: int | None
    model: str
    members: list[str] | None = None
    served_by: dict[str, str | None] | None = Field(
        None, description="Which ingress and model replica answered (only with ?detail=local from loopback)"
    )


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: an error code and what was wrong."""

    error: str
    detail: Any = None


class BatchItem(BaseModel):
    """One image of a batch: its predictions, or the error that image alone got (its ``status``)."""

    index: int
    predictions: list[Prediction] | None = None
    soup_version: int | None = None
    model: str | None = None
    error: str | None = None
    detail: Any = None
    status: int | None = None


class BatchResponse(BaseModel):
    """The answer of /predict/batch: one item per image, in the order sent."""

    results: list[BatchItem]
    ok: int
    failed: int


# Standard base64 (RFC 4648 section 4, padded), at least one byte, optionally behind a `data:` URL prefix.
BASE64_PATTERN = (
    r"^(data:image/(png|jpeg);base64,)?([A-Za-z0-9+/]{4})*"
    r"([A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)$"
)
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "application/octet-stream")
_BINARY = {
    "type": "string",
    "format": "binary",
    "minLength": 1,
    "description": "The bytes of one PNG or JPEG image (recognised from its first bytes)",
}
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "One PNG or JPEG image: a multipart upload in field `file`, the raw bytes "
        '(image/png, image/jpeg or application/octet-stream), or JSON `{"image_base64": "..."}`. '
        "Bytes that are no PNG or JPEG are refused (400 not an image or corrupt, 415 another format).",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {"file": dict(_BINARY)},
                },
                "encoding": {"file": {"contentType": "image/png, image/jpeg, application/octet-stream"}},
            },
            **{kind: {"schema": dict(_BINARY)} for kind in IMAGE_MEDIA_TYPES},
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["image_base64"],
                    "properties": {
                        "image_base64": {
                            "type": "string",
                            "minLength": 4,
                            "pattern": BASE64_PATTERN,
                            "description": "The image's bytes in standard, padded base64 (non-empty), optionally as a "
                            "`data:image/png;base64,...` URL",
                        }
                    },
                }
            },
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "description": "Several PNG or JPEG images: repeated multipart `file` fields, or a JSON list of base64 "
        "strings. Each image gets its own entry in the answer, in the order sent; an image that "
        "cannot be used gets its own error there (the others are still answered).",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": DEFAULT_BATCH_IMAGES,
                            "items": {
                                "type": "string",
                                "format": "binary",
                                "description": "One PNG or JPEG image; an empty or unreadable one is "
                                "that image's error",
                            },
                        }
                    },
                },
                "encoding": {"file": {"contentType": "image/png, image/jpeg, application/octet-stream"}},
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images_base64"],
                    "properties": {
                        "images_base64": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": DEFAULT_BATCH_IMAGES,
                            "items": {
                                "type": "string",
                                "description": "One image's bytes in base64 (as /predict's "
                                "image_base64); an invalid one is that image's error",
                            },
                        }
                    },
                }
            },
        },
    }
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "Empty body, not an image, truncated/corrupt image, malformed JSON or multipart",
    },
    401: {
        "model": ErrorResponse,
        "description": "A bearer token is configured and the request lacks it (or it is "
        "wrong); see the WWW-Authenticate header",
    },
    408: {"model": ErrorResponse, "description": "The body did not arrive within the configured time"},
    413: {"model": ErrorResponse, "description": "Body larger than the configured limit"},
    415: {"model": ErrorResponse, "description": "An image format other than PNG or JPEG"},
    422: {
        "model": ErrorResponse,
        "description": "Too many pixels, too large once decoded, a missing field or an invalid parameter",
    },
    503: {
        "model": ErrorResponse,
        "description": "The model is not loaded yet, cannot be loaded, is restarting or "
        "is overloaded; retry after the Retry-After header's seconds",
    },
    504: {"model": ErrorResponse, "description": "The model did not answer within the configured time"},
}

app = FastAPI(
    title="soup-ray",
    version="0.1.0",
    description="A greedy model soup of fine-tuned CLIP classifiers, served with Ray Serve. "
    "Send PNG or JPEG images to `/predict` (the soup) or `/predict/ensemble` (mean logits of trials).",
)


def _ingress_token() -> bytes | None:
    """The bearer token of the ingress replica serving this request (None: the API is open)."""
    return getattr(serve.get_replica_context().servable_object, "auth_token", None)


# Added before `serve.ingress` copies the app: every route, whoever adds it, is behind the token.
app.add_middleware(BearerAuth, token=_ingress_token, open_paths=("/healthz",))


class ApiError(Exception):
    """An error answered as ``{"error": code, "detail": message}`` with ``status`` (and ``headers``)."""

    def __init__(self, status: int, code: str, message: Any, headers: dict[str, str] | None = None):
        super().__init__(str(message))
        self.status, self.code, self.message, self.headers = status, code, message, headers


@app.exception_handler(ImageError)
async def _image_error(request: Request, exc: ImageError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.code, "detail": exc.message}, status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
    return JSONResponse({"error": "invalid_request", "detail": problems}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    return JSONResponse(
        {"error": codes.get(exc.status_code, "http_error"), "detail": exc.detail},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


PRIVATE_INFO = (
    "pid",
    "actor",
    "source",
    "run_dir",
    "ingress_pid",
    "replica",
    "ingress",
    "node_id",
)  # in /info only with ?detail=local from loopback
_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)+[\w.@+-]*")


def public_text(text: Any, run_dir: str) -> Any:
    """``text`` without the run folder's or any other absolute path (they say nothing a client needs)."""
    if not isinstance(text, str):
        return text
    for root in {run_dir, str(Path(run_dir).resolve())}:
        text = text.replace(root, "RUN_DIR")
    return _ABS_PATH.sub("<path>", text)


def public_snapshot(snap: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """The live page's data (``live.snapshot``) with the rejection reasons passed through :func:`public_text`,
    as ``/info`` passes its messages: ``/`` and ``/soup.json`` are as public as ``/info``."""
    keeper = snap.get("keeper")
    if isinstance(keeper, dict) and isinstance(keeper.get("rejected"), dict):
        keeper = {**keeper, "rejected": {k: public_text(v, run_dir) for k, v in keeper["rejected"].items()}}
    trials = [
        {**t, "soup": public_text(t.get("soup"), run_dir)} if isinstance(t, dict) else t
        for t in snap.get("trials") or []
    ]
    return {**snap, "keeper": keeper, "trials": trials}


RELAY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-host", "true-client-ip", "cf-connecting-ip")
"""Headers a reverse proxy adds when it relays a request: such a request is never local, whatever address the
proxy (on this host, on loopback) connects from."""


def is_loopback(request: Request) -> bool:
    """Whether the client is on this host: a loopback address (Serve's proxy passes the client's own address on)
    and no relay header (:data:`RELAY_HEADERS`). A reverse proxy that adds none of them makes its clients look
    local: behind one, leave ``?detail=local`` to requests made on the host itself."""
    if any(h in request.headers for h in RELAY_HEADERS):
        return False
    host = request.client.host if request.client is not None else ""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+: a deadline on the running task, no extra task


async def within(awaitable: Any, seconds: float) -> Any:
    """``await awaitable``, cancelled with ``asyncio.TimeoutError`` after ``seconds``.

    On the request path: ``asyncio.timeout`` puts the deadline on the request's own task, where
    ``asyncio.wait_for`` (kept for Python 3.10) starts a task per call.
    """
    if _timeout is None:
        return await asyncio.wait_for(_awaited(awaitable), seconds)
    async with _timeout(seconds):
        return await awaitable


async def _awaited(response: Any) -> Any:
    return await response


def server_timing(seconds: dict[str, Any]) -> str:
    """A ``Server-Timing`` header value (durations in ms) from ``{name: seconds}``; other values are skipped."""
    return ", ".join(f"{k};dur={1000 * v:.3f}" for k, v in seconds.items() if isinstance(v, float) and k != "batch")


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body, refused with 413 when its Content-Length or its actual size exceeds ``limit``,
    and with 408 when it has not arrived whole within ``timeout_s`` (a stalled or trickling client)."""
    if timeout_s is not None:
        try:
            return await within(read_body(request, limit), timeout_s)
        except asyncio.TimeoutError:
            raise ImageError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g}s") from None
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ImageError(400, "bad_content_length", f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise ImageError(413, "body_too_large", f"the body is {size} bytes; at most {limit} are accepted")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ImageError(413, "body_too_large", f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def multipart_file(request: Request, body: bytes) -> bytes:
    """The bytes of the ``file`` field of a multipart body already read into ``body``."""
    return (await multipart_files(request, body, max_files=4))[0]


async def multipart_files(request: Request, body: bytes, max_files: int, many: bool = False) -> list[bytes]:
    """The bytes of the ``file`` field(s) of a multipart body already read into ``body`` (``many``: every one,
    in order; any other field is refused)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files, max_fields=16)
    except Exception as err:  # noqa: BLE001 - any parser failure is the client's malformed body
        reason = getattr(err, "detail", err)
        if "Too many files" in str(reason):
            raise ImageError(422, "too_many_images", f"at most {max_files} images in one request") from None
        raise ImageError(400, "malformed_multipart", f"the multipart body cannot be parsed: {reason}") from None
    try:
        items = form.getlist("file") if many else [form.get("file")]
        if not items or items[0] is None:
            raise ImageError(422, "missing_field", "the multipart body has no 'file' field")
        if many:
            other = sorted(set(form.keys()) - {"file"})
            if other:
                raise ImageError(
                    422,
                    "unexpected_field",
                    f"unexpected multipart field(s) {other[:5]}: send the images as 'file' fields only",
                )
        if any(isinstance(item, str) for item in items):
            raise ImageError(422, "invalid_field", "the 'file' field must be a file upload, not text")
        return [await item.read() for item in items]  # type: ignore[union-attr]
    finally:
        await form.close()


async def image_bytes(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The image bytes of a request: multipart field ``file``, JSON ``image_base64``, or the raw body."""
    body = await read_body(request, limit, timeout_s)
    if not body:
        raise ImageError(400, "empty_body", "the request body is empty; send a PNG or JPEG image")
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        data = await multipart_file(request, body)
        if not data:
            raise ImageError(400, "empty_body", "the uploaded file is empty")
        return data
    if kind == "application/json" or kind.endswith("+json"):
        return image_from_json(body)
    return body


async def batch_images(
    request: Request, limit: int, per_image: int, most: int, timeout_s: float | None = None
) -> list[bytes | ImageError]:
    """The images of a /predict/batch request, in order: multipart ``file`` fields or JSON ``images_base64``.

    The body as a whole is refused (413, 400, 422) when it is too large, malformed or holds more than
    ``most`` images; one image that cannot be read (empty, invalid base64, over ``per_image`` bytes) is
    that image's ``ImageError`` in the list, not a failed batch.
    """
    body = await read_body(request, limit, timeout_s)
    if not body:
        raise ImageError(
            400,
            "empty_body",
            "the request body is empty; send images as multipart 'file' fields or JSON {\"images_base64\": [...]}",
        )
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        items: list[bytes | ImageError] = list(await multipart_files(request, body, max_files=most, many=True))
    elif kind == "application/json" or kind.endswith("+json"):
        items = images_from_json_list(body, most)
    else:
        raise ImageError(
            415,
            "unsupported_media_type",
            "send the images as multipart/form-data 'file' fields or as JSON {\"images_base64\": [...]}",
        )
    out: list[bytes | ImageError] = []
    for item in items:
        if isinstance(item, bytes) and not item:
            item = ImageError(400, "empty_body", "this image is empty")
        elif isinstance(item, bytes) and len(item) > per_image:
            item = ImageError(
                413, "body_too_large", f"this image is {len(item)} bytes; at most {per_image} are accepted per image"
            )
        out.append(item)
    return out


def images_from_json_list(body: bytes, most: int) -> list[bytes | ImageError]:
    """The images of a JSON body ``{"images_base64": [...]}``; an entry that is not valid base64 is its error."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ImageError(400, "malformed_json", f"the JSON body cannot be parsed: {err}") from None
    if not isinstance(payload, dict) or "images_base64" not in payload:
        raise ImageError(422, "missing_field", 'the JSON body must be an object with an "images_base64" list')
    listed = payload["images_base64"]
    if not isinstance(listed, list) or not listed or not all(isinstance(v, str) for v in listed):
        raise ImageError(422, "invalid_field", '"images_base64" must be a non-empty list of base64 strings')
    if len(listed) > most:
        raise ImageError(422, "too_many_images", f"{len(listed)} images; at most {most} in one request")
    out: list[bytes | ImageError] = []
    for text in listed:
        try:
            out.append(base64_image(text))
        except ImageError as err:
            out.append(err)
    return out


class _LocalMethod:
    """``handle.method.remote(...)`` for an object in this process: an awaitable of the method's answer."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        out = self.fn(*args)
        if asyncio.iscoroutine(out):
            return out
        future = asyncio.get_running_loop().create_future()
        future.set_result(out)
        return future


class _BoundedMethod(_LocalMethod):
    """As a model deployment's handle bounds its calls: ``max_ongoing`` at once, ``max_queued`` waiting, and
    ``BackPressureError`` beyond that (answered as the JSON 503 with Retry-After a split deployment gives)."""

    def __init__(self, fn: Callable[..., Any], max_ongoing: int, max_queued: int) -> None:
        super().__init__(fn)
        self.max_ongoing, self.max_queued = max_ongoing, max_queued
        self.ongoing = self.waiting = 0
        self._slots: asyncio.Semaphore | None = None

    def remote(self, *args: Any) -> Any:
        if self.ongoing >= self.max_ongoing and self.waiting >= self.max_queued:
            raise BackPressureError(num_queued_requests=self.waiting, max_queued_requests=self.max_queued)
        return self._call(*args)

    async def _call(self, *args: Any) -> Any:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_ongoing)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.ongoing += 1
        try:
            return await self.fn(*args)
        finally:
            self.ongoing -= 1
            self._slots.release()


class LocalHandle:
    """A ``DeploymentHandle`` stand-in over a model in the same replica (``predict``, bounded like a model
    deployment's queue, and ``info``)."""

    def __init__(self, target: Any, max_ongoing: int, max_queued: int) -> None:
        self.predict = _BoundedMethod(target.predict, max_ongoing, max_queued)
        self.info = _LocalMethod(target.info)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=100)
@serve.ingress(app)
class SoupIngress:
    """HTTP front: validates and decodes images, then asks the model or the ensemble.

    ``model`` is the model deployment's handle (topology ``split``), or None (``fused``): the replica then
    holds the served model itself (a ``ClassifierModel`` in this process, configured through this
    deployment's ``user_config``), so an image is decoded and batched where it is scored, with no hop.
    """

    def __init__(
        self, model: DeploymentHandle | None, ensemble: DeploymentHandle | None, settings: dict[str, Any]
    ) -> None:
        self._local = None
        if model is None:
            self._local = ClassifierModel.func_or_class()
            model = LocalHandle(self._local, int(settings["model_max_ongoing"]), int(settings["model_max_queued"]))
        self.model = model
        self.ensemble = ensemble
        self.settings = dict(settings)
        base = json.loads(RunDir(settings["run_dir"]).base_meta.read_text())
        self.image_size = int(base["image_size"])
        self.classnames = list(base["classnames"])
        self.max_body_bytes = int(settings["max_body_bytes"])
        self.max_pixels = int(settings["max_pixels"])
        defaults = ServeOptions.model_fields
        self.max_decoded_bytes = int(settings.get("max_decoded_bytes", defaults["max_decoded_bytes"].default))
        self.body_timeout_s = float(settings.get("body_timeout_s", defaults["body_timeout_s"].default))
        self.model_timeout_s = float(settings.get("model_timeout_s", defaults["model_timeout_s"].default))
        retry = float(settings.get("retry_after_s", defaults["retry_after_s"].default))
        self.retry_after = {"Retry-After": str(max(0, math.ceil(retry)))}
        token_file = settings.get("auth_token_file")
        self.auth_token = read_token(token_file) if token_file else None  # read here, on the replica's node
        self.max_batch_images = int(settings.get("max_batch_images", defaults["max_batch_images"].default))
        self.max_batch_body_bytes = int(settings.get("max_batch_body_bytes", defaults["max_batch_body_bytes"].default))
        threads = int(settings.get("decode_threads", defaults["decode_threads"].default))
        # decoding never runs on the event loop: a pool of its own, so a burst of large images cannot starve it
        self._decode_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="soup-ray-decode")
        self.replica = replica_id()
        self.decode_stats = {"images": 0, "seconds": 0.0, "on_event_loop": 0, "threads": set()}
        self._stats_lock = threading.Lock()

    async def replica_info(self) -> dict[str, Any]:
        """Topology ``fused``: the in-process model's ``info`` (what a model replica's handle answers)."""
        return await self.model.info.remote()

    async def reconfigure(self, user_config: dict) -> None:
        """Topology ``fused``: the served model's ``ModelSpec`` (what to load, batching), as a model replica takes it."""
        if self._local is not None:
            await self._local.reconfigure(user_config)

    async def _decode(self, data: bytes) -> tuple[np.ndarray, float]:
        """Decode one image in the decode pool; returns it and the seconds its decoding took."""
        loop_thread = threading.get_ident()

        def work() -> tuple[np.ndarray, float]:
            t0 = time.perf_counter()
            image = load_image(data, self.image_size, self.max_pixels, self.max_decoded_bytes)
            took = time.perf_counter() - t0
            with self._stats_lock:
                stats = self.decode_stats
                stats["images"] += 1
                stats["seconds"] += took
                stats["on_event_loop"] += threading.get_ident() == loop_thread
                stats["threads"].add(threading.current_thread().name)
            return image, took

        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, work)

    async def _call(self, call: Callable[[], Any], what: str, timeout_status: int) -> Any:
        """A handle call awaited at most ``model_timeout_s``; overload, failure and time-out become JSON errors."""
        response = None
        try:
            response = call()
            return await within(response, self.model_timeout_s)
        except asyncio.TimeoutError:
            cancel = getattr(response, "cancel", None)
            if callable(cancel):
                cancel()
            raise ApiError(
                timeout_status,
                "model_timeout",
                f"the {what} did not answer within {self.model_timeout_s:g}s",
                self.retry_after,
            ) from None
        except BackPressureError as err:  # its queue is full: Serve rejects rather than queue without bound
            raise ApiError(
                503, "overloaded", f"the {what} is overloaded ({err.message}); retry later", self.retry_after
            ) from None
        except Exception as err:  # noqa: BLE001 - the replica died or is restarting: not the client's fault
            logger.warning("the %s could not answer: %s: %s", what, type(err).__name__, err)
            raise ApiError(
                503,
                "model_error",
                f"the {what} could not answer ({type(err).__name__}); it may be restarting",
                self.retry_after,
            ) from None

    async def _answer(
        self, request: Request, top_k: int, target: DeploymentHandle, local: bool = False
    ) -> JSONResponse:
        t0 = time.perf_counter()
        data = await image_bytes(request, self.max_body_bytes, self.body_timeout_s)
        t_read = time.perf_counter()
        image, decode_s = await self._decode(data)
        answer, timing = await self._predict_one(image, top_k, target)
        timing = {"read": t_read - t0, "decode": decode_s, **timing, "ingress": time.perf_counter() - t0}
        if local and is_loopback(request):
            answer["served_by"] = {"ingress": self.replica, "model": timing.pop("replica", None)}
        # built here rather than validated against the response model (which documents it): that costs each
        # request a validation and a serialisation for a dict this method has just made in the model's shape
        return JSONResponse(answer, headers={"Server-Timing": server_timing(timing)})

    async def _predict_one(
        self, image: np.ndarray, top_k: int, target: DeploymentHandle
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Ask ``target`` about one decoded image: the answer, and where its time went (seconds)."""
        what = "ensemble" if target is self.ensemble else "model"
        t0 = time.perf_counter()
        out = await self._call(lambda: target.predict.remote(image), what, 504)
        call = time.perf_counter() - t0
        if not out.get("ready"):
            detail = public_text(out.get("detail") or "the model is not loaded yet", self.settings["run_dir"])
            raise ApiError(503, "model_unavailable", detail, self.retry_after)
        answer = {
            "predictions": top_predictions(out["logits"], self.classnames, top_k),
            "soup_version": out.get("soup_version"),
            "model": out.get("model"),
        }
        if "members" in out:
            answer["members"] = out["members"]
        timing: dict[str, Any] = {"model_call": call}
        if "forward_ms" in out:  # one model replica (an ensemble's members answer on their own)
            wait, forward = out["wait_ms"] / 1000, out["forward_ms"] / 1000
            timing.update(
                hops=max(0.0, call - wait - forward),
                batch_wait=wait,
                forward=forward,
                batch=out.get("batch"),
                replica=out.get("replica"),
            )
        return answer, timing

    async def _batch_item(self, index: int, item: bytes | ImageError, top_k: int) -> dict[str, Any]:
        try:
            if isinstance(item, ImageError):
                raise item
            image, _ = await self._decode(item)
            answer, _ = await self._predict_one(image, top_k, self.model)
            return {"index": index, **answer}
        except ImageError as err:
            return {"index": index, "error": err.code, "detail": err.message, "status": err.status}
        except ApiError as err:
            return {"index": index, "error": err.code, "detail": err.message, "status": err.status}

    async def _model_info(self, local: bool = False) -> dict[str, Any]:
        """The model replica's ``info``; its messages without absolute paths unless ``local``."""
        info = dict(await self._call(lambda: self.model.info.remote(), "model replica", 503))
        if not local:
            run_dir = self.settings["run_dir"]
            info["last_error"] = public_text(info.get("last_error"), run_dir)
            if isinstance(info.get("rejected"), dict):
                info["rejected"] = {**info["rejected"], "error": public_text(info["rejected"].get("error"), run_dir)}
        return info

    @app.post(
        "/predict",
        response_model=PredictionResponse,
        response_model_exclude_unset=True,
        responses=ERROR_RESPONSES,
        openapi_extra=IMAGE_BODY,
        summary="Classify an image with the served model",
    )
    async def predict(
        self,
        request: Request,
        top_k: int = Query(3, ge=1, le=1000, description="How many classes to return"),
        detail: Literal["local"] | None = Query(
            None,
            description="`local`: also which ingress and model replica answered; honoured only for a loopback client",
        ),
    ) -> JSONResponse:
        """Top-``top_k`` classes of a PNG or JPEG image, with the soup version that answered.

        The ``Server-Timing`` header says where the request's time went in the server: reading the body,
        decoding the image, the hops to and from the model replica, waiting for a batch, the forward pass.
        """
        return await self._answer(request, top_k, self.model, local=detail == "local")

    @app.post(
        "/predict/batch",
        response_model=BatchResponse,
        response_model_exclude_none=True,
        responses={k: v for k, v in ERROR_RESPONSES.items() if k != 504},
        openapi_extra=BATCH_BODY,
        summary="Classify several images in one request",
    )
    async def predict_batch(
        self, request: Request, top_k: int = Query(3, ge=1, le=1000, description="How many classes per image")
    ) -> dict[str, Any]:
        """Top-``top_k`` classes of each image (at most ``max_batch_images``, each within the single-image limits,
        the body within ``max_batch_body_bytes``), in the order sent. An image that cannot be used gets its own
        entry with ``error``, ``detail`` and ``status``; the others are answered. 503 when no image could be
        answered because the model is unavailable."""
        items = await batch_images(
            request, self.max_batch_body_bytes, self.max_body_bytes, self.max_batch_images, self.body_timeout_s
        )
        results = await asyncio.gather(*(self._batch_item(i, item, top_k) for i, item in enumerate(items)))
        failed = [r for r in results if "error" in r]
        if failed and len(failed) == len(results) and all(r["status"] in (503, 504) for r in failed):
            raise ApiError(
                503 if failed[0]["status"] == 503 else 504, failed[0]["error"], failed[0]["detail"], self.retry_after
            )
        return {"results": results, "ok": len(results) - len(failed), "failed": len(failed)}

    @app.post(
        "/predict/ensemble",
        response_model=PredictionResponse,
        response_model_exclude_unset=True,
        responses=ERROR_RESPONSES,
        openapi_extra=IMAGE_BODY,
        summary="Classify an image with the ensemble",
    )
    async def predict_ensemble(
        self,
        request: Request,
        top_k: int = Query(3, ge=1, le=1000, description="How many classes to return"),
    ) -> JSONResponse:
        """Top-``top_k`` classes from the mean logits of the ensemble's trial checkpoints."""
        if self.ensemble is None:
            raise ApiError(404, "ensemble_disabled", "no ensemble is configured (ensemble: 0)")
        return await self._answer(request, top_k, self.ensemble)

    @app.get("/info", summary="What is served", responses={k: ERROR_RESPONSES[k] for k in (401, 422, 503)})
    async def info(
        self,
        request: Request,
        detail: Literal["local"] | None = Query(
            None,
            description="`local`: also the run folder, model source, process ids, replica actor name and Ray node; "
            "honoured only for a loopback client",
        ),
    ) -> dict[str, Any]:
        """Model, soup version, ingredients, held-out accuracy, classes, a rejected soup version, ensemble, limits."""
        local = detail == "local" and is_loopback(request)
        out = await self._model_info(local)
        out["classes"] = out.get("classes") or self.classnames
        out["image_size"] = out.get("image_size") or self.image_size
        out["ensemble"] = {"members": self.settings.get("members", [])} if self.ensemble is not None else None
        out["limits"] = {
            "max_body_bytes": self.max_body_bytes,
            "max_pixels": self.max_pixels,
            "max_decoded_bytes": self.max_decoded_bytes,
            "body_timeout_s": self.body_timeout_s,
            "model_timeout_s": self.model_timeout_s,
            "formats": list(ACCEPTED_FORMATS),
        }
        out["auth"] = "bearer" if self.auth_token is not None else None
        if local:
            out["run_dir"] = self.settings["run_dir"]
            out["ingress_pid"] = os.getpid()
            stats = self.decode_stats
            out["ingress"] = {
                "replica": self.replica,
                "pid": os.getpid(),
                "decoded": stats["images"],
                "decode_s": round(stats["seconds"], 4),
                "decoded_on_event_loop": stats["on_event_loop"],
                "decode_threads": sorted(stats["threads"]),
            }
        else:
            for key in PRIVATE_INFO:
                out.pop(key, None)
        return out

    async def _live_snapshot(self) -> dict[str, Any]:
        """The run folder's live snapshot plus what the model replica serves right now."""
        run_dir = self.settings["run_dir"]
        snap = public_snapshot(await asyncio.to_thread(snapshot, run_dir), run_dir)
        try:
            m = await self._model_info()
            served = {
                "ready": bool(m.get("ready")),
                "model": m.get("model"),
                "soup_version": m.get("soup_version"),
                "detail": m.get("last_error"),
            }
        except ApiError as err:
            served = {"ready": False, "model": None, "soup_version": None, "detail": err.message}
        return with_digest({**snap, "served": served})

    @app.get("/", response_class=HTMLResponse, summary="The live soup page")
    async def live_page(self, request: Request) -> HTMLResponse:
        """An HTML page (inline SVG, no external resources) of the soup, its greedy curve, the test vs shift
        scatter and the trials; it polls ``/soup.json`` and redraws itself when the run folder changes."""
        json_url = str(request.scope.get("root_path") or "").rstrip("/") + "/" + JSON_PATH
        return HTMLResponse(render_page(await self._live_snapshot(), json_url))

    @app.get("/" + JSON_PATH, summary="The live soup page's data")
    async def live_json(self) -> dict[str, Any]:
        """Soup, keeper state, greedy curve, scatter points and trials of the run folder, with a change ``digest``."""
        return await self._live_snapshot()

    @app.get("/healthz", summary="Liveness and readiness", responses={503: ERROR_RESPONSES[503]})
    async def healthz(self) -> JSONResponse:
        """200 while a model is loaded and answers (with its version; ``warning`` when a newer soup version could
        not be loaded and the previous one is still served), 503 while none can be loaded or the replica does not
        answer. Open even when a bearer token is configured."""
        started = time.perf_counter()
        try:
            info = await self._model_info()
        except ApiError as err:
            return JSONResponse(
                {
                    "status": "unavailable",
                    "error": err.code,
                    "detail": err.message,
                    "latency_ms": round(1000 * (time.perf_counter() - started), 2),
                },
                status_code=503,
                headers=self.retry_after,
            )
        body = {
            "status": "ok" if info["ready"] else "loading",
            "model": info.get("model"),
            "soup_version": info.get("soup_version"),
            "latency_ms": round(1000 * (time.perf_counter() - started), 2),
        }
        if not info["ready"]:
            body["error"] = "model_unavailable"
            body["detail"] = info.get("last_error")
            return JSONResponse(body, status_code=503, headers=self.retry_after)
        if info.get("last_error"):
            body["warning"] = info["last_error"]
        return JSONResponse(body, status_code=200)


# ---------------------------------------------------------------- builder


def build_app(args: dict | ServeOptions) -> Application:
    """The application for ``serve run serve/config.yaml`` (``args``: ``soup_ray.serving.ServeOptions``)."""
    opts = args if isinstance(args, ServeOptions) else ServeOptions.model_validate(dict(args or {}))
    from .models import check_model, ensemble_members, resolve_run_dir

    run_dir = str(resolve_run_dir(opts.run_dir))
    device = "cuda" if opts.num_gpus > 0 else "cpu"
    actor = {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus}
    ongoing = opts.model_max_ongoing()
    backpressure = BackpressureConfig(retry_after_s=opts.retry_after_s)  # a full queue: 503 with Retry-After
    queue = {
        "max_ongoing_requests": ongoing,
        "max_queued_requests": opts.max_queued_requests,
        "backpressure_config": backpressure,
        "health_check_period_s": opts.health_check_period_s,
    }
    token_file = None
    if opts.auth_token_file:
        token_file = str(Path(opts.auth_token_file).expanduser().resolve())
        read_token(token_file)  # fail here, before any replica starts, on a missing or empty file

    def spec(model: str, follow: bool, version: int | None, method: str | None = None) -> dict[str, Any]:
        return ModelSpec(
            run_dir=run_dir,
            model=model,
            soup_version=version,
            method=method,
            follow=follow,
            poll_interval_s=opts.poll_interval_s,
            max_batch_size=opts.batch_size(),
            batch_wait_timeout_s=opts.batch_wait_timeout_s,
            device=device,
        ).model_dump()

    served = spec(opts.model, opts.follow, opts.soup_version, opts.method)
    model = None
    if opts.topology == "split":
        model = ClassifierModel.options(
            name="Model", ray_actor_options=actor, num_replicas=opts.model_replicas, **queue, user_config=served
        ).bind()
    check_model(run_dir, opts.model, opts.soup_version, opts.method)
    members = ensemble_members(run_dir, opts.ensemble)
    ensemble = None
    if members:
        handles = [
            ClassifierModel.options(
                name=f"Member{i}", ray_actor_options=actor, **queue, user_config=spec(tid, False, None)
            ).bind()
            for i, tid in enumerate(members)
        ]
        ensemble = Ensemble.options(ray_actor_options={"num_cpus": opts.ingress_cpus}, **queue).bind(handles, members)
    settings = {
        "run_dir": run_dir,
        "max_body_bytes": opts.max_body_bytes,
        "max_pixels": opts.max_pixels,
        "max_decoded_bytes": opts.max_decoded_bytes,
        "body_timeout_s": opts.body_timeout_s,
        "model_timeout_s": opts.model_timeout_s,
        "retry_after_s": opts.retry_after_s,
        "auth_token_file": token_file,
        "members": members,
        "decode_threads": opts.decode_threads,
        "max_batch_images": opts.max_batch_images,
        "max_batch_body_bytes": opts.max_batch_body_bytes,
        "model_max_ongoing": ongoing,
        "model_max_queued": opts.max_queued_requests,
    }
    scale: dict[str, Any] = (
        {"autoscaling_config": dict(opts.ingress_autoscaling)}
        if opts.ingress_autoscaling
        else {"num_replicas": opts.ingress_count(cluster_cpus())}
    )
    resources: dict[str, Any] = {"num_cpus": opts.ingress_cpus}
    if model is None:  # fused: every replica holds the model, with the model's resources and health checks
        resources = {"num_cpus": opts.ingress_cpus + opts.num_cpus, "num_gpus": opts.num_gpus}
        scale = {"num_replicas": opts.model_replicas}
        extra: dict[str, Any] = {"user_config": served, "health_check_period_s": opts.health_check_period_s}
    else:
        extra = {}
    extra.update(
        max_ongoing_requests=max(opts.ingress_max_ongoing_requests, ongoing),
        max_queued_requests=opts.ingress_max_queued_requests,
    )
    return SoupIngress.options(ray_actor_options=resources, **scale, **extra, backpressure_config=backpressure).bind(
        model, ensemble, settings
    )


def cluster_cpus() -> float:
    """The CPUs of the Ray cluster the application is built on (0 when Ray is not initialised here)."""
    try:
        return float(ray.cluster_resources().get("CPU", 0.0)) if ray.is_initialized() else 0.0
    except Exception:  # noqa: BLE001 - sizing only: one replica then
        return 0.0
