"""The stages of a run: one console line as each starts, its wall time, and what Ctrl-C in it leaves behind.

A command (``soup-ray run``, ``sweep``, ``report``, ``serve``) walks through
stages in order: stand-in build, data and base, Ray start, trials, finishing
the soup, report and recipes, serving start, serving. :class:`Stages` prints
``[soup-ray] stage: NAME`` as each one starts and keeps its seconds (the
wall-time table). :func:`next_step` says, for the stage a Ctrl-C stopped,
what was finished and which command carries on from there.

Ctrl-C itself: :func:`install_ctrl_c` puts back Python's own handler (a Tune
sweep installs its own and leaves it behind, which would swallow every Ctrl-C
after the sweep) with one addition: once a stop is under way, a second Ctrl-C
exits at once with status 130 instead of waiting for Serve and Ray to shut
down. Standard library only.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Log = Callable[[str], None]

INTERRUPTED = 130
"""Exit status of a command stopped with Ctrl-C (128 + SIGINT), as shells report it."""

STAND_IN = "stand-in build"
DATA = "data and base"
RAY_START = "Ray start"
TRIALS = "trials"
SOUP = "finishing the soup"
REPORT = "report and recipes"
SERVING_START = "serving start"
SERVING = "serving"
ORDER = (STAND_IN, DATA, RAY_START, TRIALS, SOUP, REPORT, SERVING_START, SERVING)
"""Every stage, in the order a run goes through them (serving, which lasts until Ctrl-C, is not timed)."""

PAUSE_ENV = "SOUP_RAY_STAGE_PAUSE"
"""``NAME=SECONDS``: hold stage NAME that long right after its line, to try a Ctrl-C at that moment."""

_stopping = threading.Event()


def stage_pause(name: str) -> float:
    """The seconds ``$SOUP_RAY_STAGE_PAUSE`` holds stage ``name`` (0 unless it names that stage)."""
    want, sep, seconds = os.environ.get(PAUSE_ENV, "").rpartition("=")
    if not sep or want.strip() != name:
        return 0.0
    try:
        return max(0.0, float(seconds))
    except ValueError:
        return 0.0


def _handler(signum: int, frame: Any) -> None:
    if _stopping.is_set():
        print("[soup-ray] second Ctrl-C: exiting now, without waiting for the shutdown", file=sys.stderr, flush=True)
        _kill_descendants()
        os._exit(INTERRUPTED)
    _stopping.set()
    print("[soup-ray] stopping (Ctrl-C again to exit at once) ...", file=sys.stderr, flush=True)
    raise KeyboardInterrupt


def _kill_descendants(wait_s: float = 10.0) -> None:
    """SIGKILL every process this one started, and theirs (an embedded Ray: its raylet, GCS, agents, workers),
    and return once each is gone (or a zombie: its files and ports closed), ``wait_s`` at most.

    Ray gives each worker a process group of its own, so a terminal's Ctrl-C never reaches them, and a
    killed process closes its sockets only after unmapping its memory: without the wait the command could
    exit while Serve's proxy still held the HTTP port."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            alive = []
            for child in children:
                try:
                    if child.status() != psutil.STATUS_ZOMBIE:
                        alive.append(child)
                except psutil.Error:  # gone (reaped)
                    pass
            if not alive:
                return
            children = alive
            time.sleep(0.02)
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


def install_ctrl_c(fresh: bool = True) -> Any:
    """Make Ctrl-C raise ``KeyboardInterrupt`` (and a second one during the stop exit at once); main thread only.

    The command line installs it when a command starts (returns the handler it replaced, or None off the
    main thread). A Tune sweep replaces it while ``Tuner.fit()`` runs; the sweep puts it back as soon as
    fit returns, since Tune's handler stays installed and would only print "Stop signal received" while
    the report is computed and the soup served. ``fresh`` forgets a stop already under way: only a
    command's start does that; putting the handler back later in the same command keeps it.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    if fresh:
        _stopping.clear()
    return signal.signal(signal.SIGINT, _handler)


def raise_if_stopping() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C began a stop. The handler's own ``KeyboardInterrupt`` is lost
    when the signal lands in a finalizer or a weakref callback (Python prints "Exception ignored" and goes
    on); each stage boundary and the serving wait call this, so such a Ctrl-C still stops the command."""
    if _stopping.is_set():
        raise KeyboardInterrupt


