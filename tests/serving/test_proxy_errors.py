"""Serve's proxy callback: a request whose replica died before answering gets a JSON 503, not a plain 500."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from soup_ray.serving.proxy_errors import CALLBACK, ERROR_CODE, ReplicaLostAnswer


def call(app: Any, scope_type: str = "http") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(ReplicaLostAnswer(app, retry_after_s="2")({"type": scope_type}, receive, send))
    return sent


async def answers_200(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def answers_nothing(scope: Any, receive: Any, send: Any) -> None:
    """What Serve's proxy does when the replica holding the request died: it returns without an answer."""


async def fails_before_answering(scope: Any, receive: Any, send: Any) -> None:
    raise RuntimeError("the actor died unexpectedly")


async def fails_while_answering(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    raise RuntimeError("the actor died unexpectedly")


@pytest.mark.parametrize("app", [answers_nothing, fails_before_answering])
def test_a_request_left_unanswered_gets_a_json_503_with_retry_after(app: Any) -> None:
    start, body = call(app)
    assert start["type"] == "http.response.start" and start["status"] == 503
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/json" and headers[b"retry-after"] == b"2"
    payload = json.loads(body["body"])
    assert payload["error"] == ERROR_CODE and "retry" in payload["detail"]
    assert int(headers[b"content-length"]) == len(body["body"])


def test_an_answer_passes_unchanged_and_a_failure_after_it_started_is_not_masked() -> None:
    assert [m.get("status") for m in call(answers_200)] == [200, None]
    with pytest.raises(RuntimeError):
        call(fails_while_answering)


def test_non_http_traffic_is_not_touched() -> None:
    assert call(answers_nothing, scope_type="lifespan") == []


def test_serve_loads_the_callback_by_its_import_path_as_the_proxy_does() -> None:
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    middlewares = validate_http_proxy_callback_return(call_function_from_import_path(CALLBACK))
    assert [m.cls for m in middlewares] == [ReplicaLostAnswer]


def test_every_throughput_mode_sets_the_callback_for_the_ray_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from soup_ray.serving.launch import THROUGHPUT_MODES, throughput_mode_env
    from soup_ray.serving.proxy_errors import CALLBACK_ENV

    for mode in THROUGHPUT_MODES:
        if mode == "full":
            continue  # needs HAProxy installed
        monkeypatch.delenv(CALLBACK_ENV, raising=False)
        assert throughput_mode_env(mode, log=lambda m: None)[CALLBACK_ENV] == CALLBACK
