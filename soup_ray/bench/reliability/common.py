"""What the fault scenarios share: the settings, the ``Bench``, the watchdog, the checks and the process helpers."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from ...run_dir import HEAD_FILE, OPEN_CLIP_WEIGHTS, RunDir

Log = Callable[[str], None]

STANDIN_STEPS = 20


class ScenarioTimeout(RuntimeError):
    """A scenario ran past its time bound."""


# ---------------------------------------------------------------- settings


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A small complete sweep config: the tiny stand-in (``STANDIN_STEPS`` steps), digits, short trials.

    Dotted keys override nested values (``{"tune.num_samples": 4}``).
    """
    cfg: dict[str, Any] = {
        "name": "reliability",
        "model": {"name": "soupray-digits-tiny", "pretrained": "standin", "standin_steps": STANDIN_STEPS},
        "data": {"kind": "digits", "shifts": ["rotate", "noise"]},
        "search_space": {
            "lr": {"loguniform": [1e-3, 4e-3]},
            "weight_decay": 0.1,
            "epochs": 1,
            "batch_size": 64,
            "warmup_steps": 2,
        },
        "tune": {"num_samples": 2, "seed": 0, "loggers": ["json"]},
        "trial_resources": {"cpu": 0.875},
        "ray": {"dashboard": False},
        "soup": {"methods": []},
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cfg


class Bench:
    """What every scenario shares: the options, the work folder, the log and the run scenario 1 produced."""

    def __init__(self, args: argparse.Namespace, work: Path, log: Log):
        self.args, self.quick, self.work, self.log = args, bool(args.quick), work, log
        self.served_run: Path | None = Path(args.serve_run).resolve() if args.serve_run else None
        self.sweep_log: list[str] = []

    def quiet(self, msg: str) -> None:
        """Log sink for the package's own progress lines (kept, shown with --verbose)."""
        self.sweep_log.append(msg)
        if self.args.verbose:
            self.log(f"    | {msg}")


@contextlib.contextmanager
def watchdog(seconds: float, what: str) -> Iterator[list[bool]]:
    """Stop a sweep that runs past ``seconds`` the way Ctrl-C does (Tune saves its state and returns).

    Raises ``ScenarioTimeout`` if it fired.
    """
    fired: list[bool] = []

    def fire() -> None:
        fired.append(True)
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    except KeyboardInterrupt:
        if fired:
            raise ScenarioTimeout(f"{what} ran past its bound of {seconds:.0f}s") from None
        raise
    finally:
        timer.cancel()
    if fired:
        raise ScenarioTimeout(f"{what} ran past its bound of {seconds:.0f}s")


# ---------------------------------------------------------------- checks shared by the sweeps


def compare_with_offline_soup(run_dir: Path, tie: str = ">=", early_rejection: bool = True) -> dict[str, Any]:
    """The published ``RUN_DIR/soup/`` against the batch greedy soup over ``results.jsonl``'s trials.

    Bit-identical means the same ingredients and ``torch.equal`` on the head
    (``classifier_head.safetensors``) and on every tensor of the open_clip
    weights (the base CLIP with the soup's image tower).
    """
    import torch
    from safetensors.torch import load_file

    from ...export import clip_state_with_soup
    from ...ingredients import Kitchen, trial_records_from_results
    from ...soup import greedy_soup

    paths = RunDir(run_dir)
    kitchen = Kitchen(paths.path)
    candidates = [kitchen.admit(r) for r in trial_records_from_results(paths.path)]
    offline = greedy_soup(
        candidates,
        kitchen.evaluate,
        heldout_size=kitchen.heldout_size,
        tie=tie,  # type: ignore[arg-type]
        early_rejection=early_rejection,
    )
    published_info = json.loads(paths.soup_info.read_text())
    expected = kitchen.soup_weights(list(offline.ingredients))
    head = load_file(str(paths.soup / HEAD_FILE))
    head_equal = torch.equal(head["weight"], expected["head.weight"]) and torch.equal(
        head["bias"], expected["head.bias"]
    )
    clip_expected = clip_state_with_soup(load_file(str(paths.base / OPEN_CLIP_WEIGHTS)), expected)
    clip_published = load_file(str(paths.soup / OPEN_CLIP_WEIGHTS))
    keys_equal = set(clip_expected) == set(clip_published)
    differing = sorted(
        k
        for k in clip_expected
        if k in clip_published and not torch.equal(clip_expected[k].contiguous(), clip_published[k])
    )
    return {
        "candidates": len(candidates),
        "offline_ingredients": list(offline.ingredients),
        "published_ingredients": published_info.get("ingredients"),
        "published_version": published_info.get("version"),
        "offline_heldout_accuracy": offline.correct / kitchen.heldout_size,
        "published_heldout_accuracy": published_info.get("heldout_accuracy"),
        "ingredients_equal": list(offline.ingredients) == list(published_info.get("ingredients") or []),
        "head_bit_identical": bool(head_equal),
        "open_clip_tensors": len(clip_published),
        "open_clip_keys_equal": keys_equal,
        "open_clip_tensors_differing": differing[:20],
        "bit_identical": bool(
            head_equal
            and keys_equal
            and not differing
            and list(offline.ingredients) == list(published_info.get("ingredients") or [])
        ),
    }


def accounting(state_file: Path, sent_ids: Sequence[str], status: dict[str, Any] | None) -> dict[str, Any]:
    """Offers sent against those the soup actor accounted for (records + rejected), lost and double-counted."""
    state = json.loads(state_file.read_text())
    records, rejected = dict(state.get("records") or {}), dict(state.get("rejected") or {})
    cand_ids = [str(c["id"]) for c in (state.get("soup") or {}).get("candidates", [])]
    sent = sorted(set(sent_ids))
    lost = sorted(set(sent) - set(records) - set(rejected))
    double = (len(cand_ids) - len(set(cand_ids))) + len(set(records) & set(rejected))
    ingredients = list((status or {}).get("ingredients") or [])
    double += len(ingredients) - len(set(ingredients))
    return {
        "offers_sent": len(sent),
        "offers_accounted_for": len(records) + len(rejected),
        "records": len(records),
        "rejected": rejected,
        "soup_candidates": len(cand_ids),
        "lost": len(lost),
        "lost_ids": lost,
        "double_counted": double,
        "unknown_ids_accounted": sorted(set(records) - set(sent)),
        "actor_restarts_in_state": state.get("restarts"),
    }


def result_lines(trial_dir: Path) -> list[dict[str, Any]]:
    """Tune's ``result.json`` rows of one trial (one per reported epoch)."""
    f = trial_dir / "result.json"
    if not f.exists():
        return []
    out = []
    for line in f.read_text().splitlines():
        if line.strip():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def trial_dirs(run_dir: Path) -> list[Path]:
    return sorted(d for d in RunDir(run_dir).tune.glob("*") if d.is_dir() and (d / "params.json").exists())


def descendants_of_me() -> set[int]:
    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def process_key(p: psutil.Process) -> tuple[int, float] | None:
    try:
        return p.pid, p.create_time()
    except psutil.Error:
        return None


def still_alive(keys: Sequence[tuple[int, float]]) -> list[psutil.Process]:
    out = []
    for pid, created in keys:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def in_session(sid: int) -> list[psutil.Process]:
    """Live processes of session ``sid`` (the killed driver was started as a session leader)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.pid != sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            continue
    return out
