"""An installed wheel serves a run folder from any working folder, with no source checkout on the path.

``pip wheel .`` builds soup-ray; a fresh virtual environment outside the
repository installs it (its dependencies are taken from the project's
environment through a ``.pth`` line, so nothing is downloaded but the build
backend); ``soup-ray serve RUN_DIR`` then runs in a temporary folder, answers
``/predict`` over loopback with a non-greedy recipe (Model Stock, computed
by ``soup-ray soup --method model_stock``), and stops on Ctrl-C (SIGINT).
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the repository with the soup-ray wheel installed; returns its ``bin`` folder."""
    work = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{built.stdout[-2000:]}\n{built.stderr[-2000:]}")
    wheels = sorted((work / "dist").glob("soup_ray-*.whl"))
    assert wheels, "pip wheel wrote no soup-ray wheel"
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies (torch, ray, open_clip, ...) from this environment; a .pth line adds the folder to
    # sys.path without running its own .pth files, so the editable install of the checkout is not seen
    (Path(site) / "soup_ray_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheels[-1])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if inst.returncode != 0:
        pytest.fail(f"installing the wheel failed:\n{inst.stderr[-2000:]}")
    return venv / "bin"


def test_installed_wheel_serves_a_recipe_from_a_folder_outside_the_checkout(
    wheel_env: Path, run_copy: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from soup_ray.cli import main
    from soup_ray.config import SweepConfig
    from soup_ray.data import build_dataset

    assert main(["soup", str(run_copy), "--method", "model_stock"]) == 0
    assert (run_copy / "soups" / "model_stock" / "soup.json").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{wheel_env}{os.pathsep}{env.get('PATH', '')}")
    where = subprocess.run(
        [str(wheel_env / "python"), "-c", "import soup_ray; print(soup_ray.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert not where.startswith(str(ROOT)), f"soup_ray came from the checkout: {where}"
    no_entry = subprocess.run(
        [str(wheel_env / "python"), "-c", "import serve.app"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert no_entry.returncode != 0, "the repository's serve/ entry must not be importable here"

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [
            str(wheel_env / "soup-ray"),
            "serve",
            str(run_copy),
            "--port",
            str(port),
            "--method",
            "model_stock",
            "--ensemble",
            "0",
            "--num-cpus",
            "0.25",
        ],
        cwd=elsewhere,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        cfg = SweepConfig.model_validate_json((run_copy / "config.json").read_text())
        x, _ = build_dataset(cfg.data, 32).test[0]
        img = Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        deadline = time.time() + 180
        answer = None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            while time.time() < deadline and proc.poll() is None:
                try:
                    if client.get("/healthz").status_code == 200:
                        answer = client.post("/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
                        info = client.get("/info?detail=local").json()  # the source path: loopback only
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1.0)
        assert answer is not None, f"the server never became healthy:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["predictions"][0]["label"] and info["recipe"] == "model_stock"
        assert info["source"].endswith("soups/model_stock")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()
    assert proc.returncode in (0, 130, -signal.SIGINT), (tmp_path / "serve.log").read_text()[-3000:]
