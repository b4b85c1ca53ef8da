"""The serving benchmark's one-hop peer: a bare Ray Serve FastAPI deployment that decodes and runs the model itself.

What a user would write in twenty lines without soup-ray's serving layer: one
replica type, FastAPI routes on the replica, the PNG decoded in a worker
thread, ``@serve.batch`` in the same process, the same model and decoding as
the soup's replica. No separate ingress, so every request makes one Serve hop
(proxy to replica) instead of two, and none of soup-ray's limits, time-outs,
authentication or error mapping. The serving benchmark measures it beside the
served soup in the same run: the cost of soup-ray's request path over the bare
minimum.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' parameter types at run time

import asyncio
import os
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from ray import serve

from ..serving.images import load_image, top_predictions
from ..serving.options import CPU_BATCH

app = FastAPI(title="one-hop peer")


@serve.deployment(name="OneHop", max_ongoing_requests=64)
@serve.ingress(app)
class OneHop:
    """The soup, decoding and batching in one replica."""

    def __init__(
        self, run_dir: str, max_batch_size: int = CPU_BATCH, batch_wait_timeout_s: float = 0.01, device: str = "cpu"
    ) -> None:
        from ..serving.models import load_model

        self.loaded = load_model(run_dir, "soup", device=device)
        self.device = device
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    def info(self) -> dict[str, Any]:
        """Its process id (the benchmark reads the replica's CPU time from it)."""
        return {"pid": os.getpid(), "model": "soup"}

    @app.post("/predict")
    async def predict(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        image = await asyncio.to_thread(load_image, body, self.loaded.image_size)
        logits = await self._batch(image)
        return {"predictions": top_predictions(logits, self.loaded.classnames, 3)}

    @serve.batch(max_batch_size=CPU_BATCH, batch_wait_timeout_s=0.01)
    async def _batch(self, images: list[np.ndarray]) -> list[list[float]]:
        return await asyncio.to_thread(self._forward, images)

    def _forward(self, images: list[np.ndarray]) -> list[list[float]]:
        import torch

        x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode():
            return self.loaded.classifier(x.contiguous()).float().cpu().tolist()


def deploy_one_hop(
    run_dir: str,
    num_cpus: float,
    num_gpus: float,
    max_batch_size: int,
    batch_wait_timeout_s: float,
    app_name: str,
    host: str,
    port: int,
    replicas: int = 1,
) -> str:
    """Deploy the peer as ``app_name`` at ``/`` on Serve (started with ``host``/``port`` if it is not running)."""
    serve.start(http_options={"host": host, "port": int(port)})
    device = "cuda" if num_gpus > 0 else "cpu"
    deployment = OneHop.options(ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}, num_replicas=replicas)
    serve.run(
        deployment.bind(run_dir, max_batch_size, batch_wait_timeout_s, device),
        name=app_name,
        route_prefix="/",
        blocking=False,
    )
    return f"http://{host}:{int(port)}"
