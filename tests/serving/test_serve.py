"""The Ray Serve application on a real local Ray: predictions, ensemble, bad input, live soup updates."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, features

from soup_ray.serving import (
    ImageError,
    ServeOptions,
    decode_image,
    load_image,
    load_model,
    to_model_input,
    top_predictions,
)

ROOT = Path(__file__).resolve().parents[2]

httpx = pytest.importorskip("httpx")

# Ray Serve's own config models use a pydantic idiom that warns on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")

N_IMAGES = 20
REQUEST_TIMEOUT_S = 30.0
LIVE_WAIT_S = 30.0
FIXTURE_MAX_PIXELS = 1024 * 1024


# ---------------------------------------------------------------- helpers


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def digit_images(kitchen: Any, n: int) -> tuple[list[bytes], torch.Tensor]:
    """The first ``n`` test digits as PNG bytes (even: grey ``L``, odd: ``RGB``) and their labels."""
    x, y = kitchen.bundle.test.tensors
    out = []
    for i in range(n):
        arr = (x[i].permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr[:, :, 0], "L") if i % 2 == 0 else Image.fromarray(arr, "RGB")
        out.append(png_bytes(img))
    return out, y[:n]


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels but carries (almost) no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def in_process_probs(model: torch.nn.Module, images: list[bytes], size: int) -> torch.Tensor:
    """Softmax probabilities of ``model`` on the images decoded exactly as the server decodes them."""
    x = to_model_input([load_image(b, size) for b in images])
    with torch.no_grad():
        return torch.softmax(model(x).float(), dim=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post_all(client: Any, path: str, bodies: list[dict[str, Any]], workers: int = 8) -> list[Any]:
    """POST every request concurrently (bounded: one timeout per request, one for the whole set)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(client.post, path, **b) for b in bodies]
        return [f.result(timeout=REQUEST_TIMEOUT_S * 2) for f in futures]


# ---------------------------------------------------------------- decoding (no server)


