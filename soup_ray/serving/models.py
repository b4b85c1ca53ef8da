"""The models a replica serves: the run's soup (latest or pinned version) or one trial, loaded fully and swapped whole.

- ``load_model`` loads the run's soup (the latest in ``RUN_DIR/soup``, or a
  pinned ``RUN_DIR/soup_versions/vNNNN``) or one trial checkpoint, fully, so a
  server can swap it in with a single assignment.
- ``ModelSlot`` holds the model a replica serves and reloads it when a new
  soup version is published.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..export import load_soup
from ..ingredients import CheckpointRejected, TrialRecord, read_checkpoint, trial_records_from_results
from ..model import classifier_from_dir
from ..results import read_jsonl
from ..run_dir import BASE_META, SOUP_INFO, RunDir
from .options import SOUP_MODEL, ModelSpec

if TYPE_CHECKING:
    import torch

    from ..model import CLIPClassifier


class ModelUnavailable(RuntimeError):
    """The requested model cannot be loaded yet (e.g. no soup has been published)."""


@dataclass
class LoadedModel:
    """A ready classifier and what the server reports about it."""

    classifier: CLIPClassifier
    name: str
    soup_version: int | None
    ingredients: list[str]
    heldout_accuracy: float | None
    classnames: list[str]
    image_size: int
    source: str
    stamp: tuple | None
    recipe: str | None = None
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        """JSON-ready metadata (everything but the weights)."""
        return {
            "model": self.name,
            "soup_version": self.soup_version,
            "ingredients": list(self.ingredients),
            "heldout_accuracy": self.heldout_accuracy,
            "classes": list(self.classnames),
            "image_size": self.image_size,
            "source": self.source,
            "recipe": self.recipe,
            "loaded_at": self.loaded_at,
        }


def soup_folder(run_dir: Path | str, soup_version: int | None = None, method: str | None = None) -> Path:
    """``RUN_DIR/soup`` (the live greedy soup), ``RUN_DIR/soup_versions/vNNNN`` (a pinned version) or
    ``RUN_DIR/soups/NAME`` (a computed recipe)."""
    paths = RunDir(run_dir)
    if method is not None:
        return paths.recipe(method)
    return paths.soup if soup_version is None else paths.version(soup_version)


def stamp_of(info: dict[str, Any]) -> tuple:
    """What identifies a published soup in its ``soup.json``: version, publication time, ingredients."""
    return (info.get("version"), info.get("published_at"), tuple(info.get("ingredients") or ()))


def soup_stamp(folder: Path | str) -> tuple | None:
    """The :func:`stamp_of` the soup published in ``folder``; None if absent or mid-write."""
    try:
        info = json.loads((Path(folder) / SOUP_INFO).read_text())
    except (OSError, ValueError):
        return None
    return stamp_of(info)


def check_finite(clf: torch.nn.Module) -> None:
    """Refuse a model with a NaN or infinite weight (a corrupt file can parse and still be garbage)."""
    import torch

    for name, t in clf.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"weight {name} holds NaN or infinite values")


def _load_soup_folder(folder: Path, device: str, attempts: int = 3) -> LoadedModel:
    """Load a soup folder whole (safetensors only, every key, finite values); retry when a new version
    replaced it while it was being read. Any failure is a ``ModelUnavailable`` naming the version and why."""
    last: Exception | None = None
    version = None
    for _ in range(attempts):
        stamp = soup_stamp(folder)
        if stamp is None:
            raise ModelUnavailable(f"no soup published in {folder} yet")
        version = stamp[0]
        try:
            clf, info = load_soup(folder, device=device)
            check_finite(clf)
        except Exception as err:  # noqa: BLE001 - replaced mid-read, half-written or corrupt: try again, then refuse
            last = err
            time.sleep(0.2)
            continue
        if soup_stamp(folder) != stamp_of(info):
            time.sleep(0.2)
            continue
        return LoadedModel(
            clf.eval(),
            SOUP_MODEL,
            info.get("version"),
            list(info.get("ingredients") or []),
            info.get("heldout_accuracy"),
            list(info["classnames"]),
            int(info["image_size"]),
            str(folder),
            stamp_of(info),
            recipe=info.get("method", "greedy"),
        )
    reason = f"{type(last).__name__}: {last}" if last is not None else "it kept changing while being read"
    raise ModelUnavailable(f"soup version {version} in {folder} cannot be loaded ({reason})")


def _results_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = RunDir(run_dir).results
    return read_jsonl(path) if path.is_file() else []


def resolve_trial(run_dir: Path | str, model: str) -> TrialRecord:
    """The ``TrialRecord`` of ``model``: a completed trial id of the run, or a checkpoint folder."""
    run_dir = Path(run_dir)
    has_results = RunDir(run_dir).results.is_file()
    records = {r.trial_id: r for r in trial_records_from_results(run_dir)} if has_results else {}
    if model in records:
        return records[model]
    if Path(model).is_dir():
        return TrialRecord(Path(model).name, str(Path(model).resolve()))
    known = ", ".join(sorted(records)) or "none"
    raise ValueError(
        f"model {model!r} is neither 'soup', a completed trial id of {run_dir} (known: {known}) nor a checkpoint folder"
    )


def check_model(
    run_dir: Path | str, model: str = SOUP_MODEL, soup_version: int | None = None, method: str | None = None
) -> None:
    """Fail fast (before any replica starts) when ``model``/``soup_version`` cannot exist in ``run_dir``.

    The latest soup may be missing: a server started during a sweep waits for it.
    """
    if method is not None:
        if model != SOUP_MODEL or soup_version is not None:
            raise ValueError("method names a computed recipe: leave model ('soup') and soup_version unset with it")
        folder = soup_folder(run_dir, None, method)
        if soup_stamp(folder) is None:
            have = (
                sorted(p.name for p in folder.parent.glob("*") if (p / SOUP_INFO).is_file())
                if folder.parent.is_dir()
                else []
            )
            raise ValueError(
                f"no recipe {method!r} in {folder.parent} (computed: {', '.join(have) or 'none'}); "
                f"compute it with `soup-ray soup {run_dir} --method {method}`"
            )
    elif model != SOUP_MODEL:
        resolve_trial(run_dir, model)
    elif soup_version is not None and soup_stamp(soup_folder(run_dir, soup_version)) is None:
        raise ValueError(
            f"soup version {soup_version} is not in {soup_folder(run_dir, soup_version).parent} "
            "(the actor keeps only the last few versions)"
        )


def _load_trial(run_dir: Path, model: str, device: str) -> LoadedModel:
    """Load one trial checkpoint (by trial id from results.jsonl, or a checkpoint folder) onto the run's base."""
    record = resolve_trial(run_dir, model)
    base_dir = RunDir(run_dir).base
    meta = json.loads((base_dir / BASE_META).read_text())
    clf = classifier_from_dir(base_dir)
    reference = {k: (tuple(v.shape), v.dtype) for k, v in clf.state_dict().items()}
    try:
        # heldout_correct=0: serving needs the weights, not the checkpoint's held-out score
        state, _ = read_checkpoint(TrialRecord(record.trial_id, record.checkpoint, 0), meta["fingerprint"], reference)
    except CheckpointRejected as err:
        raise ValueError(f"cannot serve trial {record.trial_id}: {err}") from None
    clf.load_state_dict(state)
    heldout = next((r.get("heldout") for r in _results_rows(run_dir) if r.get("trial_id") == record.trial_id), None)
    return LoadedModel(
        clf.eval().to(device),
        record.trial_id,
        None,
        [record.trial_id],
        heldout,
        list(meta["classnames"]),
        int(meta["image_size"]),
        record.checkpoint,
        None,
    )


