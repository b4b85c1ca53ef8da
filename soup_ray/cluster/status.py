"""``soup-ray status``: the soup actor's live state, or its last persisted state when it is not running."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..run_dir import RunDir
from .actor import actor_name
from .keeper import read_state
from .session import ray_session


def latest_run(storage: Path = Path("runs")) -> Path | None:
    """The most recently modified run folder under ``storage``."""
    runs = [p for p in storage.glob("*") if RunDir(p).config.is_file()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def live_status(run_dir: Path, namespace: str, address: str | None) -> dict[str, Any] | None:
    """Ask the running soup actor (on the cluster at ``address``); None when none is reachable."""
    if not address:
        return None
    import ray

    started = False
    try:
        started = ray_session(address, namespace=namespace, log_to_driver=False, quiet=True)
        actor = ray.get_actor(actor_name(run_dir), namespace=namespace)
        return ray.get(actor.status.remote(), timeout=30)
    except (ValueError, ConnectionError, ray.exceptions.RayError):
        return None
    finally:
        if started:
            ray.shutdown()


def disk_status(run_dir: Path) -> dict[str, Any] | None:
    """The soup state the actor last persisted under the run folder."""
    state = read_state(run_dir)
    if state is None:
        return None
    soup = state["soup"]
    last = (soup.get("soups") or [{}])[-1]
    h = soup.get("heldout_size")
    return {
        "run_dir": str(run_dir),
        "version": state["version"],
        "ingredients": last.get("ingredients", []),
        "heldout_accuracy": last["correct"] / h if h and last.get("correct") is not None else None,
        "heldout_size": h,
        "evaluations": soup.get("evaluations"),
        "heldout_images_evaluated": soup.get("images_evaluated"),
        "candidates_seen": len(state["records"]) + len(state["rejected"]),
        "rejected": state["rejected"],
        "restarts": state.get("restarts", 0),
        "updated_at": state.get("updated_at"),
    }


def format_status(st: dict[str, Any], live: bool) -> str:
    """A few readable lines about the soup."""
    lines = [
        f"run:         {st.get('run_dir')}",
        f"source:      {'live soup actor (pid {})'.format(st.get('pid')) if live else 'persisted state (actor not running)'}",
        f"soup:        version {st.get('version')}, {len(st.get('ingredients') or [])} ingredient(s)",
    ]
    acc = st.get("heldout_accuracy")
    if acc is not None:
        lines.append(f"held-out:    {100 * acc:.2f}% of {st.get('heldout_size')} images")
    lines.append(
        f"candidates:  {st.get('candidates_seen')} seen, {len(st.get('rejected') or {})} rejected"
        + (f", {st.get('queued')} queued" if live else "")
    )
    if live:
        lines.append(
            f"work:        {'evaluating' if st.get('busy') else 'idle'}; {st.get('evaluations')} evaluations, "
            f"{st.get('heldout_images_evaluated')} held-out images scored; restarts {st.get('restarts')}"
        )
    for tid in st.get("ingredients") or []:
        lines.append(f"  + {tid}")
    for tid, why in (st.get("rejected") or {}).items():
        lines.append(f"  x {tid}: {why}")
    if st.get("updated_at"):
        lines.append(f"updated:     {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st['updated_at']))}")
    if st.get("last_error"):
        lines.append(f"last error:  {st['last_error'].strip().splitlines()[-1]}")
    return "\n".join(lines)


def status(
    run_dir: Path | None, namespace: str = "soup-ray", address: str | None = None
) -> tuple[dict[str, Any], bool]:
    """Live status when a cluster answers, else the persisted one; raises FileNotFoundError when neither exists."""
    if run_dir is None:
        run_dir = latest_run()
        if run_dir is None:
            raise FileNotFoundError("no run folder under runs/; pass RUN_DIR (the folder `soup-ray run` printed)")
    run_dir = Path(run_dir).resolve()
    if not RunDir(run_dir).config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a soup-ray run folder (no config.json)")
    st = live_status(run_dir, namespace, address or os.environ.get("RAY_ADDRESS"))
    if st is not None:
        return st, True
    st = disk_status(run_dir)
    if st is None:
        raise FileNotFoundError(f"{run_dir}: the soup actor has not written any state yet (is the sweep starting?)")
    return st, False