def test_load_image_grey_and_rgb_give_the_same_input_and_keep_white_on_black() -> None:
    arr = np.zeros((8, 8), np.uint8)
    arr[2:6, 3:5] = 255
    grey = load_image(png_bytes(Image.fromarray(arr, "L")), 32)
    rgb = load_image(png_bytes(Image.fromarray(np.stack([arr] * 3, -1), "RGB")), 32)
    assert grey.shape == (32, 32, 3) and grey.dtype == np.uint8
    assert np.array_equal(grey, rgb)
    assert grey[0, 0].tolist() == [0, 0, 0] and grey[16, 16].max() > 200  # no inversion
    expect = np.asarray(Image.fromarray(arr, "L").resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(grey[:, :, 0], expect)
    t = decode_image(png_bytes(Image.fromarray(arr, "L")), 32)
    assert t.shape == (3, 32, 32) and float(t.min()) >= 0.0 and float(t.max()) <= 1.0


def test_load_image_rescales_16_bit_grey_and_drops_alpha() -> None:
    arr16 = np.full((4, 4), 65535, np.uint16)
    arr16[0, 0] = 0
    out = load_image(png_bytes(Image.fromarray(arr16)), 4)
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    assert load_image(png_bytes(Image.fromarray(rgba, "RGBA")), 4)[0, 0].tolist() == [200, 0, 0]


@pytest.mark.parametrize(
    "case, status, code",
    [
        ("empty", 400, "empty_body"),
        ("text", 400, "not_an_image"),
        ("truncated_png", 400, "corrupt_image"),
        ("truncated_jpeg", 400, "corrupt_image"),
        ("gif", 415, "unsupported_image_type"),
        ("bmp", 415, "unsupported_image_type"),
        ("tiff", 415, "unsupported_image_type"),
        ("huge_header", 422, "too_many_pixels"),
        ("pillow_bomb", 422, "too_many_pixels"),
    ],
)
def test_load_image_refuses_bad_input_with_a_status(case: str, status: int, code: str) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    limit = 4096 * 4096
    data = {
        "empty": lambda: b"",
        "text": lambda: b"hello, this is not an image",
        "truncated_png": lambda: png_bytes(noise)[: len(png_bytes(noise)) // 2],
        "truncated_jpeg": lambda: encode(noise, "JPEG")[: len(encode(noise, "JPEG")) * 3 // 5],
        "gif": lambda: encode(noise, "GIF"),
        "bmp": lambda: encode(noise, "BMP"),
        "tiff": lambda: encode(noise, "TIFF"),
        "huge_header": lambda: header_only_png(100_000, 100_000),
        "pillow_bomb": lambda: header_only_png(20_000, 20_000),
    }[case]()
    if case == "pillow_bomb":
        limit = 10**12  # our limit is off: Pillow's own DecompressionBombError must still become a 422
    with pytest.raises(ImageError) as err:
        load_image(data, 32, max_pixels=limit)
    assert (err.value.status, err.value.code) == (status, code)
    assert err.value.to_json()["detail"]


def test_top_predictions_are_sorted_softmax_probabilities() -> None:
    logits = [0.0, 3.0, 1.0]
    out = top_predictions(logits, ["a", "b", "c"], 5)
    assert [p["label"] for p in out] == ["b", "c", "a"]
    ref = torch.softmax(torch.tensor(logits), 0)
    assert [p["probability"] for p in out] == pytest.approx([ref[1].item(), ref[2].item(), ref[0].item()])
    assert len(top_predictions(logits, ["a", "b", "c"], 1)) == 1


def test_config_yaml_is_a_valid_serve_config_naming_the_builder(small_run: Path, monkeypatch) -> None:
    import importlib

    monkeypatch.syspath_prepend(str(ROOT))  # `serve run serve/config.yaml` runs from the repository root
    import yaml
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    app_cfg = schema.applications[0]
    assert cfg["http_options"]["host"] == "127.0.0.1"
    module, attr = app_cfg.import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    args = dict(app_cfg.args, run_dir=str(small_run))
    ServeOptions.model_validate(args)
    from ray.serve import Application

    assert isinstance(builder(args), Application)
    with pytest.raises(Exception, match="run_dir"):
        builder({"run_dir": str(small_run / "missing")})
    with pytest.raises(Exception, match="max_batch_siz"):
        builder({"run_dir": str(small_run), "max_batch_siz": 4})
    with pytest.raises(ValueError, match="neither 'soup'"):
        builder({"run_dir": str(small_run), "model": "no-such-trial"})
    with pytest.raises(ValueError, match="soup version 7"):
        builder({"run_dir": str(small_run), "soup_version": 7})


def test_model_slot_pins_follows_and_swaps_whole_models(small_run: Path, tmp_path: Path) -> None:
    """What a replica's ``reconfigure`` and watcher do, without Serve: pin a version, follow, swap."""
    import asyncio

    from soup_ray.cluster.keeper import SoupKeeper
    from soup_ray.export import export_soup
    from soup_ray.ingredients import trial_records_from_results
    from soup_ray.serving import ModelSlot, ModelSpec

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    keeper = SoupKeeper(str(run), tie=">")
    for rec in trial_records_from_results(run):
        keeper.offer(rec.to_json())
    keeper.process_inbox()
    v1 = keeper.status()["version"]
    ids2 = sorted(keeper.kitchen.paths)[:2]
    if ids2 == sorted(keeper.status()["ingredients"]):
        ids2 = sorted(keeper.kitchen.paths)[1:3]
    x = to_model_input([np.zeros((32, 32, 3), np.uint8)])

    async def scenario() -> dict[str, Any]:
        slot = ModelSlot()
        seen: dict[str, Any] = {}
        assert await slot.configure(ModelSpec(run_dir=str(run), soup_version=v1))
        seen["pinned"] = slot.current
        assert not await slot.refresh()  # a pinned version is not followed
        assert not await slot.configure(ModelSpec(run_dir=str(run), soup_version=v1, max_batch_size=2))
        assert slot.current is seen["pinned"]  # batching-only change: nothing reloaded
        assert await slot.configure(ModelSpec(run_dir=str(run)))  # follow RUN_DIR/soup
        assert not await slot.refresh()  # nothing new published
        export_soup(
            run / "base",
            keeper.kitchen.soup_weights(ids2),
            run / "soup",
            {"version": v1 + 1, "ingredients": ids2, "heldout_accuracy": None},
        )
        before = slot.current
        assert await slot.refresh()
        seen["before"], seen["after"] = before, slot.current
        empty = ModelSlot()
        assert not await empty.configure(ModelSpec(run_dir=str(run / "nowhere")))  # no soup yet: wait
        seen["empty"] = (empty.current, empty.last_error)
        with pytest.raises(ValueError, match="neither"):
            await ModelSlot().configure(ModelSpec(run_dir=str(run), model="no-such-trial"))
        return seen

    seen = asyncio.run(scenario())
    assert seen["pinned"].soup_version == v1 and seen["before"].soup_version == v1
    after = seen["after"]
    assert after.soup_version == v1 + 1 and after.ingredients == ids2 and after is not seen["before"]
    with torch.no_grad():
        old, new = seen["before"].classifier(x), after.classifier(x)
    assert not torch.allclose(old, new)  # the old object was not modified in place: whole models swapped
    assert seen["empty"][0] is None and "no soup published" in seen["empty"][1]


# ---------------------------------------------------------------- the served application


@pytest.fixture(scope="module")
def served(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A copy of the finished run with a published soup, served once on a free loopback port."""
    import ray
    from ray import serve

    from soup_ray.cluster.keeper import SoupKeeper
    from soup_ray.ingredients import trial_records_from_results
    from soup_ray.serving import serve_run

    run = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(small_run, run)
    keeper = SoupKeeper(str(run), tie=">")
    for rec in trial_records_from_results(run):
        keeper.offer(rec.to_json())
    keeper.process_inbox()
    assert (run / "soup" / "soup.json").is_file()

    from soup_ray.serving.launch import DEFAULT_THROUGHPUT_MODE, PROXY_ENV, THROUGHPUT_MODES, throughput_mode_env

    started = not ray.is_initialized()
    saved = {k: os.environ.get(k) for k in {**THROUGHPUT_MODES[DEFAULT_THROUGHPUT_MODE], **PROXY_ENV}}
    if started:  # the throughput mode `soup-ray serve` starts its own Ray with: every test here runs under it
        throughput_mode_env(DEFAULT_THROUGHPUT_MODE)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
            log_to_driver=False,
        )
        for k, v in saved.items():  # the Ray started has it; later tests of this process start from scratch
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    port = free_port()
    try:
        url = serve_run(
            run,
            host="127.0.0.1",
            port=port,
            blocking=False,
            log=lambda m: None,
            ensemble=2,
            poll_interval_s=0.5,
            num_cpus=0.2,
            ingress_cpus=0.1,
            max_batch_size=8,
            batch_wait_timeout_s=0.05,
            max_pixels=FIXTURE_MAX_PIXELS,
        )
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
            yield {"url": url, "run": run, "keeper": keeper, "kitchen": keeper.kitchen, "client": client}
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


@pytest.mark.slow
def test_predict_matches_the_exported_soup_in_process(served: dict[str, Any]) -> None:
    from soup_ray.export import load_soup

    client, run = served["client"], served["run"]
    pngs, labels = digit_images(served["kitchen"], N_IMAGES)
    soup, info = load_soup(run / "soup")
    probs = in_process_probs(soup, pngs, info["image_size"])
    requests = [{"files": {"file": (f"{i}.png", b, "image/png")}} for i, b in enumerate(pngs)]
    requests += [{"content": b, "headers": {"content-type": "image/png"}} for b in pngs]
    responses = post_all(client, "/predict", requests)
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "soup" and body["soup_version"] == info["version"]
        preds = body["predictions"]
        k = i % N_IMAGES
        assert len(preds) == 3 and preds[0]["index"] == int(probs[k].argmax())
        assert preds[0]["label"] == info["classnames"][preds[0]["index"]]
        for p in preds:
            assert p["probability"] == pytest.approx(float(probs[k, p["index"]]), abs=1e-5)
        assert [p["probability"] for p in preds] == sorted((p["probability"] for p in preds), reverse=True)
    # batching happened under concurrent load
    assert client.get("/info").json()["batching"]["largest_batch"] >= 2
    # JSON base64 and JPEG bodies go through the same decoding
    jpeg = encode(Image.open(io.BytesIO(pngs[1])), "JPEG", quality=95)
    by_json = client.post("/predict?top_k=10", json={"image_base64": base64.b64encode(pngs[0]).decode()})
    by_jpeg = client.post("/predict", content=jpeg, headers={"content-type": "image/jpeg"})
    assert by_json.status_code == 200 and len(by_json.json()["predictions"]) == 10
    assert by_json.json()["predictions"][0]["probability"] == pytest.approx(float(probs[0].max()), abs=1e-5)
    jpeg_probs = in_process_probs(soup, [jpeg], info["image_size"])[0]
    assert by_jpeg.status_code == 200
    assert by_jpeg.json()["predictions"][0]["index"] == int(jpeg_probs.argmax())


@pytest.mark.slow
def test_info_healthz_and_docs_answer(served: dict[str, Any]) -> None:
    client, keeper = served["client"], served["keeper"]
    st = keeper.status()
    public = client.get("/info")
    info = public.json()
    assert info["model"] == "soup" and info["soup_version"] == st["version"]
    assert info["ingredients"] == st["ingredients"]
    assert info["heldout_accuracy"] == pytest.approx(st["heldout_accuracy"])
    assert info["classes"] == keeper.kitchen.bundle.classnames and info["image_size"] == 32
    assert len(info["ensemble"]["members"]) == 2
    # no absolute path, process id or actor name for just anyone; this loopback client may ask for them
    assert not {"pid", "ingress_pid", "run_dir", "source", "actor"} & set(info)
    assert str(served["run"]) not in public.text
    local = client.get("/info?detail=local").json()
    assert isinstance(local["pid"], int) and local["run_dir"] == str(served["run"])
    # the default topology (fused): the model is scored in the HTTP replica's own process
    assert local["actor"].startswith("SERVE_REPLICA") and local["pid"] == local["ingress_pid"]
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok" and "pid" not in health.json()
    docs = client.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/predict/ensemble", "/info", "/healthz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]


@pytest.mark.slow
def test_live_page_at_the_root_shows_the_version_info_reports(served: dict[str, Any]) -> None:
    import re

    client = served["client"]
    info = client.get("/info").json()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    shown = re.search(r'id="soup-version" data-version="(\d+)"', page.text)
    served_version = re.search(r'id="served-version">(\d+)<', page.text)
    assert shown and served_version, page.text[:2000]
    assert int(shown.group(1)) == int(served_version.group(1)) == info["soup_version"]
    data = client.get("/soup.json").json()
    assert data["soup"]["version"] == data["served"]["soup_version"] == info["soup_version"]
    assert [i["trial_id"] for i in data["soup"]["ingredients"]] == info["ingredients"]
    assert f'data-digest="{data["digest"]}"' in client.get("/").text  # the digest the page polls for


@pytest.mark.slow
def test_ensemble_returns_the_mean_logit_prediction_of_its_trials(served: dict[str, Any]) -> None:
    client, run = served["client"], served["run"]
    members = client.get("/info").json()["ensemble"]["members"]
    pngs, _ = digit_images(served["kitchen"], 8)
    x = to_model_input([load_image(b, 32) for b in pngs])
    with torch.no_grad():
        mean_logits = torch.stack([load_model(run, m).classifier(x) for m in members]).mean(0)
    probs = torch.softmax(mean_logits, dim=1)
    responses = post_all(client, "/predict/ensemble?top_k=2", [{"content": b} for b in pngs])
    for k, r in enumerate(responses):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "ensemble" and body["members"] == members and body["soup_version"] is None
        assert len(body["predictions"]) == 2 and body["predictions"][0]["index"] == int(probs[k].argmax())
        for p in body["predictions"]:
            assert p["probability"] == pytest.approx(float(probs[k, p["index"]]), abs=1e-5)


def _bad_requests() -> dict[str, tuple[dict[str, Any], str, int, str]]:
    """name -> (request kwargs, path, expected status, expected error code)."""
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    png, jpeg = png_bytes(noise), encode(noise, "JPEG")
    big = Image.fromarray(np.zeros((1100, 1100), np.uint8), "L")  # 1.21 Mpx > the fixture's 1 Mpx limit
    over = b"\x89PNG\r\n\x1a\n" + b"\0" * (4 * 1024 * 1024)

    def chunks() -> Iterator[bytes]:
        for _ in range(5):
            yield b"\0" * (1024 * 1024)

    cases: dict[str, tuple[dict[str, Any], str, int, str]] = {
        "empty_raw": ({"content": b""}, "/predict", 400, "empty_body"),
        "empty_upload": ({"files": {"file": ("x.png", b"", "image/png")}}, "/predict", 400, "empty_body"),
        "not_an_image": ({"content": b"just some text"}, "/predict", 400, "not_an_image"),
        "truncated_png": ({"content": png[: len(png) // 2]}, "/predict", 400, "corrupt_image"),
        "truncated_jpeg": ({"content": jpeg[: len(jpeg) // 2]}, "/predict", 400, "corrupt_image"),
        "gif": (
            {"content": encode(noise, "GIF"), "headers": {"content-type": "image/gif"}},
            "/predict",
            415,
            "unsupported_image_type",
        ),
        "bmp_upload": (
            {"files": {"file": ("x.bmp", encode(noise, "BMP"), "image/bmp")}},
            "/predict",
            415,
            "unsupported_image_type",
        ),
        "tiff": ({"content": encode(noise, "TIFF")}, "/predict/ensemble", 415, "unsupported_image_type"),
        "malformed_json": (
            {"content": b'{"image_base64": ', "headers": {"content-type": "application/json"}},
            "/predict",
            400,
            "malformed_json",
        ),
        "json_without_field": ({"json": {"image": "x"}}, "/predict", 422, "missing_field"),
        "json_bad_base64": ({"json": {"image_base64": "!!not base64!!"}}, "/predict", 400, "invalid_base64"),
        "json_gif": (
            {"json": {"image_base64": base64.b64encode(encode(noise, "GIF")).decode()}},
            "/predict",
            415,
            "unsupported_image_type",
        ),
        "too_large_declared": ({"content": over}, "/predict", 413, "body_too_large"),
        "too_large_chunked": ({"content": chunks()}, "/predict", 413, "body_too_large"),
        "too_many_pixels": ({"content": png_bytes(big)}, "/predict", 422, "too_many_pixels"),
        "bomb_header": ({"content": header_only_png(50_000, 50_000)}, "/predict", 422, "too_many_pixels"),
        "upload_without_file_field": (
            {"files": {"image": ("x.png", png, "image/png")}},
            "/predict",
            422,
            "missing_field",
        ),
        "file_field_is_text": (
            {"data": {"file": "not a file"}, "files": {"other": ("x.png", png, "image/png")}},
            "/predict",
            422,
            "invalid_field",
        ),
        "malformed_multipart": (
            {"content": b"--nope\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
            "/predict",
            400,
            "malformed_multipart",
        ),
        "top_k_zero": ({"content": png}, "/predict?top_k=0", 422, "invalid_request"),
        "top_k_not_a_number": ({"content": png}, "/predict?top_k=three", 422, "invalid_request"),
    }
    if features.check("webp"):
        cases["webp"] = ({"content": encode(noise, "WEBP")}, "/predict", 415, "unsupported_image_type")
    return cases


BAD = _bad_requests()


@pytest.mark.parametrize("name", sorted(BAD))
@pytest.mark.slow
def test_bad_input_gets_a_4xx_json_error_naming_the_problem(served: dict[str, Any], name: str) -> None:
    kwargs, path, status, code = BAD[name]
    r = served["client"].post(path, **kwargs)
    assert r.status_code < 500
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and body["detail"]


@pytest.mark.slow
def test_wrong_method_and_unknown_path_get_json_errors(served: dict[str, Any]) -> None:
    client = served["client"]
    r = client.get("/predict")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert client.get("/healthz").status_code == 200  # still healthy after all the bad input


@pytest.mark.slow
def test_live_soup_update_is_picked_up_in_place(served: dict[str, Any]) -> None:
    """Publishing a new soup version changes what /predict answers, without restarting the replica."""
    from soup_ray.export import export_soup, load_soup

    client, run, kitchen = served["client"], served["run"], served["kitchen"]
    before = client.get("/info?detail=local").json()
    v1, pid = before["soup_version"], before["pid"]
    pngs, _ = digit_images(kitchen, 10)
    old_soup, _ = load_soup(run / "soup")
    old_probs = in_process_probs(old_soup, pngs, 32)

    all_ids = sorted(kitchen.paths)
    new_ids = all_ids if sorted(before["ingredients"]) != all_ids else all_ids[:2]
    result = kitchen.evaluate(new_ids, None)
    info = {"version": v1 + 1, "ingredients": new_ids, "heldout_accuracy": result.correct / kitchen.heldout_size}

    # requests keep being answered, whole, while the new soup is loaded and swapped in
    seen: list[tuple[int, Any]] = []
    stop = threading.Event()

    def hammer() -> None:
        deadline = time.time() + LIVE_WAIT_S + 10
        while not stop.is_set() and time.time() < deadline and len(seen) < 300:
            r = client.post("/predict", content=pngs[0])
            seen.append((r.status_code, r.json().get("soup_version")))
            time.sleep(0.05)

    worker = threading.Thread(target=hammer, daemon=True)
    worker.start()
    try:
        export_soup(run / "base", kitchen.soup_weights(new_ids), run / "soup", info)
        deadline = time.time() + LIVE_WAIT_S
        now = before
        while time.time() < deadline and now["soup_version"] != v1 + 1:
            time.sleep(0.25)
            now = client.get("/info?detail=local").json()
    finally:
        time.sleep(0.5)
        stop.set()
        worker.join(timeout=REQUEST_TIMEOUT_S)

    assert now["soup_version"] == v1 + 1, f"the new soup was not picked up within {LIVE_WAIT_S}s: {now}"
    assert now["ingredients"] == new_ids and now["pid"] == pid
    health = client.get("/healthz").json()
    assert health["soup_version"] == v1 + 1
    assert seen and all(status == 200 for status, _ in seen), seen
    assert {v for _, v in seen} <= {v1, v1 + 1}

    new_soup, new_info = load_soup(run / "soup")
    assert new_info["version"] == v1 + 1
    new_probs = in_process_probs(new_soup, pngs, 32)
    assert not torch.allclose(new_probs, old_probs, atol=1e-4)  # the soups really differ
    responses = post_all(client, "/predict?top_k=10", [{"content": b} for b in pngs])
    for k, r in enumerate(responses):
        body = r.json()
        assert r.status_code == 200 and body["soup_version"] == v1 + 1
        served_probs = torch.zeros(10)
        for p in body["predictions"]:
            served_probs[p["index"]] = p["probability"]
        assert torch.allclose(served_probs, new_probs[k], atol=1e-5)


# ---------------------------------------------------------------- several replicas (a second application)


@pytest.fixture(scope="module")
def spread(served: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The same run as a second application beside ``served``: two ingress and two model replicas."""
    from ray import serve

    from soup_ray.serving.app import build_app

    opts = ServeOptions(
        run_dir=str(served["run"]),
        ensemble=0,
        follow=False,
        num_cpus=0.1,
        ingress_cpus=0.05,
        topology="split",
        ingress_replicas=2,
        model_replicas=2,
        decode_threads=2,
        max_batch_size=4,
        max_pixels=FIXTURE_MAX_PIXELS,
    )
    serve.run(build_app(opts), name="spread", route_prefix="/spread", blocking=False)  # returns once it is up
    with httpx.Client(base_url=served["url"] + "/spread", timeout=REQUEST_TIMEOUT_S) as client:
        try:
            yield {"client": client}
        finally:
            serve.delete("spread", _blocking=False)


@pytest.mark.slow
def test_requests_spread_over_every_ingress_and_model_replica_and_decoding_stays_off_the_event_loop(
    served: dict[str, Any], spread: dict[str, Any]
) -> None:
    client = spread["client"]
    pngs, _ = digit_images(served["kitchen"], 8)
    seen: dict[str, set] = {"ingress": set(), "model": set()}
    for _ in range(10):  # bounded: 10 rounds of 16 concurrent requests at most
        responses = post_all(client, "/predict?detail=local", [{"content": b} for b in pngs * 2])
        for r in responses:
            assert r.status_code == 200, r.text
            for kind, replica in r.json()["served_by"].items():
                seen[kind].add(replica)
        if len(seen["ingress"]) == 2 and len(seen["model"]) == 2:
            break
    assert len(seen["ingress"]) == 2 and len(seen["model"]) == 2 and None not in seen["model"], seen
    ingresses: dict[str, dict] = {}
    for _ in range(10):  # concurrent, as the predictions were: one at a time, Serve's router may keep to one replica
        with ThreadPoolExecutor(max_workers=8) as pool:
            infos = list(pool.map(lambda _: client.get("/info?detail=local").json()["ingress"], range(16)))
        ingresses.update((info["replica"], info) for info in infos)
        if len(ingresses) == 2:
            break
    assert set(ingresses) == seen["ingress"]
    for info in ingresses.values():  # every image was decoded in the decode pool, none on the event loop
        assert info["decoded"] > 0 and info["decoded_on_event_loop"] == 0, info
        assert all(t.startswith("soup-ray-decode") for t in info["decode_threads"]), info


@pytest.mark.slow
def test_a_batch_over_http_answers_as_single_requests_do(served: dict[str, Any], spread: dict[str, Any]) -> None:
    client = spread["client"]
    pngs, _ = digit_images(served["kitchen"], 5)
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)] + [("file", ("x", b"x", "image/png"))]
    r = client.post("/predict/batch?top_k=2", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] == 5 and body["failed"] == 1 and body["results"][5]["error"] == "not_an_image"
    singles = post_all(client, "/predict?top_k=2", [{"content": b} for b in pngs])
    for item, single in zip(body["results"][:5], singles, strict=True):  # the sixth is the broken file
        assert [p["index"] for p in item["predictions"]] == [p["index"] for p in single.json()["predictions"]]
        assert item["predictions"][0]["probability"] == pytest.approx(
            single.json()["predictions"][0]["probability"], abs=1e-5
        )
    assert "server-timing" in singles[0].headers


# ---------------------------------------------------------------- faults and load (a second application)

FAULTS_RETRY_AFTER = "2"


def republish(run: Path, source: Path, version: int, spoil: bool = False) -> None:
    """Publish ``source``'s soup as ``version`` to ``run/soup``, swapped in whole; ``spoil`` truncates its
    weights first (a complete, readable soup.json announcing weights that cannot be read)."""
    import json

    staging = run / f".staging-v{version}"
    shutil.copytree(source, staging)
    info = json.loads((staging / "soup.json").read_text())
    info.update(version=version, published_at=time.time())
    (staging / "soup.json").write_text(json.dumps(info))
    if spoil:
        weights = staging / "open_clip_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    old = run / ".soup.old"
    if (run / "soup").exists():
        (run / "soup").rename(old)
    staging.rename(run / "soup")
    shutil.rmtree(old, ignore_errors=True)


def wait_for(client: Any, path: str, done: Any, seconds: float = LIVE_WAIT_S) -> Any:
    """GET ``path`` until ``done(response)`` (bounded); the last response."""
    deadline = time.time() + seconds
    r = None
    while time.time() < deadline:
        try:
            r = client.get(path)
            if done(r):
                return r
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return r


@pytest.fixture(scope="module")
def faults(served: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A second application beside ``served`` in the same Serve: its own copy of the run, whose published soup
    is spoilt when it starts, one request at a time per model replica and a queue of one."""
    from ray import serve

    from soup_ray.serving.app import build_app

    run = tmp_path_factory.mktemp("faults") / "run"
    shutil.copytree(served["run"], run, ignore=shutil.ignore_patterns(".staging-*", ".soup.old"))
    good = tmp_path_factory.mktemp("good-soup") / "soup"
    shutil.copytree(run / "soup", good)
    version = json_version(good)
    republish(run, good, version, spoil=True)
    opts = ServeOptions(
        run_dir=str(run),
        ensemble=0,
        poll_interval_s=0.3,
        num_cpus=0.1,
        ingress_cpus=0.05,
        max_batch_size=4,
        batch_wait_timeout_s=0.25,
        max_ongoing_requests=1,
        max_queued_requests=1,
        retry_after_s=float(FAULTS_RETRY_AFTER),
        model_timeout_s=15,
        health_check_period_s=0.5,
        max_pixels=FIXTURE_MAX_PIXELS,
    )
    serve.run(build_app(opts), name="faults", route_prefix="/faults", blocking=False)
    with httpx.Client(base_url=served["url"] + "/faults", timeout=REQUEST_TIMEOUT_S) as client:
        try:
            started = wait_for(client, "/healthz", lambda r: r.headers.get("content-type") == "application/json")
            png = digit_images(served["kitchen"], 1)[0][0]
            startup = {"health": started, "predict": client.post("/predict", content=png)}
            republish(run, good, version + 1)
            ready = wait_for(client, "/healthz", lambda r: r.status_code == 200)
            assert ready is not None and ready.status_code == 200, ready.text if ready is not None else None
            yield {"run": run, "good": good, "client": client, "startup": startup, "png": png, "version": version + 1}
        finally:
            serve.delete("faults", _blocking=False)  # the served fixture's serve.shutdown() waits for it


def json_version(folder: Path) -> int:
    import json

    return int(json.loads((folder / "soup.json").read_text())["version"])


@pytest.mark.slow
def test_healthz_is_503_while_the_served_soup_cannot_be_loaded(faults: dict[str, Any]) -> None:
    health, predict = faults["startup"]["health"], faults["startup"]["predict"]
    assert health.status_code == 503, health.text
    body = health.json()
    assert body["error"] == "model_unavailable" and "cannot be loaded" in body["detail"]
    assert str(faults["run"]) not in health.text  # the reason without the server's paths
    assert predict.status_code == 503 and predict.json()["error"] == "model_unavailable"
    assert predict.headers.get("retry-after") == FAULTS_RETRY_AFTER
    assert faults["client"].get("/healthz").status_code == 200  # a good version came, and was loaded


@pytest.mark.slow
def test_a_corrupt_new_soup_version_never_replaces_the_good_one(faults: dict[str, Any]) -> None:
    client, run, good = faults["client"], faults["run"], faults["good"]
    serving = client.get("/info").json()["soup_version"]
    republish(run, good, serving + 1, spoil=True)
    rejected = wait_for(
        client, "/info", lambda r: (r.json().get("rejected") or {}).get("soup_version") == serving + 1, seconds=15
    )
    info = rejected.json()
    assert info["rejected"]["soup_version"] == serving + 1, info
    assert info["soup_version"] == serving and info["ready"]
    assert f"still serving soup version {serving}" in info["last_error"]
    r = client.post("/predict", content=faults["png"])
    assert r.status_code == 200 and r.json()["soup_version"] == serving
    health = client.get("/healthz")
    assert health.status_code == 200 and "cannot be loaded" in health.json()["warning"]
    republish(run, good, serving + 2)
    now = wait_for(client, "/info", lambda r: r.json().get("soup_version") == serving + 2, seconds=15).json()
    assert now["soup_version"] == serving + 2 and now["rejected"] is None and now["last_error"] is None


@pytest.mark.slow
def test_overload_is_a_json_503_with_retry_after_never_a_hang(faults: dict[str, Any]) -> None:
    client, png = faults["client"], faults["png"]
    started = time.time()
    responses = post_all(client, "/predict", [{"content": png} for _ in range(16)], workers=16)
    assert time.time() - started < REQUEST_TIMEOUT_S
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 4, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"] == "overloaded" and r.headers.get("retry-after") == FAULTS_RETRY_AFTER
    assert client.post("/predict", content=png).status_code == 200  # and it serves again at once


@pytest.mark.slow
def test_a_killed_model_replica_comes_back_under_load(faults: dict[str, Any]) -> None:
    import threading

    import httpx
    import ray

    client, png = faults["client"], faults["png"]
    before = client.get("/info?detail=local").json()
    # requests in flight on the replica when it dies: Serve's proxy answers them (proxy_errors: a JSON 503)
    stop, in_flight = threading.Event(), []

    def load() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
            for _ in range(2000):
                if stop.is_set():
                    return
                r = c.post("/predict", content=png)
                in_flight.append((r.status_code, r.headers.get("content-type", "")))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    ray.kill(ray.get_actor(before["actor"], namespace="serve"))
    killed = time.time()
    outcomes: list[tuple[float, int, str | None]] = []
    recovered = None
    while time.time() - killed < 60 and len(outcomes) < 400:
        r = client.post("/predict", content=png)
        outcomes.append((time.time() - killed, r.status_code, None if r.status_code == 200 else r.json()["error"]))
        if r.status_code == 200:
            after = client.get("/info?detail=local").json()
            if after.get("actor") and after["actor"] != before["actor"]:
                recovered = time.time() - killed
                break
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=70)
    assert recovered is not None, f"no new replica answered within 60 s: {outcomes[-5:]}"
    assert in_flight and all(
        status == 200 or (status in (503, 504) and kind.startswith("application/json")) for status, kind in in_flight
    ), sorted({x for x in in_flight if x[0] != 200})
    failed = [o for o in outcomes if o[1] != 200]
    assert all(status in (503, 504) for _, status, _ in failed), failed  # JSON errors, never a hang or a 500
    print(f"replica killed: recovered in {recovered:.1f}s, {len(failed)} of {len(outcomes)} requests failed")
    tail = [client.post("/predict", content=png).status_code for _ in range(5)]
    assert tail == [200] * 5
