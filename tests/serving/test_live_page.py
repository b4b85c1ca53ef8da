"""The live soup page in a real headless browser: it loads, shows the published soup, and redraws itself in place
when the soup actor publishes a new version. Served by ``start_live_page`` (no Ray); the Serve ingress's ``/``
is checked against ``/info`` in ``test_serve.py``.

The browser tests need Debian's ``chromium`` and the ``playwright`` package; without them they are skipped with
the reason, unless ``SOUP_RAY_REQUIRE_BROWSER=1`` (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from soup_ray.live import snapshot
from soup_ray.live_page import render_page, start_live_page

PAGE_WAIT_MS = 15_000
POLL_S = 0.3


def need_browser() -> tuple[Any, str]:
    """playwright's ``sync_playwright`` and the chromium executable, or a skip naming what is missing."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("the playwright package (pip install playwright)")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        missing.append("a chromium executable on PATH (apt-get install chromium)")
    if missing:
        reason = "live page browser test needs " + " and ".join(missing)
        if os.environ.get("SOUP_RAY_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (SOUP_RAY_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    return sync_playwright, exe


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read()


def publish(run: Path, keeper: Any, ids: list[str], version: int) -> dict[str, Any]:
    """Publish soup ``version`` of ``ids`` the way the soup keeper does: ``soup_versions/vNNNN`` and ``soup/``."""
    from soup_ray.export import export_soup
    from soup_ray.run_dir import RunDir

    kitchen = keeper.kitchen
    result = kitchen.evaluate(ids, None)
    info = {
        "version": version,
        "ingredients": ids,
        "heldout_accuracy": result.correct / kitchen.heldout_size,
        "heldout_correct": result.correct,
        "heldout_size": kitchen.heldout_size,
        "tie": keeper.tie,
        "published_at": time.time(),
    }
    weights = kitchen.soup_weights(ids)
    paths = RunDir(run)
    export_soup(paths.base, weights, paths.version(version), info)
    export_soup(paths.base, weights, paths.soup, info)
    return info


@pytest.fixture(scope="module")
def kept_run(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A copy of the small run whose five trials went through a real soup keeper (a published soup); read only."""
    from soup_ray.cluster.keeper import SoupKeeper
    from soup_ray.ingredients import trial_records_from_results

    run = tmp_path_factory.mktemp("live") / "run"
    shutil.copytree(small_run, run)
    keeper = SoupKeeper(str(run), tie=">")
    for rec in trial_records_from_results(run):
        keeper.offer(rec.to_json())
    keeper.process_inbox()
    assert keeper.version >= 1
    return run, keeper


def test_snapshot_follows_the_keeper_and_the_page_escapes_every_text(kept_run: tuple[Path, Any]) -> None:
    run, keeper = kept_run
    st = keeper.status()
    snap = snapshot(run)
    assert snap["soup"]["version"] == st["version"] == json.loads((run / "soup" / "soup.json").read_text())["version"]
    assert [i["trial_id"] for i in snap["soup"]["ingredients"]] == st["ingredients"]
    assert snap["soup"]["heldout_accuracy"] == pytest.approx(st["heldout_accuracy"])
    assert len(snap["curve"]) == 5 and [c["trial_id"] for c in snap["curve"] if c["accepted"]] == st["ingredients"]
    held = [c["heldout"] for c in snap["curve"]]
    assert held == sorted(held, reverse=True)  # held-out order
    assert len(snap["trials"]) == 5 and {t["soup"] for t in snap["trials"]} <= {"in soup", "not kept"}
    assert len([p for p in snap["points"] if p["kind"] == "individual"]) == 5
    assert snapshot(run)["digest"] == snap["digest"]  # nothing changed: same digest

    hostile = "<script>alert(1)</script>"
    evil = {
        **snap,
        "run": hostile,
        "name": '"><img src=x onerror=alert(2)>',
        "trials": [{**snap["trials"][0], "trial_id": hostile, "soup": "rejected: " + hostile}],
        "points": snap["points"] + [{"name": hostile, "kind": "recipe", "test": 0.5, "shift_mean": 0.5}],
    }
    html = render_page(evil)
    assert hostile not in html and "onerror=alert(2)>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # only the page's own poller


def test_a_sweep_in_progress_reads_tune_trial_folders(tmp_path: Path) -> None:
    """Before the sweep writes results.jsonl: trials come from Tune's folders (running and finished ones)."""
    run = tmp_path / "run"
    (run / "base").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"name": "t", "data": {"shifts": ["rotate"]}}))
    running = run / "tune" / "trial_a"
    running.mkdir(parents=True)
    lines = [
        {
            "trial_id": "a",
            "epoch": e,
            "heldout_acc": 0.5 + e / 10,
            "status": "running",
            "config": {"lr": 1e-3, "epochs": 4},
        }
        for e in (1, 2)
    ]
    (running / "result.json").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"trial_id": "a", "ep')
    done = run / "tune" / "trial_b"
    (done / "checkpoint_000000").mkdir(parents=True)
    (done / "result.json").write_text(json.dumps({"trial_id": "b", "epoch": 3, "status": "running"}) + "\n")
    metrics = {
        "status": "completed",
        "epoch": 3,
        "heldout_acc": 0.9,
        "test_acc": 0.8,
        "shift_rotate_acc": 0.6,
        "shift_mean_acc": 0.6,
        "hyperparameters": {"lr": 2e-3, "epochs": 3},
    }
    (done / "checkpoint_000000" / "metrics.json").write_text(json.dumps(metrics))

    snap = snapshot(run)
    assert snap["soup"] is None and snap["keeper"] is None and snap["curve"] == []
    by_id = {t["trial_id"]: t for t in snap["trials"]}
    assert [t["trial_id"] for t in snap["trials"]] == ["b", "a"]  # best held-out first
    assert by_id["a"]["status"] == "running" and by_id["a"]["epoch"] == 2 and by_id["a"]["test"] is None
    assert by_id["a"]["soup"] == "running"
    assert by_id["b"]["status"] == "completed" and by_id["b"]["test"] == 0.8 and by_id["b"]["rotate"] == 0.6
    assert snap["points"] == [{"name": "trial b", "kind": "individual", "test": 0.8, "shift_mean": 0.6}]
    html = render_page(snap)
    assert "no soup yet" in html and html.count('data-trial="') == 2

    (running / "result.json").write_text(json.dumps({**lines[1], "epoch": 3}) + "\n")
    assert snapshot(run)["digest"] != snap["digest"]  # a new epoch changes the digest the page polls