def load_model(
    run_dir: Path | str,
    model: str = SOUP_MODEL,
    soup_version: int | None = None,
    device: str = "cpu",
    method: str | None = None,
) -> LoadedModel:
    """Load the soup (latest or pinned version) or one trial checkpoint of ``run_dir``, fully, ready to predict."""
    run_dir = Path(run_dir)
    if model == SOUP_MODEL:
        return _load_soup_folder(soup_folder(run_dir, soup_version, method), device)
    return _load_trial(run_dir, model, device)


class ModelSlot:
    """The model a replica serves: a new one is loaded fully, off the event loop, then swapped in at once.

    ``configure`` applies a ``ModelSpec`` (loading only when what to load
    changed); ``refresh`` reloads when a new soup was published to the folder
    followed; ``watch`` calls ``refresh`` every ``poll_interval_s``. Readers take
    ``slot.current`` once and use that object for a whole batch.
    """

    RETRY_MAX_S = 60.0  # a soup version that failed to load is tried again after 1, 2, 4 ... at most 60 polls' time

    def __init__(self) -> None:
        import asyncio

        self.current: LoadedModel | None = None
        self.spec: ModelSpec | None = None
        self.last_error: str | None = None
        self.reloads = 0
        self.rejected: dict[str, Any] | None = None  # the last published version that could not be loaded
        self._failed: tuple | None = None  # (stamp, failures, when to try again)
        self._lock = asyncio.Lock()

    async def configure(self, spec: ModelSpec) -> bool:
        """Apply ``spec``; returns whether another model was loaded.

        A soup that is followed but not published yet leaves the slot empty
        (``watch`` loads it when it appears); any other load error is raised.
        """
        previous, self.spec = self.spec, spec
        if previous is not None and previous.source_key() == spec.source_key() and self.current is not None:
            return False
        try:
            return await self._load(spec, only_if_changed=False)
        except ModelUnavailable as err:
            if not spec.follows_soup():
                raise
            self.last_error = str(err)
            return False

    async def refresh(self) -> bool:
        """Load the followed soup again if a new version was published; returns whether it changed."""
        spec = self.spec
        if spec is None or not spec.follows_soup():
            return False
        return await self._load(spec, only_if_changed=True)

    async def watch(
        self, spec: ModelSpec, log: Callable[[str], None] = print, on_change: Callable[[], None] | None = None
    ) -> None:
        """Poll for new soup versions while ``spec`` is the configured one (cancel the task to stop)."""
        import asyncio

        while spec is self.spec and spec.follows_soup():
            await asyncio.sleep(spec.poll_interval_s)
            try:
                if await self.refresh() and on_change is not None:
                    on_change()
            except asyncio.CancelledError:
                raise
            except ModelUnavailable:  # a version that cannot be loaded: keep the current model, retry later
                log(self.last_error or "the new soup cannot be loaded")
            except Exception as err:  # noqa: BLE001 - keep serving the current model; retry at the next poll
                self.last_error = f"reloading the soup failed: {err}"
                log(self.last_error)

    async def _load(self, spec: ModelSpec, only_if_changed: bool) -> bool:
        import asyncio

        async with self._lock:
            stamp = None
            if only_if_changed:
                stamp = await asyncio.to_thread(soup_stamp, soup_folder(spec.run_dir, spec.soup_version, spec.method))
                if stamp is None or (self.current is not None and stamp == self.current.stamp):
                    return False
                if self._failed is not None and self._failed[0] == stamp and time.monotonic() < self._failed[2]:
                    return False  # this version failed to load: not again before its back-off ends
            try:
                loaded = await asyncio.to_thread(
                    load_model, spec.run_dir, spec.model, spec.soup_version, spec.device, spec.method
                )
            except ModelUnavailable as err:
                self._note_failure(spec, stamp, err)
                raise
            if spec is not self.spec:  # reconfigured while loading: the newer spec wins
                return False
            self.current = loaded  # the swap: one assignment, readers see the old or the new model, whole
            self.last_error = None
            self.rejected = None
            self._failed = None
            self.reloads += 1
            return True

    def _note_failure(self, spec: ModelSpec, stamp: tuple | None, err: Exception) -> None:
        """Remember a published version that cannot be loaded: the current model stays, /info says why."""
        if stamp is None:
            stamp = soup_stamp(soup_folder(spec.run_dir, spec.soup_version, spec.method))
        if stamp is None:  # nothing published (yet): not a rejected version
            return
        failures = self._failed[1] + 1 if self._failed is not None and self._failed[0] == stamp else 1
        wait = min(self.RETRY_MAX_S, spec.poll_interval_s * 2 ** (failures - 1))
        self._failed = (stamp, failures, time.monotonic() + wait)
        self.rejected = {
            "soup_version": stamp[0],
            "error": str(err),
            "failures": failures,
            "at": time.time(),
            "retry_in_s": round(wait, 2),
        }
        if self.current is not None:
            self.last_error = (
                f"{err}; still serving soup version {self.current.soup_version}, trying again in {wait:.0f}s"
            )
        else:
            self.last_error = str(err)


