"""Label spaces of shifted test sets: which head columns a shift is scored on.

A shift set is scored in one of three ways (the model-soups / WiSE-FT evaluation):

* **full head**: every training class is a candidate (ImageNet-V2, ImageNet-Sketch);
  the dataset has no ``class_groups``.
* **subset**: only the training classes whose folders the shift has (ImageNet-R and
  ImageNet-A, 200 classes each): the logits are restricted to those columns and the
  labels are 0..k-1 in the shift's sorted folder order.
* **mapping**: the shift has classes of its own, each standing for one or more
  training classes (ObjectNet: 113 classes over ImageNet's 1,000); the logit of a
  shift class is the maximum over its training columns.

Both subset and mapping are one operation, :func:`project_logits` with a list of
column groups (a group of one column is a restriction). ``evaluate.iter_logits``
applies it to every dataset that carries ``class_groups``, so trial logits, soup and
report scores all see the projected ``[N, k]`` logits with labels 0..k-1.

Ensembles average the *stored, projected* logits of each trial. Restriction is
linear, so for subsets this equals projecting the mean; the maximum is not, so for a
mapped shift (ObjectNet) an ensemble is the mean of per-model class maxima rather
than the maximum of the mean logits. Both are reasonable ensembles; the difference
is small and accepted here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from .atomic import write_json

ClassGroups = list[list[int]]

OBJECTNET_BORDER_PX = 2
"""Pixels cropped from every side of an ObjectNet image (its red border), as WiSE-FT does."""

OBJECTNET_FILES = (
    "folder_to_objectnet_label.json",
    "objectnet_to_imagenet_1k.json",
    "pytorch_to_imagenet_2012_id.json",
    "imagenet_to_label_2012_v2",
)


# ---------------------------------------------------------------- projection


def group_index(groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """A ``[k, m]`` column index: each group padded to the longest by repeating its first column."""
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("class groups must be a non-empty list of non-empty column lists")
    width = max(len(g) for g in groups)
    return torch.tensor([list(g) + [g[0]] * (width - len(g)) for g in groups], dtype=torch.long)


def project_logits(logits: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[N, C]`` logits to ``[N, len(groups)]``: the maximum over each group's columns.

    A group of one column selects that column, so single-column groups restrict the
    head to a subset of classes (in the order of ``groups``).
    """
    idx = group_index(groups)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got {tuple(logits.shape)}")
    if int(idx.min()) < 0 or int(idx.max()) >= logits.shape[1]:
        raise IndexError(f"class groups use columns up to {int(idx.max())} but the logits have {logits.shape[1]}")
    return logits[:, idx.to(logits.device)].amax(dim=-1)


