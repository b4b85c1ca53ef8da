"""The public Python API: ``import soup_ray`` stays light, ``run`` refuses a bad config before Ray starts,
``soup`` computes a recipe from a finished run and ``load_soup`` gives a classifier that answers like the server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import soup_ray
from soup_ray.config import ConfigError
from tests.conftest import tiny_config_dict


def test_import_is_light_and_a_bad_config_fails_before_ray() -> None:
    code = """
import json, sys
import soup_ray
light = sorted(m for m in ("torch", "ray", "open_clip", "soup_ray.jobs") if m in sys.modules)
errors = []
for config in ({"name": "x", "bogus": 1}, "no/such/sweep.yaml"):
    try:
        soup_ray.run(config)
    except Exception as err:
        errors.append(f"{type(err).__name__}: {err}")
print(json.dumps({"light": light, "errors": errors, "ray": "ray" in sys.modules}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["light"] == []  # nothing heavy on import
    assert len(out["errors"]) == 2 and not out["ray"]  # refused before Ray was even imported
    assert out["errors"][0].startswith("ConfigError") and "bogus: unknown key" in out["errors"][0]
    assert "no/such/sweep.yaml: no such config file" in out["errors"][1]


def test_run_applies_overrides_to_a_mapping_and_names_the_bad_key() -> None:
    cfg = tiny_config_dict()
    with pytest.raises(ConfigError, match=r"tune\.num_samples"):
        soup_ray.run(cfg, overrides={"tune.num_samples": "many"})
    assert cfg["tune"]["num_samples"] == 2  # the caller's mapping is left as it was
    with pytest.raises(ConfigError, match="single value"):
        soup_ray.run(cfg, overrides={"name.part": 1})
    with pytest.raises(TypeError, match="YAML file path, a mapping or a SweepConfig"):
        soup_ray.run(42)


def test_soup_and_load_soup_on_a_finished_run(run_copy: Path) -> None:
    from PIL import Image

    from soup_ray.data import build_dataset

    with pytest.raises(FileNotFoundError, match="not a published soup folder"):
        soup_ray.load_soup(run_copy)  # no soup published in this run yet

    rows = [json.loads(x) for x in (run_copy / "results.jsonl").read_text().splitlines()]
    out = soup_ray.soup(run_copy, method="uniform", log=lambda m: None)
    assert sorted(out["ingredients"]) == sorted(r["trial_id"] for r in rows)
    folder = Path(out["folder"])
    assert folder == run_copy / "soups" / "uniform" and (folder / "soup.json").is_file()
    row = next(
        r
        for r in (json.loads(x) for x in (run_copy / "results.jsonl").read_text().splitlines())
        if r.get("model_name") == "uniform" and r.get("recipe")
    )
    assert row["heldout_correct"] == out["correct"]

    loaded = soup_ray.load_soup(folder)
    assert loaded.model.training is False and loaded.image_size == 32
    assert loaded.classnames == json.loads((run_copy / "base" / "base.json").read_text())["classnames"]

    cfg = json.loads((run_copy / "config.json").read_text())
    from soup_ray.config import parse_config

    test = build_dataset(parse_config(cfg).data, 32).test
    n = 64
    pngs, labels = [], []
    for i in range(n):
        x, y = test[i]
        arr = (x.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        pngs.append(buf.getvalue())
        labels.append(int(y))
    preds = loaded.predict(pngs, top_k=2)
    assert all(len(p) == 2 and p[0]["probability"] >= p[1]["probability"] for p in preds)
    assert all(p[0]["label"] == loaded.classnames[p[0]["index"]] for p in preds)
    pil = Image.open(io.BytesIO(pngs[0]))
    assert loaded.preprocess(pil).shape == (3, 32, 32)
    assert loaded.predict([pil])[0][0]["index"] == preds[0][0]["index"]  # a PIL image decodes like its bytes
    accuracy = float(np.mean([p[0]["index"] == y for p, y in zip(preds, labels, strict=True)]))
    assert abs(accuracy - row["test"]) < 0.2, (accuracy, row["test"])  # the recipe's own test score, roughly


def test_soup_stays_callable_after_the_soup_package_is_imported() -> None:
    import importlib

    pkg = importlib.import_module("soup_ray.soup")  # what every pipeline imports
    assert soup_ray.soup is pkg and callable(soup_ray.soup)
    assert soup_ray.soup.greedy_soup is pkg.greedy_soup
    import soup_ray.soup as again

    assert again is pkg