def ensemble_members(run_dir: Path | str, ensemble: int | list[str]) -> list[str]:
    """Trial ids of the ensemble: explicit ids (checked), or the top-K completed trials by held-out accuracy."""
    run_dir = Path(run_dir)
    if not RunDir(run_dir).results.is_file():
        if ensemble in (0, []):
            return []
        raise ValueError(f"{run_dir} has no results.jsonl: cannot pick ensemble members (set ensemble: 0)")
    known = {r.trial_id for r in trial_records_from_results(run_dir)}
    if isinstance(ensemble, list):
        missing = [t for t in ensemble if t not in known]
        if missing:
            raise ValueError(f"ensemble members {missing} are not completed trials of {run_dir}")
        return list(ensemble)
    rows = [r for r in _results_rows(run_dir) if r.get("trial_id") in known]
    rows.sort(key=lambda r: (-(r.get("heldout") or 0.0), str(r["trial_id"])))
    return [str(r["trial_id"]) for r in rows[:ensemble]]


def repo_root() -> Path:
    """The folder above the package: the source checkout when soup-ray runs from one."""
    return Path(__file__).resolve().parents[2]


def resolve_run_dir(run_dir: str | Path) -> Path:
    """An absolute run folder: as given, or relative to the current folder, or to the repository root."""
    p = Path(run_dir).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, repo_root() / p]
    for c in candidates:
        if RunDir(c).is_run():
            return c.resolve()
    raise FileNotFoundError(
        f"run_dir {run_dir}: no run folder there (expected a base/ folder inside; "
        "set run_dir to a folder written by `soup-ray run`)"
    )