def class_groups_of(ds: Dataset) -> ClassGroups | None:
    """The ``class_groups`` of a dataset (looking through ``Subset``), or None for the full head."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return getattr(ds, "class_groups", None)


# ---------------------------------------------------------------- building the groups


def subset_groups(shift_classes: Sequence[str], train_classes: Sequence[str], where: str) -> ClassGroups:
    """One single-column group per shift class folder, which must all be training classes."""
    unknown = [c for c in shift_classes if c not in train_classes]
    if unknown:
        raise ValueError(
            f"{where}: class folders {unknown[:5]} are not training classes ({len(unknown)} of {len(shift_classes)})"
        )
    pos = {c: i for i, c in enumerate(train_classes)}
    return [[pos[c]] for c in shift_classes]


def read_class_mapping(path: Path, where: str) -> dict[str, list[str]]:
    """Read a mapping file: a JSON object ``{shift class folder: [training class folder, ...]}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{where}.mapping: {path} does not exist (a JSON object mapping each shift class "
            "folder to a list of train_dir class folders)"
        )
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{where}.mapping: {path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(
            f"{where}.mapping: {path} must be a non-empty JSON object {{shift class folder: [train class folder, ...]}}"
        )
    out: dict[str, list[str]] = {}
    for folder, targets in raw.items():
        targets = [targets] if isinstance(targets, str) else targets
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(
                f"{where}.mapping: {path}: {folder!r} must map to a non-empty list of train class "
                f"folder names, got {raw[folder]!r}"
            )
        out[folder] = list(targets)
    return out


def mapping_groups(
    mapping: dict[str, list[str]], shift_classes: Sequence[str], train_classes: Sequence[str], where: str
) -> tuple[list[str], ClassGroups]:
    """The mapped shift classes (sorted) and each one's training columns.

    Every mapped folder must exist in the shift folder and every target must be a
    training class folder. Shift folders the mapping leaves out are not scored.
    """
    absent = sorted(set(mapping) - set(shift_classes))
    if absent:
        raise ValueError(
            f"{where}: the mapping names class folders {absent[:5]} that are not in the shift folder "
            f"({len(absent)} of {len(mapping)}); remove them from the mapping or add the folders"
        )
    pos = {c: i for i, c in enumerate(train_classes)}
    bad = {f: [t for t in ts if t not in pos] for f, ts in mapping.items()}
    bad = {f: ts for f, ts in bad.items() if ts}
    if bad:
        folder, targets = next(iter(sorted(bad.items())))
        raise ValueError(
            f"{where}: folder {folder!r} maps to {targets[:5]}, which are not class folders of "
            f"train_dir ({len(bad)} folder(s) affected); the values must be train_dir folder names "
            "(ImageNet wnids such as 'n01440764'): fix the mapping file, or rebuild it from "
            "ObjectNet's mapping files with soup_ray.label_space.write_objectnet_mapping"
        )
    classes = sorted(mapping)
    return classes, [[pos[t] for t in mapping[c]] for c in classes]


# ---------------------------------------------------------------- ObjectNet's own files


def objectnet_mapping(mappings_dir: Path, wnids: Sequence[str]) -> dict[str, list[str]]:
    """ObjectNet folder name to ImageNet wnids, from the files in ObjectNet's ``mappings/`` folder.

    ``wnids`` are the 1,000 ImageNet-1k class folders in sorted order (PyTorch's class
    index order). ObjectNet's chain: folder -> ObjectNet label -> ImageNet names
    (``"a; b"``) -> ImageNet 2012 id (line number of ``imagenet_to_label_2012_v2``) ->
    PyTorch index -> wnid. Only the 113 classes that overlap ImageNet are returned.
    """
    d = Path(mappings_dir)
    missing = [f for f in OBJECTNET_FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d}: ObjectNet mapping file(s) {missing} not found")
    if len(wnids) != 1000:
        raise ValueError(f"expected the 1000 ImageNet-1k class folders, got {len(wnids)}")
    label_to_folder = {label: folder for folder, label in json.loads((d / OBJECTNET_FILES[0]).read_text()).items()}
    objectnet_to_names: dict[str, str] = json.loads((d / OBJECTNET_FILES[1]).read_text())
    id_to_index = {int(v): int(k) for k, v in json.loads((d / OBJECTNET_FILES[2]).read_text()).items()}
    lines = (d / OBJECTNET_FILES[3]).read_text().splitlines()
    name_to_index = {line.strip(): id_to_index[i] for i, line in enumerate(lines) if line.strip()}
    out: dict[str, list[str]] = {}
    for label, names in objectnet_to_names.items():
        if label not in label_to_folder:
            raise ValueError(
                f"{d / OBJECTNET_FILES[1]}: ObjectNet label {label!r} is not in "
                f"{OBJECTNET_FILES[0]}: are both files from the same ObjectNet release?"
            )
        unknown = [n for n in names.split("; ") if n not in name_to_index]
        if unknown:
            raise ValueError(
                f"{d / OBJECTNET_FILES[1]}: ImageNet class name(s) {unknown[:3]} of {label!r} are not in "
                f"{OBJECTNET_FILES[3]}: are both files from the same ObjectNet release?"
            )
        out[label_to_folder[label]] = [wnids[name_to_index[n]] for n in names.split("; ")]
    return dict(sorted(out.items()))


def write_objectnet_mapping(out: Path, mappings_dir: Path, train_dir: Path) -> dict[str, list[str]]:
    """Write the soup-ray mapping file for ObjectNet (see :func:`objectnet_mapping`); returns it."""
    wnids = sorted(p.name for p in Path(train_dir).iterdir() if p.is_dir())
    mapping = objectnet_mapping(mappings_dir, wnids)
    write_json(out, mapping, indent=1)
    return mapping
