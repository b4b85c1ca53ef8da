"""ImageNet-style shift label spaces: full head, class subsets (R/A) and mapped classes (ObjectNet).

Tiny trees in the real layouts are built on the fly: train/val with six wnid folders, a
V2-like full set, an R/A-like subset of three wnids, and an ObjectNet-like folder with its
own class names (one mapped to two wnids, one unmapped) whose images carry a red border.
A fake model reads the class off an image's mean green value, so every logit is known.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from soup_ray.config import ConfigError, ImageFolderData, ShiftDir, load_config, parse_config
from soup_ray.data import BorderCrop, build_imagefolder
from soup_ray.evaluate import accuracy, predict_logits
from soup_ray.label_space import (
    class_groups_of,
    mapping_groups,
    objectnet_mapping,
    project_logits,
    read_class_mapping,
    subset_groups,
    write_objectnet_mapping,
)

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = ROOT / "tune_configs" / "vitb32_imagenet.yaml"
WNIDS = [f"n0{1000000 + j}" for j in range(1, 7)]  # six sorted wnid folders: training classes 0..5
SIZE = 8  # model input size; images are 12x12, or an 8x8 centre inside a 2-pixel red border
GREEN_STEP = 40  # class j is the colour (0, 40 j, 0)
R_CLASSES = [1, 3, 4]  # the subset shift's training classes
OBJECTNET = {"alarm_clock": [WNIDS[1], WNIDS[3]], "banana": [WNIDS[5]]}  # "zebra_toy" stays unmapped
OBJECTNET_COLOUR = {"alarm_clock": 3, "banana": 5, "zebra_toy": 0}  # which class colour each folder's images have


# ---------------------------------------------------------------- fixtures


def _solid(cls: int, border: int = 0) -> Image.Image:
    inner = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    inner[..., 1] = GREEN_STEP * cls
    if border == 0:
        return Image.fromarray(np.kron(inner[:4, :4], np.ones((3, 3, 1), dtype=np.uint8)))  # 12x12 solid
    img = np.zeros((SIZE + 2 * border, SIZE + 2 * border, 3), dtype=np.uint8)
    img[..., 0] = 255  # red border
    img[border:-border, border:-border] = inner
    return Image.fromarray(img)


def _folder(root: Path, name: str, cls: int, n: int, border: int = 0) -> None:
    (root / name).mkdir(parents=True)
    for i in range(n):
        _solid(cls, border).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imagenet-like")
    for j, w in enumerate(WNIDS):
        _folder(root / "train", w, j, 3)
        _folder(root / "val", w, j, 1)
        _folder(root / "v2", w, j, 1)
    for j in R_CLASSES:
        _folder(root / "rendition", WNIDS[j], j, 2)
    for name, cls in OBJECTNET_COLOUR.items():
        _folder(root / "objectnet", name, cls, 2, border=2)
    mapping = root / "objectnet_to_wnids.json"
    mapping.write_text(json.dumps(OBJECTNET))
    return {
        "train": root / "train",
        "val": root / "val",
        "v2": root / "v2",
        "r": root / "rendition",
        "objectnet": root / "objectnet",
        "mapping": mapping,
        "root": root,
    }


def _data(trees: dict[str, Path], **shift_dirs) -> ImageFolderData:
    shift_dirs = shift_dirs or {
        "imagenet_v2": str(trees["v2"]),
        "imagenet_r": {"path": str(trees["r"]), "classes": "subset"},
        "objectnet": {"path": str(trees["objectnet"]), "mapping": str(trees["mapping"])},
    }
    return ImageFolderData.model_validate(
        {
            "kind": "imagefolder",
            "train_dir": trees["train"],
            "test_dir": trees["val"],
            "heldout_fraction": 0.34,
            "shift_dirs": shift_dirs,
        }
    )


@pytest.fixture(scope="module")
def bundle(trees: dict[str, Path]):
    return build_imagefolder(_data(trees), SIZE)


class GreenReader(nn.Module):
    """Logit j = -(g - j)^2 where g is the mean green value in units of GREEN_STEP: class j wins on colour j."""

    def __init__(self, n_classes: int = len(WNIDS), scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.register_buffer("cols", torch.arange(n_classes, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x[:, 1].mean(dim=(1, 2)) * 255 / GREEN_STEP
        return -self.scale * (g[:, None] - self.cols[None]) ** 2


def _expected_full(cls: int) -> torch.Tensor:
    return -((cls - torch.arange(len(WNIDS), dtype=torch.float32)) ** 2)


# ---------------------------------------------------------------- project_logits


def test_project_logits_restricts_and_takes_max() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 3.0], [4.0, -1.0, 2.0, 9.0]])
    assert torch.equal(project_logits(logits, [[3], [1]]), logits[:, [3, 1]])
    assert torch.equal(project_logits(logits, [[0, 2], [1, 3]]), torch.tensor([[1.0, 5.0], [4.0, 9.0]]))
    with pytest.raises(IndexError, match="columns up to 4"):
        project_logits(logits, [[4]])
    with pytest.raises(ValueError, match="non-empty"):
        project_logits(logits, [[0], []])


@st.composite
def _logits_and_groups(draw):
    n, c = draw(st.integers(1, 5)), draw(st.integers(1, 8))
    values = draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=n * c, max_size=n * c))
    logits = torch.tensor(values, dtype=torch.float32).reshape(n, c)
    groups = draw(st.lists(st.lists(st.integers(0, c - 1), min_size=1, max_size=4), min_size=1, max_size=6))
    return logits, groups


@settings(max_examples=60, deadline=None)
@given(_logits_and_groups(), st.randoms(use_true_random=False))
def test_project_logits_properties(case, rnd) -> None:
    logits, groups = case
    out = project_logits(logits, groups)
    assert out.shape == (logits.shape[0], len(groups))
    # single columns: exactly a column selection
    singles = [[g[0]] for g in groups]
    assert torch.equal(project_logits(logits, singles), logits[:, [g[0] for g in groups]])
    # the max is at least every member and equals one of them
    for k, g in enumerate(groups):
        members = logits[:, g]
        assert (out[:, k : k + 1] >= members).all()
        assert torch.equal(out[:, k], members.max(dim=1).values)
    # permuting groups permutes the output; shuffling members changes nothing
    order = list(range(len(groups)))
    rnd.shuffle(order)
    shuffled = [rnd.sample(groups[i], len(groups[i])) for i in order]
    assert torch.equal(project_logits(logits, shuffled), out[:, order])
    # permuting the head's columns, with the groups renamed alike, changes nothing
    perm = list(range(logits.shape[1]))
    rnd.shuffle(perm)
    where = {old: new for new, old in enumerate(perm)}
    assert torch.equal(project_logits(logits[:, perm], [[where[c] for c in g] for g in groups]), out)


# ---------------------------------------------------------------- config


def _sweep(shift_dirs) -> dict:
    return {
        "search_space": {"lr": 1e-3, "weight_decay": 0.1, "epochs": 1},
        "data": {
            "kind": "imagefolder",
            "train_dir": "/t",
            "test_dir": "/v",
            "heldout_fraction": 0.1,
            "shift_dirs": shift_dirs,
        },
    }


def test_config_forms() -> None:
    cfg = parse_config(
        _sweep(
            {
                "v2": "/v2",
                "r": {"path": "/r", "classes": "subset"},
                "on": {"path": "/on", "mapping": "/m.json"},
                "on0": {"path": "/on", "mapping": "/m.json", "border_crop": 0},
            }
        )
    )
    s = cfg.data.shift_dirs
    assert [(s[k].label_space, s[k].crop_pixels) for k in s] == [
        ("all", 0),
        ("subset", 0),
        ("mapping", 2),
        ("mapping", 0),
    ]
    assert str(s["v2"]) == "/v2" and s["on"].mapping == Path("/m.json")
    # round trip through JSON, as trials receive it
    assert ImageFolderData.model_validate_json(cfg.data.model_dump_json()) == cfg.data


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"path": "/r", "clases": "subset"}, "shift_dirs.r.clases: unknown key"),
        ({"path": "/r", "classes": "some"}, "shift_dirs.r.classes: Input should be 'all' or 'subset'"),
        ({"path": "/r", "classes": "subset", "mapping": "/m"}, "either classes (all or subset) or mapping"),
        ({"classes": "subset"}, "shift_dirs.r.path: required key is missing"),
        ({"path": "/r", "border_crop": -2}, "shift_dirs.r.border_crop"),
        (3, "shift_dirs.r must be a folder path or an object"),
    ],
)
def test_config_errors_name_the_key(spec, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_sweep({"r": spec}), "f.yaml")
    assert message in str(e.value)


def test_gpu_config_uses_the_papers_label_spaces() -> None:
    s = load_config(GPU_CONFIG).data.shift_dirs
    assert {k: v.label_space for k, v in s.items()} == {
        "imagenet_v2": "all",
        "imagenet_sketch": "all",
        "imagenet_r": "subset",
        "imagenet_a": "subset",
        "objectnet": "mapping",
    }
    assert s["objectnet"].crop_pixels == 2 and s["objectnet"].mapping is not None


# ---------------------------------------------------------------- datasets


def test_labels_and_label_spaces(bundle) -> None:
    v2, r, on = bundle.shifts["imagenet_v2"], bundle.shifts["imagenet_r"], bundle.shifts["objectnet"]
    assert class_groups_of(v2) is None and v2.targets == list(range(6))
    # subset: labels 0..2 in sorted folder order, one head column each
    assert class_groups_of(r) == [[1], [3], [4]] and r.targets == [0, 0, 1, 1, 2, 2]
    # mapping: sorted mapped folders, the unmapped folder left out
    assert class_groups_of(on) == [[1, 3], [5]] and on.targets == [0, 0, 1, 1] and len(on) == 4
    assert [int(on[i][1]) for i in range(len(on))] == on.targets


def test_border_crop_removes_the_border(trees: dict[str, Path], bundle) -> None:
    crop = BorderCrop(2)(_solid(3, border=2))
    assert crop.size == (SIZE, SIZE) and np.asarray(crop)[..., 0].max() == 0
    on = bundle.shifts["objectnet"]
    for i in range(len(on)):
        x, y = on[i]
        assert x.shape == (3, SIZE, SIZE) and float(x[0].max()) == 0.0  # no red left
        assert torch.allclose(x[1], x[1, 0, 0].expand_as(x[1]))  # the uniform centre only
    uncropped = build_imagefolder(
        _data(trees, on={"path": str(trees["objectnet"]), "mapping": str(trees["mapping"]), "border_crop": 0}), SIZE
    ).shifts["on"]
    assert float(uncropped[0][0][0].max()) > 0.5  # without the crop the red border is still there
    tiny = _solid(1, border=0).resize((8, 8))
    assert BorderCrop(4)(tiny).size == (8, 8)  # too small to crop: kept whole, the trial does not fail


def test_predict_logits_projects_each_shift(bundle) -> None:
    model = GreenReader()
    lg, lb = predict_logits(model, bundle.shifts["imagenet_v2"], batch_size=4)
    assert lg.shape == (6, 6)
    assert torch.allclose(lg, torch.stack([_expected_full(j) for j in range(6)]), atol=1e-3)
    lg, lb = predict_logits(model, bundle.shifts["imagenet_r"], batch_size=4)
    assert lg.shape == (6, 3) and lb.tolist() == [0, 0, 1, 1, 2, 2]
    expected = torch.stack([_expected_full(j)[R_CLASSES] for j in R_CLASSES for _ in range(2)])
    assert torch.allclose(lg, expected, atol=1e-3)
    lg, lb = predict_logits(model, bundle.shifts["objectnet"], batch_size=3)
    assert lg.shape == (4, 2) and lb.tolist() == [0, 0, 1, 1]
    rows = []
    for folder in ["alarm_clock", "banana"]:
        full = _expected_full(OBJECTNET_COLOUR[folder])
        rows += [torch.stack([full[[1, 3]].max(), full[5]])] * 2
    assert torch.allclose(lg, torch.stack(rows), atol=1e-3)
    assert accuracy(lg, lb) == 1.0


def test_trial_logits_report_and_ensembles_see_projected_logits(bundle, tmp_path: Path) -> None:
    from soup_ray.report import LogitStore, score_weights
    from soup_ray.train import CHECKPOINT_LOGITS, TrialContext, save_trial_checkpoint

    ctx = TrialContext(base_dir="unused", data_json="{}", eval_batch_size=4)
    meta = {"fingerprint": "f" * 12, "classnames": WNIDS}
    paths = {}
    for i, scale in enumerate([1.0, 2.0]):
        out = tmp_path / f"t{i}"
        out.mkdir()
        final = save_trial_checkpoint(out, GreenReader(scale=scale), bundle, ctx, {}, meta, {"heldout_acc": 1.0})
        assert final["shift_imagenet_r_acc"] == final["shift_objectnet_acc"] == final["shift_imagenet_v2_acc"] == 1.0
        assert final["shift_mean_acc"] == 1.0
        paths[f"t{i}"] = SimpleNamespace(checkpoint=str(out))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t0" / CHECKPOINT_LOGITS), "pt") as f:
        assert f.get_tensor("objectnet").shape == (4, 2) and f.get_tensor("imagenet_r").shape == (6, 3)
        assert f.get_tensor("objectnet.labels").tolist() == [0, 0, 1, 1]
    run = SimpleNamespace(ids=list(paths), kitchen=SimpleNamespace(paths=paths))
    store = LogitStore(run, list(bundle.eval_sets()), log=lambda m: None)
    assert store.usable == ["t0", "t1"] and store.shapes["objectnet"] == (4, 2)
    assert all(v == 1.0 for v in store.mean_accuracies(["t0", "t1"]).values())
    kitchen = SimpleNamespace(classifier=lambda ids: GreenReader(), bundle=bundle, eval_batch_size=4)
    accs, _ = score_weights(kitchen, ["t0"])
    assert accs["objectnet"] == accs["imagenet_r"] == 1.0


# ---------------------------------------------------------------- errors


def test_mapping_errors(trees: dict[str, Path], tmp_path: Path) -> None:
    def build_with(mapping) -> None:
        p = tmp_path / "m.json"
        p.write_text(mapping if isinstance(mapping, str) else json.dumps(mapping))
        build_imagefolder(_data(trees, on={"path": str(trees["objectnet"]), "mapping": str(p)}), SIZE)

    with pytest.raises(ValueError, match=r"folder 'banana' maps to \['n09999999'\].*write_objectnet_mapping"):
        build_with({"alarm_clock": [WNIDS[1]], "banana": ["n09999999"]})
    with pytest.raises(ValueError, match=r"data.shift_dirs.on: the mapping names class folders \['kettle'\]"):
        build_with({"alarm_clock": [WNIDS[1]], "kettle": [WNIDS[2]]})
    with pytest.raises(ValueError, match="'banana' must map to a non-empty list"):
        build_with({"banana": []})
    with pytest.raises(ValueError, match="not valid JSON"):
        build_with("{nope")
    with pytest.raises(FileNotFoundError, match="data.shift_dirs.on.mapping: .* does not exist"):
        build_imagefolder(_data(trees, on={"path": str(trees["objectnet"]), "mapping": str(tmp_path / "x")}), SIZE)
    # ObjectNet's own folder names are not training classes: subset and full head both refuse them
    for spec in [{"path": str(trees["objectnet"]), "classes": "subset"}, str(trees["objectnet"])]:
        with pytest.raises(ValueError, match=r"data.shift_dirs.on: class folders \['alarm_clock'"):
            build_imagefolder(_data(trees, on=spec), SIZE)


def test_label_space_helpers_directly() -> None:
    assert subset_groups(["b", "d"], ["a", "b", "c", "d"], "x") == [[1], [3]]
    assert mapping_groups({"z": ["d", "a"], "y": ["c"]}, ["y", "z", "w"], ["a", "b", "c", "d"], "x") == (
        ["y", "z"],
        [[2], [3, 0]],
    )


# ---------------------------------------------------------------- dry run


def test_dry_run_checks_mapping_and_layout(trees: dict[str, Path], tmp_path: Path) -> None:
    from soup_ray.cluster.dryrun import check_data

    overrides = {
        "data.train_dir": str(trees["train"]),
        "data.test_dir": str(trees["val"]),
        "data.heldout_index": None,
        "data.heldout_fraction": 0.3,
        "data.classnames": None,
        "data.shift_dirs.imagenet_v2": str(trees["v2"]),
        "data.shift_dirs.imagenet_sketch": str(trees["v2"]),
        "data.shift_dirs.imagenet_r.path": str(trees["r"]),
        "data.shift_dirs.imagenet_a.path": str(trees["r"]),
        "data.shift_dirs.objectnet.path": str(trees["objectnet"]),
        "data.shift_dirs.objectnet.mapping": str(trees["mapping"]),
    }
    check, names = check_data(load_config(GPU_CONFIG, overrides).data)
    text = "\n".join([check.summary, *check.details])
    assert check.status == "ok", text
    assert "2 mapped classes over 3 training classes" in text and "1 unmapped folder(s) skipped" in text
    assert "border crop 2px" in text and "scored on the 3 training classes present" in text

    check, _ = check_data(
        load_config(GPU_CONFIG, {**overrides, "data.shift_dirs.objectnet.mapping": str(tmp_path / "absent.json")}).data
    )
    assert check.status == "fail" and "1 path(s) missing" in check.summary
    assert any(str(tmp_path / "absent.json") in d for d in check.details)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"alarm_clock": ["n0bad"]}))
    check, _ = check_data(load_config(GPU_CONFIG, {**overrides, "data.shift_dirs.objectnet.mapping": str(bad)}).data)
    assert check.status == "fail" and any("folder 'alarm_clock' maps to ['n0bad']" in d for d in check.details)

    check, _ = check_data(
        load_config(GPU_CONFIG, {**overrides, "data.shift_dirs.imagenet_r.path": str(trees["objectnet"])}).data
    )
    assert check.status == "fail" and any("imagenet_r: class folders ['alarm_clock'" in d for d in check.details)


# ---------------------------------------------------------------- ObjectNet's mapping files


def test_objectnet_mapping_from_objectnets_files(tmp_path: Path, trees: dict[str, Path]) -> None:
    d = tmp_path / "mappings"
    d.mkdir()
    (d / "folder_to_objectnet_label.json").write_text(
        json.dumps({"alarm_clock": "Alarm clock", "banana": "Banana", "zebra_toy": "Zebra toy"})
    )
    (d / "objectnet_to_imagenet_1k.json").write_text(
        json.dumps({"Alarm clock": "name10; name20", "Banana": "banana, plantain"})
    )
    (d / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(k): 999 - k for k in range(1000)}))
    names = [f"name{i}" for i in range(1000)]
    names[30] = "banana, plantain"
    (d / "imagenet_to_label_2012_v2").write_text("\n".join(names) + "\n")
    wnids = [f"n{i:08d}" for i in range(1000)]
    expected = {"alarm_clock": [wnids[989], wnids[979]], "banana": [wnids[969]]}
    assert objectnet_mapping(d, wnids) == expected
    train = tmp_path / "train"
    for w in wnids:
        (train / w).mkdir(parents=True)
    out = tmp_path / "folder_to_wnids.json"
    assert write_objectnet_mapping(out, d, train) == expected
    assert read_class_mapping(out, "x") == expected
    with pytest.raises(ValueError, match="1000 ImageNet-1k class folders"):
        objectnet_mapping(d, wnids[:10])
    (d / "imagenet_to_label_2012_v2").unlink()
    with pytest.raises(FileNotFoundError, match="imagenet_to_label_2012_v2"):
        objectnet_mapping(d, wnids)


def test_shift_dir_is_a_path_when_printed() -> None:
    assert str(ShiftDir(path=Path("/data/x"), classes="subset")) == "/data/x"