def interrupted(err: BaseException) -> bool:
    """Whether ``err`` ends a command as a Ctrl-C: a ``KeyboardInterrupt``, or any error raised once a Ctrl-C
    came. Native code that catches the ``KeyboardInterrupt`` raised inside it can hand back an error of its
    own instead (pydantic-core does while it builds a validator, as importing Ray Serve does)."""
    return isinstance(err, KeyboardInterrupt) or _stopping.is_set()


def stopping() -> None:
    """A stop is under way (a sweep that Tune's own handler stopped, say): with the handler of
    :func:`install_ctrl_c` in place, the next Ctrl-C exits at once."""
    _stopping.set()


@dataclass
class Stages:
    """The stages a command went through: the current one, and each one's wall time in order."""

    log: Log = print
    seconds: dict[str, float] = field(default_factory=dict)
    current: str | None = None  # the stage started last (kept once it ends: where a Ctrl-C came)
    _since: float | None = None  # when the current stage started, while it is being timed

    def start(self, name: str, timed: bool = True) -> None:
        """End the current stage and start ``name``: print ``stage: NAME`` and time it (unless ``timed`` is off).

        A Ctrl-C that came before (even one whose ``KeyboardInterrupt`` was lost) stops here instead."""
        raise_if_stopping()
        self.end()
        self.current = name
        self._since = time.time() if timed else None
        self.log(f"stage: {name}")
        hold = stage_pause(name)
        if hold:
            self.log(f"holding the stage for {hold:g}s ({PAUSE_ENV})")
            time.sleep(hold)
            raise_if_stopping()

    def end(self) -> None:
        """Add the current stage's time to its seconds."""
        if self.current is not None and self._since is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + time.time() - self._since
        self._since = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """The stage ``name`` for what runs inside (ended however the block ends)."""
        self.start(name)
        try:
            yield
        finally:
            self.end()


def next_step(stage: str | None, command: str, run_dir: Path | None, resumable: bool = False) -> str:
    """One line: what a Ctrl-C in ``stage`` of ``soup-ray COMMAND`` left finished, and the command that carries on.

    ``resumable``: the run folder holds a Tune experiment that ``--resume`` can continue.
    """
    sweep_cmd = "run" if command == "run" else "sweep"
    where = f" in {run_dir}" if run_dir is not None else ""
    if stage in (None, STAND_IN):
        return (
            "stopped while building the offline stand-in CLIP; nothing of it was kept. "
            "Start again with the same command"
        )
    if stage == DATA or (stage in (RAY_START, TRIALS) and not resumable):
        return f"stopped before any trial was trained{where}. Start again with the same command" + (
            f" (or --out {run_dir} to reuse its base model)" if run_dir is not None and stage != DATA else ""
        )
    if stage in (RAY_START, TRIALS):
        return (
            f"sweep stopped; finished trials, their checkpoints and the soup are kept{where}. "
            f"Resume with: soup-ray {sweep_cmd} --resume {run_dir}"
        )
    if stage == SOUP:
        return (
            f"every trial finished{where}; the soup actor's queue was not drained. Finish the soup and the "
            f"report with: soup-ray {sweep_cmd} --resume {run_dir}"
        )
    if stage == REPORT:
        tail = f", then serve it with: soup-ray serve {run_dir}" if command == "run" else ""
        return (
            f"the sweep and the soup are done (final soup in {run_dir}/soup); the report was not written. "
            f"Write it with: soup-ray report {run_dir}{tail}"
        )
    if command == "serve":
        return "stopped serving" + (f" {run_dir}" if run_dir is not None else "")
    return f"the run is complete (report: {run_dir}/report.md); serve the soup again with: soup-ray serve {run_dir}"
