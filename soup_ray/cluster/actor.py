"""The soup actor: a named, restartable Ray actor around ``SoupKeeper`` with Ray metrics and a worker thread.

``status()`` answers at once, even while an evaluation runs (threaded actor).
A restarted actor (``max_restarts=-1``) resumes from the run folder's state.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from .keeper import SoupKeeper


class SoupActorBroken(RuntimeError):
    """The soup actor is up but could not build its keeper (a corrupt state file, missing data)."""


def actor_name(run_dir: Path | str) -> str:
    """The soup actor's name for a run: the folder's name and a digest of its full path, so two runs named
    alike in one namespace never share an actor."""
    folder = Path(run_dir).resolve()
    return f"soup:{folder.name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"


class SoupActor:
    """Ray actor shell around ``SoupKeeper`` with Ray metrics and a worker thread."""

    def __init__(
        self, run_dir: str, tie: str = ">=", early_rejection: bool = True, threads: int = 1, keep_versions: int = 3
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.run_dir = run_dir
        self._stop = threading.Event()
        self._retire_generation = 0
        self.fatal_error: str | None = None
        self._setup_metrics(Path(run_dir).name)
        try:
            self.keeper = SoupKeeper(
                run_dir, tie, early_rejection, threads, keep_versions, on_processed=self._record_metrics
            )
        except Exception as err:  # noqa: BLE001 - a failing constructor would make Ray restart it forever
            # stay up and say why: every call answers with the reason instead of hanging the driver
            self.fatal_error = f"{type(err).__name__}: {err}"
            return
        self._thread = threading.Thread(
            target=self.keeper.run_forever, args=(self._stop,), daemon=True, name="soup-worker"
        )
        self._thread.start()
        if self.keeper.retire_idle_s is not None:  # a restarted actor keeps its predecessor's exit plan
            try:
                self.retire_when_idle(self.keeper.retire_idle_s)
            except Exception as err:  # noqa: BLE001 - outside Ray (tests) there is no actor to retire
                self.keeper.last_error = f"could not re-arm the idle exit: {err}"

    def _check(self) -> None:
        if self.fatal_error is not None:
            raise SoupActorBroken(f"the soup actor of {self.run_dir} could not start: {self.fatal_error}")

    def _setup_metrics(self, run: str) -> None:
        from ray.util.metrics import Counter, Gauge

        tags = {"run": run}
        keys = ("run",)
        self._m_seen = Counter("soup_candidates_seen", "Trials offered to the soup actor", tag_keys=keys)
        self._m_rejected = Counter("soup_candidates_rejected", "Offers rejected (bad checkpoint)", tag_keys=keys)
        self._m_images = Counter("soup_heldout_images_evaluated", "Held-out images scored", tag_keys=keys)
        self._m_size = Gauge("soup_size", "Ingredients in the greedy soup", tag_keys=keys)
        self._m_acc = Gauge("soup_heldout_accuracy", "Held-out accuracy of the greedy soup", tag_keys=keys)
        for m in (self._m_seen, self._m_rejected, self._m_images, self._m_size, self._m_acc):
            m.set_default_tags(tags)

    def _record_metrics(self, admitted: int, rejected: int, update: Any, keeper: SoupKeeper) -> None:
        if admitted + rejected:
            self._m_seen.inc(admitted + rejected)
        if rejected:
            self._m_rejected.inc(rejected)
        if update is not None and update.images_evaluated:
            self._m_images.inc(update.images_evaluated)
        self._m_size.set(len(keeper.soup.ingredients))
        if keeper.soup.accuracy is not None:
            self._m_acc.set(keeper.soup.accuracy)

    def offer(self, trial: dict[str, Any]) -> dict[str, Any]:
        self._check()
        return self.keeper.offer(trial)

    def status(self) -> dict[str, Any]:
        """The keeper's latest snapshot, with the Ray node this actor runs on."""
        import ray

        where = {"node_id": ray.get_runtime_context().get_node_id()}
        if self.fatal_error is not None:
            return {"run_dir": self.run_dir, "fatal_error": self.fatal_error, "pid": os.getpid(), **where}
        return {**self.keeper.status(), **where}

    def wait_idle(self, timeout: float = 600.0) -> bool:
        self._check()
        return self.keeper.wait_idle(timeout)

    def pid(self) -> int:
        return os.getpid()

    def retire_when_idle(self, idle_s: float, poll_s: float = 1.0) -> float:
        """Exit for good once nothing was offered or evaluated for ``idle_s`` seconds; returns at once.

        On a cluster the actor is detached and holds its CPU/GPU share until it
        exits, which would keep a GPU node (and its bill) from scaling down. Its
        state stays in the run folder (``soup-ray status`` reads it from there),
        and a new ``start_soup_actor`` for the run resumes from it. An offer in
        the meantime restarts the count; ``keep_alive`` cancels it (a new sweep
        on the same run folder calls it). Returns the seconds it will wait at least;
        an actor whose keeper could not start exits at once and returns 0.
        """
        import ray

        me = ray.get_runtime_context().current_actor
        if self.fatal_error is not None:  # a broken actor holds its CPU/GPU share for nothing: it exits at once

            def leave() -> None:
                time.sleep(0.2)  # let this call answer first
                ray.kill(me, no_restart=True)

            threading.Thread(target=leave, daemon=True, name="soup-retire").start()
            return 0.0
        keeper = self.keeper
        with keeper.lock:
            keeper.touch()
            self._retire_generation += 1
            generation = self._retire_generation
            keeper.set_retirement(idle_s)

        def watch() -> None:
            while not self._stop.wait(poll_s):
                with keeper.lock:  # offers take this lock too: none can slip in between the check and the flag
                    if generation != self._retire_generation:
                        return  # cancelled, or replaced by a newer request
                    quiet = keeper.idle_seconds()
                    if quiet is None or quiet < idle_s:
                        continue
                    keeper.retiring = True
                self._stop.set()
                ray.kill(me, no_restart=True)  # intentional: Ray does not restart it
                return

        threading.Thread(target=watch, daemon=True, name="soup-retire").start()
        return float(idle_s)

    def keep_alive(self) -> None:
        """Cancel a pending ``retire_when_idle`` (the run folder is in use again)."""
        self._check()
        with self.keeper.lock:
            self._retire_generation += 1
            self.keeper.set_retirement(None)


def start_soup_actor(
    run_dir: Path,
    namespace_actor_options: dict[str, Any] | None = None,
    *,
    tie: str = ">=",
    early_rejection: bool = True,
    cpu: float = 0.25,
    gpu: float = 0.0,
    detached: bool = False,
    keep_versions: int = 3,
    resources: dict[str, float] | None = None,
):
    """Create (or reattach to) the run's named soup actor; ``resources`` are Ray custom resources it asks for."""
    import ray

    opts: dict[str, Any] = {
        "name": actor_name(run_dir),
        "get_if_exists": True,
        "max_restarts": -1,
        "max_task_retries": -1,
        "max_concurrency": 8,
        "num_cpus": cpu,
        "num_gpus": gpu,
    }
    if resources:
        opts["resources"] = dict(resources)
    if detached:
        opts["lifetime"] = "detached"
    opts.update(namespace_actor_options or {})
    threads = max(1, int(round(cpu))) if cpu >= 1 else 1
    cls = ray.remote(SoupActor)
    return cls.options(**opts).remote(str(Path(run_dir).resolve()), tie, early_rejection, threads, keep_versions)
