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
import json
import logging
import os
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..live import snapshot, with_digest
from ..run_dir import RunDir
from .images import ACCEPTED_FORMATS, ImageError, image_from_json, load_image, to_model_input, top_predictions
from .models import LoadedModel, ModelSlot, check_model, ensemble_members, resolve_run_dir
from .options import ModelSpec, ServeOptions
from .page import JSON_PATH, render_page

logger = logging.getLogger("ray.serve")


# ---------------------------------------------------------------- model replicas


@serve.deployment(name="Model", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class ClassifierModel:
    """One classifier (the soup or a trial checkpoint) behind dynamic batching."""

    def __init__(self) -> None:
        self.slot = ModelSlot()
        self._watcher: asyncio.Task | None = None
        self.largest_batch = 0
        self.batches = 0

    async def reconfigure(self, user_config: dict) -> None:
        """Apply a new ``ModelSpec``: batching settings at once, a different model loaded then swapped in."""
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

    def _forward(self, current: LoadedModel, images: list[np.ndarray]) -> list[list[float]]:
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
        """What this replica serves, its process id and batching statistics."""
        spec = self.slot.spec
        current = self.slot.current
        out: dict[str, Any] = {"ready": current is not None, "pid": os.getpid(), "last_error": self.slot.last_error,
                               "reloads": self.slot.reloads,
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


IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "A PNG or JPEG image: a multipart upload in field `file`, the raw bytes, "
                       "or JSON `{\"image_base64\": \"...\"}`.",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                               "properties": {"file": {"type": "string", "format": "binary"}}}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "object", "required": ["image_base64"],
                                            "properties": {"image_base64": {"type": "string", "format": "byte"}}}},
        },
    }
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse,
          "description": "Empty body, not an image, truncated/corrupt image, malformed JSON or multipart"},
    413: {"model": ErrorResponse, "description": "Body larger than the configured limit"},
    415: {"model": ErrorResponse, "description": "An image format other than PNG or JPEG"},
    422: {"model": ErrorResponse, "description": "Too many pixels, a missing field or an invalid parameter"},
    503: {"model": ErrorResponse, "description": "The model is not loaded yet (no soup published)"},
}

app = FastAPI(
    title="soup-ray",
    version="0.1.0",
    description="A greedy model soup of fine-tuned CLIP classifiers, served with Ray Serve. "
                "Send PNG or JPEG images to `/predict` (the soup) or `/predict/ensemble` (mean logits of trials).",
)


class ApiError(Exception):
    """An error answered as ``{"error": code, "detail": message}`` with ``status``."""

    def __init__(self, status: int, code: str, message: Any):
        super().__init__(str(message))
        self.status, self.code, self.message = status, code, message


