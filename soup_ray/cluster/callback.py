"""The Tune callback that hands every finished trial to the soup actor without blocking the sweep."""

from __future__ import annotations

import logging
from typing import Any

from ray import tune

from ..results import is_soup_candidate, stopped_early

log = logging.getLogger(__name__)


def trial_offer(trial_id: str, checkpoint_path: str, result: dict[str, Any]) -> dict[str, Any]:
    """The message the soup actor's ``offer`` takes for one finished trial."""
    return {"trial_id": trial_id, "checkpoint": checkpoint_path, "heldout_correct": result.get("heldout_correct")}


class SoupCallback(tune.Callback):
    """On ``on_trial_complete``, fire-and-forget ``offer`` to the run's named soup actor.

    The actor is looked up by name (the handle is not pickled with the Tuner's
    state) and retried by Ray if it is restarting, so a crash of the actor never
    stalls or fails the sweep; the sweep re-offers every trial at the end anyway.
    """

    def __init__(self, actor_name: str, namespace: str | None = None, total: int | None = None, progress: bool = False):
        self.actor_name = actor_name
        self.namespace = namespace
        self.total = total
        self.progress = progress
        self.finished = 0
        self.offered: list[str] = []
        self._handle = None
        self._pending: list[Any] = []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"], state["_pending"] = None, []
        return state

    def _actor(self):
        import ray

        if self._handle is None:
            self._handle = ray.get_actor(self.actor_name, namespace=self.namespace)
        return self._handle

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        self.finished += 1
        if self.progress:
            self._progress_line(trial.trial_id, result)
        ckpt = trial.checkpoint
        if not is_soup_candidate(result) or ckpt is None:  # finished, or stopped at a rung by the scheduler
            return
        try:
            ref = self._actor().offer.remote(trial_offer(trial.trial_id, ckpt.path, result))
        except Exception as err:  # never let the soup stop the sweep
            log.warning(
                "could not offer trial %s to the soup actor (%s); it will be offered at the end", trial.trial_id, err
            )
            return
        self._pending.append(ref)
        self.offered.append(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finished += 1
        if self.progress:
            print(
                f"[soup-ray] trial {trial.trial_id} failed ({self._of()}); its error is in {trial.path}/error.txt",
                flush=True,
            )

    def _of(self) -> str:
        return f"{self.finished}/{self.total}" if self.total else str(self.finished)

    def _progress_line(self, trial_id: str, result: dict[str, Any]) -> None:
        """One console line per finished trial: its held-out score and the live soup as it stands."""
        status = result.get("status", "?")
        acc = result.get("heldout_acc")
        what = (
            f"held-out {100 * acc:.1f}%, {result.get('epoch', '?')} epoch(s), {result.get('seconds', 0):.0f}s"
            if is_soup_candidate(result) and acc is not None
            else status
        )
        if stopped_early(result):
            what += " (stopped at this rung by the scheduler)"
        soup = ""
        try:
            import ray

            st = ray.get(self._actor().status.remote(), timeout=2.0)
            if st.get("soup_size"):
                soup = (
                    f"; live soup v{st['version']}: {st['soup_size']} ingredient(s), held-out "
                    f"{100 * st['heldout_accuracy']:.1f}%"
                )
        except Exception:  # noqa: BLE001 - a progress line never stops the sweep
            soup = ""
        print(f"[soup-ray] trial {trial_id} {what} [{self._of()} done]{soup}", flush=True)