@pytest.mark.slow
def test_live_page_in_a_browser_updates_when_a_new_soup_is_published(
    kept_run: tuple[Path, Any], tmp_path: Path
) -> None:
    sync_playwright, exe = need_browser()
    keeper = kept_run[1]
    run = tmp_path / "run"
    shutil.copytree(kept_run[0], run)  # this test publishes into its own copy
    version = keeper.version
    url, stop = start_live_page(run, poll_s=POLL_S)
    try:
        assert url.startswith("http://127.0.0.1:")
        status, kind, body = get(url + "soup.json")
        assert status == 200 and kind.startswith("application/json")
        assert json.loads(body)["soup"]["version"] == version
        status, kind, _ = get(url + "nope")
        assert status == 404

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url, wait_until="load", timeout=PAGE_WAIT_MS)
                assert page.inner_text("#soup-version") == str(version)
                assert page.locator("#ingredients li").count() == len(keeper.status()["ingredients"])
                assert page.locator("#trials tbody tr").count() == 5
                assert page.locator("svg.greedy g.kept, svg.greedy g.dropped").count() == 5
                assert page.locator("svg.scatter g.pt").count() == 5
                page.wait_for_function(
                    "document.getElementById('poll-state').textContent.startsWith('live ·')", timeout=PAGE_WAIT_MS
                )  # the poller ran and reached the server
                page.evaluate("window.__notReloaded = true")

                all_ids = sorted(keeper.kitchen.paths)
                ids = all_ids if sorted(keeper.status()["ingredients"]) != all_ids else all_ids[:2]
                publish(run, keeper, ids, version + 1)

                page.wait_for_function(
                    f"document.getElementById('soup-version').textContent === '{version + 1}'", timeout=PAGE_WAIT_MS
                )
                assert page.evaluate("window.__notReloaded === true")  # redrawn in place, not reloaded
                assert page.locator("#ingredients li").count() == len(ids)
                assert page.locator("#ingredients code").all_inner_texts() == ids
                assert page.inner_text("#digest") == json.loads(get(url + "soup.json")[2])["digest"]
                assert not errors, errors
            finally:
                browser.close()
    finally:
        stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)  # stopped: the port is closed


@pytest.mark.slow
def test_the_live_page_behind_a_token_signs_in_with_an_httponly_cookie_in_a_browser(
    kept_run: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a bearer token set, a browser (which cannot send the header) is sent to /login, signs in with the
    token, gets an HttpOnly SameSite cookie, and then sees the page and its polled /soup.json; a wrong token
    and a request without credentials still get nothing."""
    import socket
    import threading

    import uvicorn

    from soup_ray.serving.app import app
    from soup_ray.serving.auth import SESSION_COOKIE
    from tests.serving.test_ingress import FakeModel, make_ingress

    sync_playwright, exe = need_browser()
    token = "page-token-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    make_ingress(kept_run[0], monkeypatch, model=FakeModel(), auth_token_file=str(token_file))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):  # bounded: the server is up within 10 s
            if server.started:
                break
            time.sleep(0.1)
        assert server.started
        assert get(url + "/soup.json")[0] == 401 and get(url + "/healthz")[0] == 200
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(url + "/", wait_until="load", timeout=PAGE_WAIT_MS)
                assert page.url == url + "/login"  # no credentials: to the login form, not a JSON 401
                page.fill("#token", "wrong")
                page.click("button[type=submit]")
                page.wait_for_load_state("load")
                assert "Wrong token" in page.content() and page.context.cookies() == []
                page.fill("#token", token)
                page.click("button[type=submit]")
                page.wait_for_selector("#soup-version", timeout=PAGE_WAIT_MS)
                assert page.url == url + "/"
                cookie = next(c for c in page.context.cookies() if c["name"] == SESSION_COOKIE)
                assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and token not in cookie["value"]
                assert page.evaluate("document.cookie") == ""  # HttpOnly: the page's own script cannot read it
                page.wait_for_function(
                    "document.getElementById('poll-state').textContent.startsWith('live ·')", timeout=PAGE_WAIT_MS
                )  # the page's poll of /soup.json got through
                api = page.request.get(url + "/soup.json")  # the cookie stands in for the bearer header
                assert api.status == 200 and "soup" in api.json()
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
