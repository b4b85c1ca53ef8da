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
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import ray
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..live import snapshot, with_digest
from ..run_dir import RunDir
from .auth import BearerAuth, read_token
from .images import ACCEPTED_FORMATS, ImageError, image_from_json, load_image, to_model_input, top_predictions
# ``.models`` (torch, open_clip, torchvision: seconds of imports) is imported where a model is loaded, so the
# ingress and ensemble replicas, which hold no model, start without it
if TYPE_CHECKING:
    from .models import LoadedModel
from .options import ModelSpec, ServeOptions
from .page import JSON_PATH, render_page

logger = logging.getLogger("ray.serve")


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

    async def reconfigure(self, user_config: dict) -> None:
        """Apply a new ``ModelSpec``: batching settings at once, a different model loaded then swapped in."""
        from .models import resolve_run_dir

        spec = ModelSpec.model_validate(user_config)
        spec = spec.model_copy(update={"run_dir": str(resolve_run_dir(spec.run_dir)),
                                       "device": self._pick_device(spec.device)})
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
        """Logits for one decoded image (``uint8 [S, S, 3]``); batched with concurrent calls."""
        return await self._predict_batch(image)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        current = self.slot.current  # one model for the whole batch, even if a swap happens meanwhile
        if current is None:
            detail = self.slot.last_error or "the model is still loading"
            return [{"ready": False, "detail": detail} for _ in images]
        logits = await asyncio.to_thread(self._forward, current, images)
        self.largest_batch = max(self.largest_batch, len(images))
        self.batches += 1
        return [{"ready": True, "logits": row, "model": current.name, "soup_version": current.soup_version}
                for row in logits]

    def _forward(self, current: "LoadedModel", images: list[np.ndarray]) -> list[list[float]]:
        import torch

        x = to_model_input(images)
        if x.shape[-1] != current.image_size or x.shape[-2] != current.image_size:
            x = torch.nn.functional.interpolate(x, size=(current.image_size, current.image_size),
                                                mode="bilinear", align_corners=False)
        with torch.inference_mode():
            device = next(current.classifier.parameters()).device
            out = current.classifier(x.to(device)).float().cpu()
        return out.tolist()

    def info(self) -> dict[str, Any]:
        """What this replica serves, its process id and actor name, a rejected soup version, batching statistics."""
        spec = self.slot.spec
        current = self.slot.current
        out: dict[str, Any] = {"ready": current is not None, "pid": os.getpid(), "last_error": self.slot.last_error,
                               "actor": ray.get_runtime_context().get_actor_name(),
                               "rejected": self.slot.rejected, "reloads": self.slot.reloads,
                               "follow": bool(spec and spec.follows_soup()),
                               "batching": {"max_batch_size": spec.max_batch_size if spec else None,
                                            "batch_wait_timeout_s": spec.batch_wait_timeout_s if spec else None,
                                            "largest_batch": self.largest_batch, "batches": self.batches}}
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
        return {"ready": True, "logits": logits.tolist(), "model": "ensemble", "soup_version": None,
                "members": [o["model"] for o in outs]}

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


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: an error code and what was wrong."""

    error: str
    detail: Any = None


# Standard base64 (RFC 4648 section 4, padded), at least one byte, optionally behind a `data:` URL prefix.
BASE64_PATTERN = (r"^(data:image/(png|jpeg);base64,)?([A-Za-z0-9+/]{4})*"
                  r"([A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)$")
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "application/octet-stream")
_BINARY = {"type": "string", "format": "binary", "minLength": 1,
           "description": "The bytes of one PNG or JPEG image (recognised from its first bytes)"}
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "One PNG or JPEG image: a multipart upload in field `file`, the raw bytes "
                       "(image/png, image/jpeg or application/octet-stream), or JSON `{\"image_base64\": \"...\"}`. "
                       "Bytes that are no PNG or JPEG are refused (400 not an image or corrupt, 415 another format).",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"], "additionalProperties": False,
                           "properties": {"file": dict(_BINARY)}},
                "encoding": {"file": {"contentType": "image/png, image/jpeg, application/octet-stream"}},
            },
            **{kind: {"schema": dict(_BINARY)} for kind in IMAGE_MEDIA_TYPES},
            "application/json": {"schema": {
                "type": "object", "required": ["image_base64"],
                "properties": {"image_base64": {
                    "type": "string", "minLength": 4, "pattern": BASE64_PATTERN,
                    "description": "The image's bytes in standard, padded base64 (non-empty), optionally as a "
                                   "`data:image/png;base64,...` URL"}}}},
        },
    }
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse,
          "description": "Empty body, not an image, truncated/corrupt image, malformed JSON or multipart"},
    401: {"model": ErrorResponse, "description": "A bearer token is configured and the request lacks it (or it is "
                                                 "wrong); see the WWW-Authenticate header"},
    408: {"model": ErrorResponse, "description": "The body did not arrive within the configured time"},
    413: {"model": ErrorResponse, "description": "Body larger than the configured limit"},
    415: {"model": ErrorResponse, "description": "An image format other than PNG or JPEG"},
    422: {"model": ErrorResponse, "description": "Too many pixels, too large once decoded, a missing field or an "
                                                 "invalid parameter"},
    503: {"model": ErrorResponse, "description": "The model is not loaded yet, cannot be loaded, is restarting or "
                                                 "is overloaded; retry after the Retry-After header's seconds"},
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
    return JSONResponse({"error": codes.get(exc.status_code, "http_error"), "detail": exc.detail},
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


PRIVATE_INFO = ("pid", "actor", "source", "run_dir", "ingress_pid")  # in /info only with ?detail=local from loopback
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
    trials = [{**t, "soup": public_text(t.get("soup"), run_dir)} if isinstance(t, dict) else t
              for t in snap.get("trials") or []]
    return {**snap, "keeper": keeper, "trials": trials}


RELAY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-host", "true-client-ip",
                 "cf-connecting-ip")
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


async def _awaited(response: Any) -> Any:
    return await response


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body, refused with 413 when its Content-Length or its actual size exceeds ``limit``,
    and with 408 when it has not arrived whole within ``timeout_s`` (a stalled or trickling client)."""
    if timeout_s is not None:
        try:
            return await asyncio.wait_for(read_body(request, limit), timeout_s)
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
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except Exception as err:  # noqa: BLE001 - any parser failure is the client's malformed body
        reason = getattr(err, "detail", err)
        raise ImageError(400, "malformed_multipart", f"the multipart body cannot be parsed: {reason}") from None
    try:
        item = form.get("file")
        if item is None:
            raise ImageError(422, "missing_field", "the multipart body has no 'file' field")
        if isinstance(item, str):
            raise ImageError(422, "invalid_field", "the 'file' field must be a file upload, not text")
        return await item.read()
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


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=100)
@serve.ingress(app)
class SoupIngress:
    """HTTP front: validates and decodes images, then asks the model or the ensemble."""

    def __init__(self, model: DeploymentHandle, ensemble: DeploymentHandle | None, settings: dict[str, Any]) -> None:
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

    async def _call(self, call: Callable[[], Any], what: str, timeout_status: int) -> Any:
        """A handle call awaited at most ``model_timeout_s``; overload, failure and time-out become JSON errors."""
        response = None
        try:
            response = call()
            return await asyncio.wait_for(_awaited(response), self.model_timeout_s)
        except asyncio.TimeoutError:
            cancel = getattr(response, "cancel", None)
            if callable(cancel):
                cancel()
            raise ApiError(timeout_status, "model_timeout", f"the {what} did not answer within "
                           f"{self.model_timeout_s:g}s", self.retry_after) from None
        except BackPressureError as err:  # its queue is full: Serve rejects rather than queue without bound
            raise ApiError(503, "overloaded", f"the {what} is overloaded ({err.message}); retry later",
                           self.retry_after) from None
        except Exception as err:  # noqa: BLE001 - the replica died or is restarting: not the client's fault
            logger.warning("the %s could not answer: %s: %s", what, type(err).__name__, err)
            raise ApiError(503, "model_error", f"the {what} could not answer ({type(err).__name__}); it may be "
                           "restarting", self.retry_after) from None

    async def _answer(self, request: Request, top_k: int, target: DeploymentHandle) -> dict[str, Any]:
        data = await image_bytes(request, self.max_body_bytes, self.body_timeout_s)
        image = await asyncio.to_thread(load_image, data, self.image_size, self.max_pixels, self.max_decoded_bytes)
        what = "ensemble" if target is self.ensemble else "model"
        out = await self._call(lambda: target.predict.remote(image), what, 504)
        if not out.get("ready"):
            detail = public_text(out.get("detail") or "the model is not loaded yet", self.settings["run_dir"])
            raise ApiError(503, "model_unavailable", detail, self.retry_after)
        answer = {"predictions": top_predictions(out["logits"], self.classnames, top_k),
                  "soup_version": out.get("soup_version"), "model": out.get("model")}
        if "members" in out:
            answer["members"] = out["members"]
        return answer

    async def _model_info(self, local: bool = False) -> dict[str, Any]:
        """The model replica's ``info``; its messages without absolute paths unless ``local``."""
        info = dict(await self._call(lambda: self.model.info.remote(), "model replica", 503))
        if not local:
            run_dir = self.settings["run_dir"]
            info["last_error"] = public_text(info.get("last_error"), run_dir)
            if isinstance(info.get("rejected"), dict):
                info["rejected"] = {**info["rejected"], "error": public_text(info["rejected"].get("error"), run_dir)}
        return info

    @app.post("/predict", response_model=PredictionResponse, response_model_exclude_unset=True,
              responses=ERROR_RESPONSES, openapi_extra=IMAGE_BODY, summary="Classify an image with the served model")
    async def predict(self, request: Request,
                      top_k: int = Query(3, ge=1, le=1000, description="How many classes to return")) -> dict[str, Any]:
        """Top-``top_k`` classes of a PNG or JPEG image, with the soup version that answered."""
        return await self._answer(request, top_k, self.model)

    @app.post("/predict/ensemble", response_model=PredictionResponse, response_model_exclude_unset=True,
              responses=ERROR_RESPONSES, openapi_extra=IMAGE_BODY, summary="Classify an image with the ensemble")
    async def predict_ensemble(
        self, request: Request, top_k: int = Query(3, ge=1, le=1000, description="How many classes to return")
    ) -> dict[str, Any]:
        """Top-``top_k`` classes from the mean logits of the ensemble's trial checkpoints."""
        if self.ensemble is None:
            raise ApiError(404, "ensemble_disabled", "no ensemble is configured (ensemble: 0)")
        return await self._answer(request, top_k, self.ensemble)

    @app.get("/info", summary="What is served",
             responses={k: ERROR_RESPONSES[k] for k in (401, 422, 503)})
    async def info(self, request: Request, detail: Literal["local"] | None = Query(
            None, description="`local`: also the run folder, model source, process ids and replica actor name; "
                              "honoured only for a loopback client")) -> dict[str, Any]:
        """Model, soup version, ingredients, held-out accuracy, classes, a rejected soup version, ensemble, limits."""
        local = detail == "local" and is_loopback(request)
        out = await self._model_info(local)
        out["classes"] = out.get("classes") or self.classnames
        out["image_size"] = out.get("image_size") or self.image_size
        out["ensemble"] = {"members": self.settings.get("members", [])} if self.ensemble is not None else None
        out["limits"] = {"max_body_bytes": self.max_body_bytes, "max_pixels": self.max_pixels,
                         "max_decoded_bytes": self.max_decoded_bytes, "body_timeout_s": self.body_timeout_s,
                         "model_timeout_s": self.model_timeout_s, "formats": list(ACCEPTED_FORMATS)}
        out["auth"] = "bearer" if self.auth_token is not None else None
        if local:
            out["run_dir"] = self.settings["run_dir"]
            out["ingress_pid"] = os.getpid()
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
            served = {"ready": bool(m.get("ready")), "model": m.get("model"), "soup_version": m.get("soup_version"),
                      "detail": m.get("last_error")}
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
            return JSONResponse({"status": "unavailable", "error": err.code, "detail": err.message,
                                 "latency_ms": round(1000 * (time.perf_counter() - started), 2)},
                                status_code=503, headers=self.retry_after)
        body = {"status": "ok" if info["ready"] else "loading", "model": info.get("model"),
                "soup_version": info.get("soup_version"),
                "latency_ms": round(1000 * (time.perf_counter() - started), 2)}
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
    queue = {"max_ongoing_requests": ongoing, "max_queued_requests": opts.max_queued_requests,
             "backpressure_config": backpressure, "health_check_period_s": opts.health_check_period_s}
    token_file = None
    if opts.auth_token_file:
        token_file = str(Path(opts.auth_token_file).expanduser().resolve())
        read_token(token_file)  # fail here, before any replica starts, on a missing or empty file

    def spec(model: str, follow: bool, version: int | None, method: str | None = None) -> dict[str, Any]:
        return ModelSpec(run_dir=run_dir, model=model, soup_version=version, method=method, follow=follow,
                         poll_interval_s=opts.poll_interval_s, max_batch_size=opts.max_batch_size,
                         batch_wait_timeout_s=opts.batch_wait_timeout_s, device=device).model_dump()

    model = ClassifierModel.options(name="Model", ray_actor_options=actor, **queue,
                                    user_config=spec(opts.model, opts.follow, opts.soup_version, opts.method)).bind()
    check_model(run_dir, opts.model, opts.soup_version, opts.method)
    members = ensemble_members(run_dir, opts.ensemble)
    ensemble = None
    if members:
        handles = [ClassifierModel.options(name=f"Member{i}", ray_actor_options=actor, **queue,
                                           user_config=spec(tid, False, None)).bind()
                   for i, tid in enumerate(members)]
        ensemble = Ensemble.options(ray_actor_options={"num_cpus": opts.ingress_cpus}, **queue).bind(handles, members)
    settings = {"run_dir": run_dir, "max_body_bytes": opts.max_body_bytes, "max_pixels": opts.max_pixels,
                "max_decoded_bytes": opts.max_decoded_bytes, "body_timeout_s": opts.body_timeout_s,
                "model_timeout_s": opts.model_timeout_s, "retry_after_s": opts.retry_after_s,
                "auth_token_file": token_file, "members": members}
    return SoupIngress.options(ray_actor_options={"num_cpus": opts.ingress_cpus},
                               max_ongoing_requests=max(opts.ingress_max_ongoing_requests, ongoing),
                               max_queued_requests=opts.ingress_max_queued_requests,
                               backpressure_config=backpressure).bind(model, ensemble, settings)
