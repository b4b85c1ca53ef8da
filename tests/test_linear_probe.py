"""The linear-probe head: fitted once on frozen train features, chosen on held-out, saved in the base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from soup_ray.config import parse_config
from soup_ray.linear_probe import fit_linear_probe, image_features
from soup_ray.model import load_base
from soup_ray.prepare import prepare_run
from tests.conftest import tiny_config_dict


def test_linear_probe_base_beats_zero_shot_and_carries_its_own_fingerprint(prepared, tmp_path: Path) -> None:
    cfg_zs, prep_zs = prepared
    cfg = parse_config(tiny_config_dict(**{"model.head_init": "linear_probe"}))
    prep = prepare_run(cfg, tmp_path / "lp", log=lambda m: None)
    assert prep.zero_shot["head_init"] == "linear_probe"
    assert prep.zero_shot["heldout"] >= prep_zs.zero_shot["heldout"]
    assert prep.fingerprint != prep_zs.fingerprint  # another head, another base: its trials cannot mix with the other's
    lp, meta = load_base(prep.base_dir)
    zs, _ = load_base(prep_zs.base_dir)
    for key, value in zs.state_dict().items():  # the image tower is untouched: only the head differs
        if not key.startswith("head."):
            assert torch.equal(value, lp.state_dict()[key]), key
    assert not torch.equal(zs.head.weight, lp.head.weight)
    assert json.loads((prep.base_dir / "base.json").read_text())["fingerprint"] == meta["fingerprint"]


def test_probe_is_the_logistic_regression_it_reports(prepared) -> None:
    _, prep = prepared
    clf, _ = load_base(prep.base_dir)
    info = fit_linear_probe(clf, prep.bundle.train, prep.bundle.heldout, c_grid=(1.0, 10.0))
    assert set(info["heldout_accuracy_by_C"]) == {"1", "10"}
    assert info["heldout_accuracy"] == max(info["heldout_accuracy_by_C"].values())
    x, y = image_features(clf, prep.bundle.heldout)
    with torch.no_grad():
        pred = clf.head(torch.from_numpy(x)).argmax(1).numpy()
    assert np.mean(pred == y) == info["heldout_accuracy"]  # the copied head predicts what the probe predicted
