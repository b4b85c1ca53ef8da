"""The HTTP ingress in-process, without Ray: its FastAPI app driven over ASGI against fake model handles.

Timeouts (a stalled body, a stuck model), overload answered 503 with Retry-After, /info without paths or
PIDs unless asked locally, the optional bearer token, and a schema-driven fuzz run of the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")

GUARD_S = 10.0  # no request below may take this long: a hang fails the test instead of stalling the suite
CLASSES = ["zero", "one", "two"]
LOOPBACK, REMOTE = ("127.0.0.1", 40000), ("203.0.113.7", 40000)


# ---------------------------------------------------------------- fakes


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class FakeModel:
    """Stands in for a model DeploymentHandle: ``predict.remote`` / ``info.remote`` return awaitables."""

    def __init__(self, predict: Any = None, info: Any = None) -> None:
        self.predict = _Method(predict or self._predict)
        self.info = _Method(info or self._info)

    @staticmethod
    async def _predict(image: np.ndarray) -> dict[str, Any]:
        assert image.dtype == np.uint8 and image.shape[-1] == 3
        return {"ready": True, "logits": [0.0, 2.0, 1.0], "model": "soup", "soup_version": 4}

    @staticmethod
    async def _info() -> dict[str, Any]:
        return {
            "ready": True,
            "pid": 4242,
            "last_error": None,
            "model": "soup",
            "soup_version": 4,
            "source": "/abs/where/run/soup",
            "classes": CLASSES,
            "image_size": 8,
            "actor": "SERVE_REPLICA::soup-ray#Model#x",
        }


@pytest.fixture()
def fake_run(tmp_path: Path) -> Path:
    """The least of a run folder the ingress reads: ``base/base.json``."""
    base = tmp_path / "run" / "base"
    base.mkdir(parents=True)
    (base / "base.json").write_text(json.dumps({"image_size": 8, "classnames": CLASSES, "fingerprint": "x"}))
    return tmp_path / "run"


def ingress_class() -> type:
    """The user class under Serve's ingress wrapper (its routes take the instance as ``self``)."""
    from soup_ray.serving import app as app_module

    wrapper = app_module.SoupIngress.func_or_class
    return next(c for c in wrapper.__mro__ if "_answer" in vars(c))


def make_ingress(
    run: Path, monkeypatch: pytest.MonkeyPatch, model: Any = None, ensemble: Any = None, **settings: Any
) -> Any:
    """An ingress over fake handles, installed as the current servable object (what Serve's routes look up)."""
    from ray import serve

    from soup_ray.serving import ServeOptions

    opts = ServeOptions(run_dir=str(run), ensemble=0)
    base = {
        "run_dir": str(run),
        "max_body_bytes": opts.max_body_bytes,
        "max_pixels": opts.max_pixels,
        "max_decoded_bytes": opts.max_decoded_bytes,
        "body_timeout_s": opts.body_timeout_s,
        "model_timeout_s": opts.model_timeout_s,
        "retry_after_s": opts.retry_after_s,
        "auth_token_file": None,
        "members": ["t000", "t001"] if ensemble is not None else [],
    }
    base.update(settings)
    ingress = ingress_class()(model or FakeModel(), ensemble, base)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=ingress))
    return ingress


async def _request(method: str, path: str, client: tuple[str, int], **kw: Any) -> Any:
    from soup_ray.serving.app import app

    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://soup.test") as c:
        return await asyncio.wait_for(c.request(method, path, **kw), GUARD_S)


def call(method: str, path: str, client: tuple[str, int] = REMOTE, **kw: Any) -> Any:
    return asyncio.run(_request(method, path, client, **kw))


def png(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), 200, np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- the plain path