@app.exception_handler(ImageError)
async def _image_error(request: Request, exc: ImageError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.code, "detail": exc.message}, status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
    return JSONResponse({"error": "invalid_request", "detail": problems}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    return JSONResponse({"error": codes.get(exc.status_code, "http_error"), "detail": exc.detail},
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 when its Content-Length or its actual size exceeds ``limit``."""
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


async def image_bytes(request: Request, limit: int) -> bytes:
    """The image bytes of a request: multipart field ``file``, JSON ``image_base64``, or the raw body."""
    body = await read_body(request, limit)
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

    async def _answer(self, request: Request, top_k: int, target: DeploymentHandle) -> dict[str, Any]:
        data = await image_bytes(request, self.max_body_bytes)
        image = await asyncio.to_thread(load_image, data, self.image_size, self.max_pixels)
        try:
            out = await target.predict.remote(image)
        except Exception as err:  # the model replica failed (not the client's fault)
            raise ApiError(503, "model_error", f"the model could not answer: {type(err).__name__}: {err}") from None
        if not out.get("ready"):
            raise ApiError(503, "model_unavailable", out.get("detail", "the model is not loaded yet"))
        answer = {"predictions": top_predictions(out["logits"], self.classnames, top_k),
                  "soup_version": out.get("soup_version"), "model": out.get("model")}
        if "members" in out:
            answer["members"] = out["members"]
        return answer

    async def _model_info(self) -> dict[str, Any]:
        try:
            return await self.model.info.remote()
        except Exception as err:  # the model replica is down or restarting
            detail = f"the model replica did not answer: {type(err).__name__}: {err}"
            raise ApiError(503, "model_error", detail) from None

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

    @app.get("/info", summary="What is served")
    async def info(self) -> dict[str, Any]:
        """Model, soup version, ingredients, held-out accuracy, classes, replica pid, ensemble and limits."""
        out = dict(await self._model_info())
        out["classes"] = out.get("classes") or self.classnames
        out["image_size"] = out.get("image_size") or self.image_size
        out["ensemble"] = {"members": self.settings.get("members", [])} if self.ensemble is not None else None
        out["limits"] = {"max_body_bytes": self.max_body_bytes, "max_pixels": self.max_pixels,
                         "formats": list(ACCEPTED_FORMATS)}
        out["run_dir"] = self.settings["run_dir"]
        out["ingress_pid"] = os.getpid()
        return out

    async def _live_snapshot(self) -> dict[str, Any]:
        """The run folder's live snapshot plus what the model replica serves right now."""
        snap = await asyncio.to_thread(snapshot, self.settings["run_dir"])
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

    @app.get("/healthz", summary="Liveness and readiness")
    async def healthz(self) -> JSONResponse:
        """200 when the model is loaded (with its version and replica pid), 503 while it is not."""
        started = time.perf_counter()
        info = await self._model_info()
        body = {"status": "ok" if info["ready"] else "loading", "model": info.get("model"),
                "soup_version": info.get("soup_version"), "pid": info["pid"],
                "latency_ms": round(1000 * (time.perf_counter() - started), 2)}
        if not info["ready"]:
            body["error"] = "model_unavailable"
            body["detail"] = info.get("last_error")
        return JSONResponse(body, status_code=200 if info["ready"] else 503)


# ---------------------------------------------------------------- builder


def build_app(args: dict | ServeOptions) -> Application:
    """The application for ``serve run serve/config.yaml`` (``args``: ``soup_ray.serving.ServeOptions``)."""
    opts = args if isinstance(args, ServeOptions) else ServeOptions.model_validate(dict(args or {}))
    run_dir = str(resolve_run_dir(opts.run_dir))
    device = "cuda" if opts.num_gpus > 0 else "cpu"
    actor = {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus}
    ongoing = max(32, 2 * opts.max_batch_size)

    def spec(model: str, follow: bool, version: int | None, method: str | None = None) -> dict[str, Any]:
        return ModelSpec(run_dir=run_dir, model=model, soup_version=version, method=method, follow=follow,
                         poll_interval_s=opts.poll_interval_s, max_batch_size=opts.max_batch_size,
                         batch_wait_timeout_s=opts.batch_wait_timeout_s, device=device).model_dump()

    model = ClassifierModel.options(name="Model", ray_actor_options=actor, max_ongoing_requests=ongoing,
                                    user_config=spec(opts.model, opts.follow, opts.soup_version, opts.method)).bind()
    check_model(run_dir, opts.model, opts.soup_version, opts.method)
    members = ensemble_members(run_dir, opts.ensemble)
    ensemble = None
    if members:
        handles = [ClassifierModel.options(name=f"Member{i}", ray_actor_options=actor, max_ongoing_requests=ongoing,
                                           user_config=spec(tid, False, None)).bind()
                   for i, tid in enumerate(members)]
        ensemble = Ensemble.options(ray_actor_options={"num_cpus": opts.ingress_cpus}).bind(handles, members)
    settings = {"run_dir": run_dir, "max_body_bytes": opts.max_body_bytes, "max_pixels": opts.max_pixels,
                "members": members}
    return SoupIngress.options(ray_actor_options={"num_cpus": opts.ingress_cpus}).bind(model, ensemble, settings)
