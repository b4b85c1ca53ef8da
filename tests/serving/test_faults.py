"""Serving faults without Ray: corrupt or half-written soups never replace a good one, only safetensors are
read, and a decoded-size limit keeps small 16-bit images from allocating hundreds of MB."""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from soup_ray.serving import ImageError, ModelSlot, ModelSpec, ModelUnavailable, load_image, load_model

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- soups that cannot be served


@pytest.fixture(scope="module")
def base_run(prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding the saved base and, in ``.template``, one exported soup (the base's weights)."""
    from soup_ray.export import export_soup
    from soup_ray.model import load_base

    _, prep = prepared
    run = tmp_path_factory.mktemp("faults") / "run"
    shutil.copytree(prep.base_dir, run / "base")
    clf, _ = load_base(run / "base")
    export_soup(
        run / "base",
        clf.state_dict(),
        run / ".template",
        {"version": 0, "ingredients": ["base"], "heldout_accuracy": None},
    )
    return run


def publish(run: Path, version: int, corrupt: str | None = None) -> None:
    """Publish soup ``version`` (a copy of the template soup) to ``run/soup``, optionally spoilt first.

    The spoilt folder is swapped in whole, as the exporter does: what a reader sees is a complete
    ``soup.json`` announcing the version, beside weights that are broken in the way named.
    """
    import json
    import time

    staging = run / f".staging-v{version}"
    shutil.copytree(run / ".template", staging)
    info = json.loads((staging / "soup.json").read_text())
    info.update(version=version, ingredients=[f"v{version}"], published_at=time.time())
    (staging / "soup.json").write_text(json.dumps(info))
    weights = staging / "open_clip_model.safetensors"
    if corrupt == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif corrupt == "missing":
        weights.unlink()
    elif corrupt == "pickle_beside":  # no safetensors weights, but a (loadable) pickle of them beside
        from safetensors.torch import load_file

        torch.save(load_file(str(weights)), staging / "open_clip_pytorch_model.bin")
        weights.unlink()
    elif corrupt == "pickle_named_safetensors":
        from safetensors.torch import load_file

        buf = io.BytesIO()
        torch.save(load_file(str(weights)), buf)
        weights.write_bytes(buf.getvalue())
    elif corrupt == "nan":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        key = next(k for k in sorted(tensors) if k.startswith("visual.") and tensors[k].is_floating_point())
        tensors[key][..., 0] = float("nan")
        save_file(tensors, str(weights))
    elif corrupt == "truncated_json":
        info = (staging / "soup.json").read_text()
        (staging / "soup.json").write_text(info[: len(info) // 2])
    elif corrupt is not None:
        raise ValueError(corrupt)
    old = run / ".soup.old"
    if (run / "soup").exists():
        (run / "soup").rename(old)
    staging.rename(run / "soup")
    shutil.rmtree(old, ignore_errors=True)


CORRUPTIONS = ["truncated", "missing", "pickle_beside", "pickle_named_safetensors", "nan"]


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_a_corrupt_new_soup_version_never_replaces_the_served_one(base_run: Path, tmp_path: Path, corrupt: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    publish(run, 1)
    x = torch.rand(2, 3, 32, 32)

    async def scenario() -> dict[str, Any]:
        slot = ModelSlot()
        # the back-off after a failed load is the poll interval: long enough that a busy machine's next
        # refresh() still falls inside it
        spec = ModelSpec(run_dir=str(run), poll_interval_s=5.0)
        assert await slot.configure(spec)
        good = slot.current
        publish(run, 2, corrupt=corrupt)
        with pytest.raises(ModelUnavailable, match="soup version 2"):
            await slot.refresh()
        seen = {
            "good": good,
            "after_bad": slot.current,
            "rejected": dict(slot.rejected or {}),
            "last_error": slot.last_error,
        }
        seen["retried_at_once"] = await slot.refresh()  # backing off: no second full load at the next poll
        publish(run, 3)
        seen["picked_v3"] = await slot.refresh()
        seen["now"], seen["rejected_now"], seen["error_now"] = slot.current, slot.rejected, slot.last_error
        return seen

    seen = asyncio.run(scenario())
    assert seen["after_bad"] is seen["good"] and seen["good"].soup_version == 1
    assert seen["rejected"]["soup_version"] == 2 and seen["rejected"]["failures"] == 1
    assert "still serving soup version 1" in seen["last_error"]
    assert seen["retried_at_once"] is False
    assert seen["picked_v3"] and seen["now"].soup_version == 3
    assert seen["rejected_now"] is None and seen["error_now"] is None
    with torch.no_grad():
        assert torch.isfinite(seen["now"].classifier(x)).all()


@pytest.mark.parametrize("corrupt", ["truncated", "missing", "nan"])
def test_a_replica_starting_on_a_corrupt_soup_waits_unready_then_loads_the_next_version(
    base_run: Path, tmp_path: Path, corrupt: str
) -> None:
    """What keeps /healthz at 503 (with the reason) rather than the replica failing or serving garbage."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    publish(run, 1, corrupt=corrupt)

    async def scenario() -> tuple[Any, ...]:
        slot = ModelSlot()
        loaded = await slot.configure(ModelSpec(run_dir=str(run), poll_interval_s=0.05))
        first = (loaded, slot.current, slot.last_error)
        publish(run, 2)
        await asyncio.sleep(0.06)
        return first, await slot.refresh(), slot.current

    (loaded, current, error), refreshed, now = asyncio.run(scenario())
    assert loaded is False and current is None
    assert "soup version 1" in error and "cannot be loaded" in error
    assert refreshed and now.soup_version == 2


def test_a_half_written_soup_json_is_not_a_new_version(base_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    publish(run, 1)

    async def scenario() -> tuple[Any, ...]:
        slot = ModelSlot()
        await slot.configure(ModelSpec(run_dir=str(run)))
        good = slot.current
        publish(run, 2, corrupt="truncated_json")
        return good, await slot.refresh(), slot.current

    good, refreshed, now = asyncio.run(scenario())
    assert refreshed is False and now is good


def test_load_model_reads_only_safetensors(base_run: Path, tmp_path: Path) -> None:
    """A soup folder whose weights exist only as a pickle is refused, not unpickled."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    publish(run, 1, corrupt="pickle_beside")
    with pytest.raises(ModelUnavailable, match="open_clip_model.safetensors"):
        load_model(run)


def test_no_pickle_loading_in_the_package() -> None:
    """Weights are read with safetensors only: no torch.load, pickle or allow_pickle in soup_ray/."""
    offenders = []
    for path in sorted((ROOT / "soup_ray").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(
                w in code
                for w in (
                    "torch.load(",
                    "import pickle",
                    "pickle.load",
                    "allow_pickle=True",
                    "cloudpickle.load",
                    "joblib.load",
                )
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


# ---------------------------------------------------------------- decoded size


def png16(width: int, height: int, mode: str) -> bytes:
    """A blank 16-bit PNG (grey or RGBA) of ``width x height``: a few kB however large it decodes."""
    import struct
    import zlib

    colour, samples = {"grey": (0, 1), "rgba": (6, 4)}[mode]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" + b"\0" * (width * samples * 2)
    raw = zlib.compress(row * height, 1)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_a_small_16_bit_rgba_png_over_the_decoded_limit_is_refused_from_its_header() -> None:
    data = png16(3000, 3000, "rgba")  # 9 Mpx (under the pixel limit) x 8 bytes = 72 MB decoded
    assert len(data) < 1_000_000
    with pytest.raises(ImageError) as err:
        load_image(data, 32)
    assert (err.value.status, err.value.code) == (422, "too_large_decoded")
    assert "8 per pixel" in err.value.message
    load_image(data, 32, max_decoded_bytes=10**9)  # the same image under a larger limit decodes


def test_decoding_a_16_bit_grey_png_stays_near_its_decoded_size() -> None:
    """A 2048 x 2048 16-bit grey PNG (8 MiB decoded): the conversion to 8 bits allocates about that much, not
    the several float64 copies (32 MiB each) it used to (numpy and Python allocations, as tracemalloc sees them)."""
    import tracemalloc

    data = png16(2048, 2048, "grey")
    decoded = 2048 * 2048 * 2
    tracemalloc.start()
    try:
        out = load_image(data, 32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (32, 32, 3) and int(out.max()) == 0
    assert peak < 3 * decoded, f"decoding allocated {peak / 2**20:.0f} MiB for a {decoded / 2**20:.0f} MiB image"


def test_16_bit_grey_rescaling_rounds_exactly() -> None:
    values = np.array([[0, 128, 129, 257, 385, 386, 32896, 65535]], dtype=np.uint16)
    out = load_image(png_bytes(Image.fromarray(values)), 8)[:, :, 0]
    # resized 8x1 -> 8x8: every row is the same rescaled row
    want = np.clip(values.astype(np.float64) / 257.0, 0, 255).round().astype(np.uint8)
    expect = np.asarray(Image.fromarray(want, "L").resize((8, 8), Image.Resampling.BILINEAR))
    assert np.array_equal(out, expect)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_header_bytes_per_pixel() -> None:
    from soup_ray.serving.images import declared_bytes_per_pixel

    cases = {
        "grey8": (Image.fromarray(np.zeros((2, 2), np.uint8), "L"), 1),
        "rgb8": (Image.fromarray(np.zeros((2, 2, 3), np.uint8), "RGB"), 3),
        "rgba8": (Image.fromarray(np.zeros((2, 2, 4), np.uint8), "RGBA"), 4),
        "grey16": (Image.fromarray(np.zeros((2, 2), np.uint16)), 2),
    }
    for name, (img, want) in cases.items():
        data = png_bytes(img)
        with Image.open(io.BytesIO(data)) as opened:
            assert declared_bytes_per_pixel(data, opened) == want, name
    rgba16 = png16(2, 2, "rgba")
    with Image.open(io.BytesIO(rgba16)) as opened:
        assert declared_bytes_per_pixel(rgba16, opened) == 8
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(jpeg, "JPEG")
    with Image.open(io.BytesIO(jpeg.getvalue())) as opened:
        assert declared_bytes_per_pixel(jpeg.getvalue(), opened) == 3