def test_predict_and_info_answer_over_asgi(fake_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_ingress(fake_run, monkeypatch)
    r = call("POST", "/predict?top_k=2", content=png(), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["label"] for p in body["predictions"]] == ["one", "two"] and body["soup_version"] == 4
    by_json = call("POST", "/predict", json={"image_base64": base64.b64encode(png()).decode()})
    assert by_json.status_code == 200 and by_json.json()["predictions"][0]["label"] == "one"


def test_server_timing_says_where_the_time_went_and_decoding_is_off_the_event_loop(
    fake_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def timed(image: np.ndarray) -> dict[str, Any]:
        return {
            "ready": True,
            "logits": [0.0, 2.0, 1.0],
            "model": "soup",
            "soup_version": 4,
            "wait_ms": 2.0,
            "forward_ms": 5.0,
            "batch": 3,
            "replica": "m1",
        }

    ingress = make_ingress(fake_run, monkeypatch, model=FakeModel(predict=timed), decode_threads=3)
    ingress.replica = "i1"
    r = call("POST", "/predict", content=png(), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    parts = dict(p.split(";dur=") for p in r.headers["server-timing"].split(", "))
    assert set(parts) == {"read", "decode", "model_call", "hops", "batch_wait", "forward", "ingress"}
    assert float(parts["batch_wait"]) == 2.0 and float(parts["forward"]) == 5.0
    assert float(parts["ingress"]) >= float(parts["model_call"]) + float(parts["decode"])
    assert "served_by" not in r.json()  # which replicas answered: only for a loopback client that asks
    local = call(
        "POST", "/predict?detail=local", client=LOOPBACK, content=png(), headers={"content-type": "image/png"}
    ).json()
    assert local["served_by"] == {"ingress": "i1", "model": "m1"}
    info = call("GET", "/info?detail=local", client=LOOPBACK).json()["ingress"]
    assert info["decoded"] == 2 and info["decoded_on_event_loop"] == 0
    assert info["decode_threads"] and all(t.startswith("soup-ray-decode") for t in info["decode_threads"])
    assert "ingress" not in call("GET", "/info").json()


def test_a_batch_answers_each_image_in_order_and_a_bad_one_gets_its_own_error(
    fake_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_ingress(fake_run, monkeypatch, max_body_bytes=2000, max_batch_images=4)
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, "GIF")
    files = [
        ("file", (f"{i}", data, "image/png")) for i, data in enumerate([png(), b"not an image", png(), gif.getvalue()])
    ]
    r = call("POST", "/predict/batch?top_k=1", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] == 2 and body["failed"] == 2 and [x["index"] for x in body["results"]] == [0, 1, 2, 3]
    assert body["results"][0]["predictions"][0]["label"] == "one" and body["results"][0]["soup_version"] == 4
    assert (body["results"][1]["error"], body["results"][1]["status"]) == ("not_an_image", 400)
    assert (body["results"][3]["error"], body["results"][3]["status"]) == ("unsupported_image_type", 415)
    # JSON: one entry that is not base64 and one over the per-image limit are their own errors
    big = base64.b64encode(png(64) + b"\0" * 3000).decode()
    r = call("POST", "/predict/batch", json={"images_base64": [base64.b64encode(png()).decode(), "!!", big]})
    assert r.status_code == 200, r.text
    errors = [x.get("error") for x in r.json()["results"]]
    assert errors == [None, "invalid_base64", "body_too_large"]
    # the request as a whole: too many images, nothing usable, the wrong kind of body
    assert (
        call("POST", "/predict/batch", files=[("file", (str(i), png(), "image/png")) for i in range(5)]).json()["error"]
        == "too_many_images"
    )
    assert (
        call("POST", "/predict/batch", json={"images_base64": [png().hex()] * 5}).json()["error"] == "too_many_images"
    )
    for kw, status, code in [
        ({"json": {"images_base64": []}}, 422, "invalid_field"),
        ({"json": {"image_base64": "AAAA"}}, 422, "missing_field"),
        ({"content": png(), "headers": {"content-type": "image/png"}}, 415, "unsupported_media_type"),
        (
            {"files": [("file", ("a", png(), "image/png")), ("other", ("b", png(), "image/png"))]},
            422,
            "unexpected_field",
        ),
    ]:
        r = call("POST", "/predict/batch", **kw)
        assert (r.status_code, r.json()["error"]) == (status, code), (kw, r.text)


def test_a_batch_the_model_cannot_answer_is_a_503(fake_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def unready(image: np.ndarray) -> dict[str, Any]:
        return {"ready": False, "detail": "the model is still loading"}

    make_ingress(fake_run, monkeypatch, model=FakeModel(predict=unready))
    r = call("POST", "/predict/batch", files=[("file", ("a", png(), "image/png"))] * 2)
    assert r.status_code == 503 and r.json()["error"] == "model_unavailable" and "retry-after" in r.headers
    # a bad image beside them is still the client's own error: the batch answers what it can say
    r = call("POST", "/predict/batch", files=[("file", ("a", png(), "image/png")), ("file", ("b", b"x", "image/png"))])
    assert r.status_code == 200 and [x["status"] for x in r.json()["results"]] == [503, 400]


# ---------------------------------------------------------------- timeouts and overload


def test_a_stalled_request_body_times_out_with_a_408(fake_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends part of its body and stops holds no ingress slot for longer than body_timeout_s."""
    from soup_ray.serving.app import app

    make_ingress(fake_run, monkeypatch, body_timeout_s=0.3)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not sent:
            sent.append({})
            return {"type": "http.request", "body": png()[:10], "more_body": True}
        await asyncio.sleep(3600)  # the rest never comes
        return {"type": "http.disconnect"}

    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"soup.test"), (b"content-type", b"image/png"), (b"content-length", b"500")],
        "client": REMOTE,
        "server": ("soup.test", 80),
    }

    async def run() -> None:
        await asyncio.wait_for(app(scope, receive, send), GUARD_S)

    asyncio.run(run())
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    assert start["status"] == 408, body
    assert json.loads(body)["error"] == "body_timeout"


def test_a_stuck_model_replica_gets_a_504_and_healthz_a_503(fake_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def stuck(*args: Any) -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {}

    make_ingress(fake_run, monkeypatch, model=FakeModel(predict=stuck, info=stuck), model_timeout_s=0.3)
    r = call("POST", "/predict", content=png())
    assert r.status_code == 504 and r.json()["error"] == "model_timeout"
    assert r.headers.get("retry-after") == "1"
    h = call("GET", "/healthz")
    assert h.status_code == 503 and h.json()["error"] == "model_timeout"
    assert call("GET", "/info").status_code == 503


def _backpressure() -> Exception:
    from ray.serve.exceptions import BackPressureError

    return BackPressureError(num_queued_requests=9, max_queued_requests=8, retry_after_s=2.0)


@pytest.mark.parametrize("failure, code", [("backpressure", "overloaded"), ("replica_died", "model_error")])
def test_an_overloaded_or_failing_model_is_a_json_503_with_retry_after(
    fake_run: Path, monkeypatch: pytest.MonkeyPatch, failure: str, code: str
) -> None:
    from ray.exceptions import RayActorError

    async def fail(*args: Any) -> dict[str, Any]:
        if failure == "backpressure":
            raise _backpressure()
        raise RayActorError(error_msg=f'The actor died. Traceback: File "{fake_run}/x.py", line 1')

    make_ingress(fake_run, monkeypatch, model=FakeModel(predict=fail), retry_after_s=3.0)
    r = call("POST", "/predict", content=png())
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"] == code and r.json()["detail"]
    assert r.headers.get("retry-after") == "3"
    assert str(fake_run) not in r.text  # no traceback or path of the replica in the answer


def test_the_ensemble_maps_backpressure_the_same_way(fake_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def fail(*args: Any) -> dict[str, Any]:
        raise _backpressure()

    make_ingress(fake_run, monkeypatch, ensemble=FakeModel(predict=fail))
    r = call("POST", "/predict/ensemble", content=png())
    assert r.status_code == 503 and r.json()["error"] == "overloaded" and r.headers.get("retry-after")


def test_an_unready_model_is_503_with_retry_after(fake_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def unready(*args: Any) -> dict[str, Any]:
        return {"ready": False, "detail": f"soup version 2 in {fake_run}/soup cannot be loaded (truncated)"}

    async def info() -> dict[str, Any]:
        return {
            "ready": False,
            "pid": 1,
            "last_error": f"soup version 2 in {fake_run}/soup cannot be loaded",
            "model": "soup",
        }

    make_ingress(fake_run, monkeypatch, model=FakeModel(predict=unready, info=info))
    r = call("POST", "/predict", content=png())
    assert r.status_code == 503 and r.json()["error"] == "model_unavailable" and r.headers.get("retry-after")
    h = call("GET", "/healthz")
    assert h.status_code == 503 and "cannot be loaded" in h.json()["detail"]
    assert str(fake_run) not in h.text and str(fake_run) not in r.text


# ---------------------------------------------------------------- what /info tells whom


def test_info_hides_paths_and_pids_unless_asked_for_locally(fake_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_ingress(fake_run, monkeypatch)
    for client, query in [(REMOTE, ""), (REMOTE, "?detail=local"), (LOOPBACK, "")]:
        r = call("GET", "/info" + query, client=client)
        assert r.status_code == 200, r.text
        info = r.json()
        assert not {"pid", "ingress_pid", "run_dir", "source", "actor"} & set(info), (client, query, info)
        assert str(fake_run) not in r.text and "/abs/where" not in r.text
        assert info["soup_version"] == 4 and info["classes"] == CLASSES
    local = call("GET", "/info?detail=local", client=LOOPBACK).json()
    assert local["pid"] == 4242 and local["ingress_pid"] == os.getpid()
    assert local["run_dir"] == str(fake_run) and local["source"] == "/abs/where/run/soup"
    health = call("GET", "/healthz")
    assert health.status_code == 200 and "pid" not in health.json()


# ---------------------------------------------------------------- bearer token


@pytest.fixture()
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("s3cret-token-0123456789\n")
    return path


def test_a_token_guards_every_endpoint_but_healthz(
    fake_run: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import soup_ray.serving.auth as auth

    compared: list[int] = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    make_ingress(fake_run, monkeypatch, auth_token_file=str(token_file))
    good = {"authorization": "Bearer s3cret-token-0123456789"}
    for method, path in [
        ("POST", "/predict"),
        ("GET", "/info"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("POST", "/predict/ensemble"),
        ("GET", "/nowhere"),
    ]:
        kw = {"content": png()} if method == "POST" else {}
        r = call(method, path, **kw)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"] == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")
        wrong = call(method, path, headers={"authorization": "Bearer s3cret-token-0123456780"}, **kw)
        assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_token"
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        basic = call(method, path, headers={"authorization": "Basic czNjcmV0"}, **kw)
        assert basic.status_code == 401
    assert compared, "the token is compared with hmac.compare_digest"
    assert call("POST", "/predict", content=png(), headers=good).status_code == 200
    assert call("GET", "/info", headers=good).status_code == 200
    assert call("GET", "/healthz").status_code == 200  # open: load balancers and probes carry no token


def test_token_files_that_cannot_be_used_are_refused(tmp_path: Path, fake_run: Path) -> None:
    from soup_ray.serving.app import build_app
    from soup_ray.serving.auth import AuthTokenError, read_token

    empty = tmp_path / "empty"
    empty.write_text("  \n")
    spaced = tmp_path / "spaced"
    spaced.write_text("two words\n")
    for path, match in [(tmp_path / "missing", "cannot be read"), (empty, "empty"), (spaced, "printable")]:
        with pytest.raises(AuthTokenError, match=match):
            read_token(path)
        with pytest.raises(AuthTokenError, match=match):
            build_app({"run_dir": str(fake_run), "ensemble": 0, "auth_token_file": str(path)})


def test_build_app_bounds_every_queue_and_passes_the_token_file_not_the_token(fake_run: Path, token_file: Path) -> None:
    from soup_ray.serving.app import build_app

    common = {
        "run_dir": str(fake_run),
        "ensemble": 0,
        "auth_token_file": str(token_file),
        "max_queued_requests": 7,
        "retry_after_s": 2,
    }
    split = build_app({**common, "topology": "split"})._bound_deployment
    model = split.init_args[0]._bound_deployment
    assert model.max_queued_requests == 7 and model.max_ongoing_requests == 32
    assert split.max_queued_requests > 0 and split.max_ongoing_requests >= model.max_ongoing_requests
    # fused (the default): the HTTP replicas hold the model, with its health checks; the model's own queue
    # bounds are kept inside the replica (a JSON 503, as the split model deployment's handle gives)
    fused = build_app(common)._bound_deployment
    assert fused.init_args[0] is None and fused._deployment_config.user_config["model"] == "soup"
    assert fused.init_args[2]["model_max_queued"] == 7 and fused.init_args[2]["model_max_ongoing"] == 32
    assert fused.max_queued_requests > 0 and fused.max_ongoing_requests >= 32
    for d in (split, model, fused):
        assert d._deployment_config.backpressure_config.retry_after_s == 2
    for d in (model, fused):
        assert d._deployment_config.health_check_period_s == 2.0  # a dead replica is noticed in seconds
    for ingress in (split, fused):
        settings = ingress.init_args[2]
        assert settings["auth_token_file"] == str(token_file)
        assert "s3cret" not in json.dumps(settings, default=str)  # the secret never travels in a deployment config


def test_servers_bind_loopback_unless_told() -> None:
    import inspect

    import yaml

    from soup_ray import cli
    from soup_ray.jobs import run_job
    from soup_ray.live_page import start_live_page
    from soup_ray.serving import serve_run

    for fn in (serve_run, run_job, start_live_page):
        assert inspect.signature(fn).parameters["host"].default == "127.0.0.1", fn.__name__
    parser = cli.build_parser()
    for argv in (["serve", "RUN_DIR"], ["run", "CONFIG.yaml"]):
        assert parser.parse_args(argv).host == "127.0.0.1", argv
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "serve" / "config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"


# ---------------------------------------------------------------- the OpenAPI document, fuzzed

# Refusals a schema-valid request may still get: what the schema cannot say about the bytes of an image.
CONTENT_REFUSALS = {"not_an_image", "corrupt_image", "unsupported_image_type", "too_many_pixels", "too_large_decoded"}
FUZZ_EXAMPLES = 25  # per operation and mode: the whole run stays well under 30 s


def test_the_schema_says_what_is_accepted(fake_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from soup_ray.serving.app import BASE64_PATTERN, app

    make_ingress(fake_run, monkeypatch)
    spec = app.openapi()
    body = spec["paths"]["/predict"]["post"]["requestBody"]
    assert body["required"] is True
    content = body["content"]
    assert set(content) == {
        "multipart/form-data",
        "image/png",
        "image/jpeg",
        "application/octet-stream",
        "application/json",
    }
    b64 = content["application/json"]["schema"]["properties"]["image_base64"]
    assert b64["minLength"] >= 4 and b64["pattern"] == BASE64_PATTERN
    import re

    for good in ["AAAA", "iVBORw0KGgo=", "/w==", "data:image/png;base64,AAAA"]:
        assert re.fullmatch(BASE64_PATTERN, good), good
    for bad in ["", "=", "AAA", "!!!!", "AA=A", "data:image/png;base64,"]:
        assert not re.fullmatch(BASE64_PATTERN, bad), bad
    assert content["multipart/form-data"]["schema"]["additionalProperties"] is False
    assert all(content[k]["schema"]["minLength"] == 1 for k in ("image/png", "image/jpeg", "application/octet-stream"))
    responses = spec["paths"]["/predict"]["post"]["responses"]
    assert {"200", "400", "401", "408", "413", "415", "422", "503", "504"} <= set(responses)


@pytest.mark.slow  # runs long on its own: the full suite only
def test_a_schema_driven_fuzz_run_finds_no_server_error_and_no_wrongly_refused_request(
    fake_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import checks
    from schemathesis.generation import GenerationMode

    from soup_ray.serving.app import app

    make_ingress(fake_run, monkeypatch, ensemble=FakeModel())
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    refused: list[str] = []

    def refused_only_for_image_content(ctx: Any, response: Any, case: Any) -> bool:
        """A schema-valid request is answered, or refused only for what its image bytes are."""
        if case.meta is not None and case.meta.generation.mode != GenerationMode.POSITIVE:
            return True
        if 400 <= response.status_code < 500:
            code = json.loads(response.content or b"{}").get("error")
            if code not in CONTENT_REFUSALS:
                refused.append(f"{case.method} {case.path} {case.media_type}: {response.status_code} {code}")
                raise AssertionError(f"a schema-valid request was refused: {response.status_code} {code}")
        return True

    wanted = [
        checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_schema_conformance,
        checks.negative_data_rejection,
    ]
    ran = {"calls": 0, "operations": 0}
    timings: dict[str, float] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        ran["operations"] += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=FUZZ_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case: Any) -> None:
                response = case.call()
                ran["calls"] += 1
                case.validate_response(response, checks=wanted, additional_checks=[refused_only_for_image_content])

            started = time.perf_counter()
            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid (no parameter, no body): negative mode has no case
                assert mode == GenerationMode.NEGATIVE, operation.label
            timings[f"{operation.label} {mode.value}"] = round(time.perf_counter() - started, 2)
    print(timings)
    assert ran["operations"] >= 4 and ran["calls"] >= 4 * FUZZ_EXAMPLES, ran
    assert not refused


@pytest.mark.parametrize(
    "header",
    [{"x-forwarded-for": "203.0.113.7"}, {"forwarded": "for=203.0.113.7"}, {"x-real-ip": "203.0.113.7"}],
    ids=lambda h: next(iter(h)),
)
def test_a_request_relayed_by_a_proxy_on_this_host_is_not_local(
    fake_run: Path, monkeypatch: pytest.MonkeyPatch, header: dict
) -> None:
    """Behind a reverse proxy on the same host every client connects from loopback: the relay headers tell."""
    make_ingress(fake_run, monkeypatch)
    r = call("GET", "/info?detail=local", client=LOOPBACK, headers=header)
    assert r.status_code == 200, r.text
    assert not {"pid", "ingress_pid", "run_dir", "source", "actor"} & set(r.json())
    assert str(fake_run) not in r.text and "/abs/where" not in r.text


def test_the_live_page_shows_rejection_reasons_without_paths_as_info_does(
    fake_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from soup_ray.run_dir import RunDir

    paths = RunDir(fake_run)
    paths.state_dir.mkdir(parents=True)
    reasons = {
        "t009": f"unreadable checkpoint {fake_run}/tune/t009/model.safetensors: truncated",
        "t010": "no model.safetensors in /mnt/shared/elsewhere/t010 (yet)",
    }
    paths.state_file.write_text(json.dumps({"records": {}, "rejected": reasons, "version": 0, "soup": {}}))
    paths.results.write_text(
        "".join(
            json.dumps({"trial_id": t, "kind": "individual", "status": "completed", "heldout": 0.5}) + "\n"
            for t in reasons
        )
    )
    make_ingress(fake_run, monkeypatch)
    for path in ("/soup.json", "/"):
        r = call("GET", path)
        assert r.status_code == 200, r.text
        assert str(fake_run) not in r.text and "/mnt/shared" not in r.text, path
        assert "unreadable checkpoint" in r.text and "truncated" in r.text  # the reason itself stays
    page = call("GET", "/soup.json").json()
    assert page["keeper"]["rejected"]["t009"] == "unreadable checkpoint RUN_DIR/tune/t009/model.safetensors: truncated"
    assert (
        next(t for t in page["trials"] if t["trial_id"] == "t010")["soup"] == "rejected: no model.safetensors in "
        "<path> (yet)"
    )
