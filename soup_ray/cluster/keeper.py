"""The soup keeper: the soup actor's logic without Ray, keeping the greedy soup exact while a sweep runs.

A shell around ``soup.IncrementalGreedySoup`` and ``ingredients.Kitchen``:

- ``offer(trial)`` is idempotent by trial id and returns at once: the trial is
  written to an inbox on disk first, so an offer accepted before a crash is
  never lost; a worker thread drains the inbox.
- Checkpoints are checked before they can join (base fingerprint, keys,
  shapes and dtypes, finite values, readable); a rejected offer leaves the soup
  unchanged and its reason is recorded.
- An evaluation that fails never blocks the offers after it: it is retried
  with a back-off, then the offer is given up (a re-offer tries again); an
  ingredient whose weights cannot be read any more is dropped from the soup.
- After every change the state is persisted under ``RUN_DIR/soup_state/`` and a
  restarted keeper resumes exactly where it was. An offer counts as processed
  (and leaves the inbox) only together with the soup it led to.
- Each new soup version is published as an open_clip ``local-dir:`` folder under
  ``RUN_DIR/soup_versions/`` and mirrored to ``RUN_DIR/soup/``.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..atomic import write_json
from ..export import export_soup, recover_folder
from ..ingredients import CheckpointRejected, CheckpointUnavailable, IngredientUnreadable, Kitchen, TrialRecord
from ..run_dir import RunDir
from ..soup import Candidate, IncrementalGreedySoup, Update

ProcessedHook = Callable[[int, int, "Update | None", "SoupKeeper"], None]
"""``hook(admitted, rejected, update, keeper)`` after each processed batch of offers (e.g. Ray metrics)."""


def read_state(run_dir: Path | str) -> dict[str, Any] | None:
    """The soup keeper's last persisted state, or None when it has not written one yet."""
    p = RunDir(run_dir).state_file
    if not p.is_file():
        return None
    return json.loads(p.read_text())


TRANSIENT_ATTEMPTS = 5
"""A checkpoint that cannot be read yet (not visible on a network mount, an I/O error) is tried this many times,
with a growing pause between tries; a later re-offer of the same trial tries again."""


def published_versions(versions_dir: Path) -> list[int]:
    """Version numbers of the soup folders already published (``soup_versions/v000N``)."""
    out = []
    for p in versions_dir.glob("v*"):
        if p.is_dir() and p.name[1:].isdigit():
            out.append(int(p.name[1:]))
    return sorted(out)


class SoupKeeper:
    """The actor's logic without Ray (so it can be tested and reused directly)."""

    def __init__(
        self,
        run_dir: str,
        tie: str = ">=",
        early_rejection: bool = True,
        threads: int = 1,
        keep_versions: int = 3,
        publish: bool = True,
        on_processed: ProcessedHook | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.paths = RunDir(self.run_dir)
        self.on_processed = on_processed
        self.kitchen = Kitchen(self.run_dir, threads=threads)
        self.attempts: dict[str, int] = {}
        self.retry_at: dict[str, float] = {}
        self.tie, self.early_rejection = tie, early_rejection
        self.keep_versions, self.publish_enabled = keep_versions, publish
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self.busy = False
        self.publishing = False  # a soup folder is being written and swapped in (the idle exit waits for it)
        self.last_error: str | None = None
        self.publish_pending = False  # the soup changed but its folder is not written yet (retried)
        self.publish_retry_at = 0.0
        self.transient: set[str] = set()  # rejected only for being unreadable so far: a re-offer retries
        self.retire_idle_s: float | None = None  # a pending retire_when_idle request (survives a restart)
        self.last_offer_at = self.last_change_at = time.time()  # for retiring an idle actor
        self.retiring = False
        state = read_state(self.run_dir)
        if state is None:
            self.soup = IncrementalGreedySoup(
                self.kitchen.evaluate, heldout_size=self.kitchen.heldout_size, tie=tie, early_rejection=early_rejection
            )  # type: ignore[arg-type]
            self.records: dict[str, dict] = {}
            self.rejected: dict[str, str] = {}
            self.version = 0
            self.published: dict[str, Any] = {}
            self.restarts = 0
        else:
            if state.get("tie", tie) != tie:
                raise ValueError(
                    f"{self.paths.state_file} was written with tie {state.get('tie')!r}, but this "
                    f"keeper was asked for {tie!r}: keep soup.tie as the run had it, or start a new run "
                    "folder"
                )
            saved_size = (state.get("soup") or {}).get("heldout_size")
            if saved_size is not None and int(saved_size) != self.kitchen.heldout_size:
                raise ValueError(
                    f"{self.paths.state_file} was written for {saved_size} held-out images, but the "
                    f"run's data now gives {self.kitchen.heldout_size}: the held-out split changed; "
                    "start a new run folder"
                )
            self.records = state["records"]
            self.rejected = state["rejected"]
            self.version = state["version"]
            self.published = state.get("published", {})
            self.restarts = state.get("restarts", 0) + 1
            self.transient = set(state.get("transient_rejections", []))
            self.retire_idle_s = state.get("retire_idle_s")
            self.publish_pending = bool(state.get("publish_pending", False))
            # a crash between writing a version folder and this state leaves a folder newer than the state's
            # number: never reuse a number, so each version number names one soup only
            on_disk = published_versions(self.paths.versions)
            if on_disk and on_disk[-1] > self.version:
                self.version = on_disk[-1]
                self.publish_pending = True
            for rec in self.records.values():
                self.kitchen.paths[rec["trial_id"]] = TrialRecord.from_json(rec)
            self.soup = IncrementalGreedySoup.from_state(state["soup"], self.kitchen.evaluate)
        # what _persist writes of the soup: its state as of the last commit, never one the worker is changing
        self._soup_state = self.soup.to_state()
        if state is not None:
            # an offer recorded without its soup (a state persisted mid-evaluation by an older keeper): queue it again
            for tid in [t for t in self.records if t not in self.soup]:
                rec = self.records.pop(tid)
                write_json(
                    self._inbox_file(tid),
                    {
                        "trial_id": tid,
                        "checkpoint": rec.get("checkpoint"),
                        "heldout_correct": rec.get("heldout_correct"),
                    },
                    indent=1,
                    durable=True,
                )
            self._persist()
        self.inbox = self._read_inbox()
        recover_folder(self.paths.soup)  # a crash inside a two-rename swap left the served soup aside
        self._snapshot = self._make_snapshot()

    # -- bookkeeping -----------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "soup": self._soup_state,
            "records": self.records,
            "rejected": self.rejected,
            "version": self.version,
            "published": self.published,
            "restarts": self.restarts,
            "tie": self.tie,
            "transient_rejections": sorted(self.transient),
            "retire_idle_s": self.retire_idle_s,
            "publish_pending": self.publish_pending,
            "updated_at": time.time(),
        }

    def _inbox_dir(self) -> Path:
        return self.paths.inbox

    def _read_inbox(self) -> list[dict]:
        """Offers accepted but not yet processed (they survive a crash as one file each)."""
        out = []
        for p in sorted(self._inbox_dir().glob("*.json"), key=lambda q: q.stat().st_mtime_ns):
            try:
                rec = json.loads(p.read_text())
                if not isinstance(rec, dict) or not isinstance(rec.get("trial_id"), str):
                    raise ValueError("not an offer object with a trial_id")
            except (OSError, ValueError) as err:
                self._set_aside(p, f"unreadable inbox file {p.name}: {err}")
                continue
            if rec["trial_id"] not in self.records and rec["trial_id"] not in self.rejected:
                out.append(rec)
            else:
                p.unlink(missing_ok=True)
        return out

    def _set_aside(self, path: Path, reason: str) -> None:
        """Move an inbox file nobody can read to ``soup_state/unreadable/`` and record why (never lose it silently)."""
        aside = self.paths.state_dir / "unreadable"
        aside.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, aside / f"{path.stem}.{time.time_ns()}{path.suffix}")
        except OSError:
            pass
        self.rejected[path.name] = reason

    def _inbox_file(self, trial_id: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in trial_id)
        return self._inbox_dir() / f"{safe}.json"

    def _persist(self) -> None:
        """Write the state (the soup as of the last :meth:`_commit`); call with :attr:`lock` held."""
        self.last_change_at = time.time()
        write_json(self.paths.state_file, self._state(), indent=1, durable=True)

    def _commit(self) -> None:
        """Take the soup as it is now into the state and persist it; call with :attr:`lock` held."""
        self._soup_state = self.soup.to_state()
        self._persist()

    def _attempt(self, tid: str) -> bool:
        """Count a failed try of ``tid``; True (with its back-off set) while another try is due."""
        self.attempts[tid] = self.attempts.get(tid, 0) + 1
        if self.attempts[tid] < TRANSIENT_ATTEMPTS:
            self.retry_at[tid] = time.time() + min(30.0, 2.0 ** self.attempts[tid])
            return True
        return False

    def _make_snapshot(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "version": self.version,
            "ingredients": list(self.soup.ingredients),
            "soup_size": len(self.soup.ingredients),
            "heldout_accuracy": self.soup.accuracy,
            "heldout_size": self.kitchen.heldout_size,
            "candidates_seen": len(self.records) + len(self.rejected),
            "candidates_accepted_as_candidates": len(self.records),
            "rejected": dict(self.rejected),
            "queued": len(self.inbox),
            "busy": self.busy,
            "evaluations": self.soup.evaluations,
            "heldout_images_evaluated": self.soup.images_evaluated,
            "restarts": self.restarts,
            "published": dict(self.published),
            "history": self.soup.history,
            "tie": self.tie,
            "pid": os.getpid(),
            "last_error": self.last_error,
            "publish_pending": self.publish_pending,
        }

    # -- public ------------------------------------------------------------------

    def offer(self, trial: dict[str, Any]) -> dict[str, Any]:
        """Queue a finished trial (idempotent by trial id); returns at once."""
        tid = str(trial["trial_id"])
        with self._lock:
            if self.retiring:
                raise RuntimeError(
                    f"the soup actor of {self.run_dir} is retiring: offer {tid} to a new one "
                    "(start_soup_actor resumes from the run folder)"
                )
            self.last_offer_at = time.time()
            if tid in self.transient:  # it was only unreadable so far: try again from the start
                self.transient.discard(tid)
                self.rejected.pop(tid, None)
                self.attempts.pop(tid, None)
                self.retry_at.pop(tid, None)
            known = tid in self.records or tid in self.rejected or any(r["trial_id"] == tid for r in self.inbox)
            if known:
                return {"trial_id": tid, "queued": False, "duplicate": True}
            rec = {
                "trial_id": tid,
                "checkpoint": str(trial["checkpoint"]),
                "heldout_correct": trial.get("heldout_correct"),
            }
            write_json(self._inbox_file(tid), rec, indent=1, durable=True)
            self.inbox.append(rec)
            self._snapshot = {**self._snapshot, "queued": len(self.inbox)}
            self._wake.notify_all()
        return {"trial_id": tid, "queued": True, "duplicate": False}

    def status(self) -> dict[str, Any]:
        """The latest snapshot (never waits for an evaluation)."""
        return dict(self._snapshot)

    def pending(self) -> int:
        """Offers queued or being evaluated, plus one while a changed soup is not yet published."""
        with self._lock:
            return len(self.inbox) + (1 if self.busy else 0) + (1 if self.publish_pending else 0)

    def process_inbox(self) -> int:
        """Admit and offer everything queued, in one incremental update; returns how many were handled.

        Nothing of the batch is recorded until the soup it leads to is: the
        records, rejections, soup and inbox change together under the lock, so a
        state persisted meanwhile (``set_retirement``) never counts an offer
        whose soup is not decided yet.
        """
        now = time.time()
        with self._lock:
            batch = [r for r in self.inbox if self.retry_at.get(str(r.get("trial_id")), 0.0) <= now]
            self.busy = bool(batch)
            self._snapshot = {**self._snapshot, "busy": self.busy}
        if not batch:
            return 0
        try:
            admitted: list[tuple[dict, Candidate]] = []
            retry: set[str] = set()
            rejected: dict[str, str] = {}
            given_up: set[str] = set()  # unreadable so far: a re-offer tries again
            for rec in batch:
                tid = str(rec.get("trial_id"))
                try:
                    admitted.append((rec, self.kitchen.admit(TrialRecord.from_json(rec))))
                except (CheckpointUnavailable, OSError) as err:  # e.g. a network mount not caught up yet
                    if self._attempt(tid):
                        retry.add(tid)
                    else:
                        rejected[tid] = f"still unreadable after {self.attempts[tid]} attempts: {err}"
                        given_up.add(tid)
                except CheckpointRejected as err:
                    rejected[tid] = str(err)
                except Exception as err:  # noqa: BLE001 - a poison offer must never block the ones after it
                    rejected[tid] = f"offer could not be admitted: {type(err).__name__}: {err}"
            before = self.soup.ingredients
            update, later, failed = self._update_soup([c for _, c in admitted])
            retry |= later
            rejected.update(failed)
            given_up |= set(failed)
            with self._lock:
                for rec, cand in admitted:
                    if cand.id in self.soup:
                        self.records[cand.id] = {**rec, "heldout_correct": cand.heldout_correct}
                self.rejected.update(rejected)
                self.transient |= given_up
                if self.soup.ingredients != before:
                    self.publish_pending = self.publish_enabled
                done = {r["trial_id"] for r in batch} - retry
                self.inbox = [r for r in self.inbox if r["trial_id"] not in done]
                self._commit()  # the soup's new state (and that a publish is due) first: offers are never lost
                for tid in done:
                    self._inbox_file(tid).unlink(missing_ok=True)
            self.publish_if_pending()
            with self._lock:
                self.busy = False
                self._snapshot = self._make_snapshot()
            self._metrics(len(admitted), len(batch) - len(admitted), update)
            return len(batch)
        except Exception:  # keep the actor alive; the error is visible in status()
            self.last_error = traceback.format_exc(limit=5)
            with self._lock:
                self.busy = False
                self._snapshot = {**self._make_snapshot(), "last_error": self.last_error}
            raise

    def _update_soup(self, cands: list[Candidate]) -> tuple[Update | None, set[str], dict[str, str]]:
        """Offer ``cands`` to the soup so that no failing evaluation blocks the others.

        Returns the update (None when nothing was offered), the ids to try again
        later and the ids given up on for now, with why. A failure caused by a
        soup candidate whose weights cannot be read any more defers the whole
        batch (a mount may catch up); after ``TRANSIENT_ATTEMPTS`` such failures
        that candidate is dropped (:meth:`_drop`) and the batch goes on. Any
        other failure splits a batch into single offers; a single offer that
        keeps failing is given up on with the reason.
        """
        if not cands:
            return None, set(), {}
        before, before_correct = self.soup.ingredients, self.soup.correct
        evaluations = images = 0
        last: Update | None = None
        later: set[str] = set()
        failed: dict[str, str] = {}
        groups = [list(cands)]
        for _ in range(4 * (len(cands) + len(self.soup)) + 4):  # each pass settles a group or drops a candidate
            if not groups:
                break
            group = groups.pop(0)
            try:
                last = self.soup.offer(group)
                evaluations, images = evaluations + last.evaluations, images + last.images_evaluated
                continue
            except Exception as err:  # noqa: BLE001 - an OOM, a lost file: the keeper goes on either way
                self.last_error = traceback.format_exc(limit=5)
                why = f"{type(err).__name__}: {err}"
                ids = {c.id for c in group}
                lost = err.trial_id if isinstance(err, IngredientUnreadable) else None
                if lost is not None and lost not in ids and lost in self.soup:
                    if self._attempt(lost):
                        waiting = ids | {c.id for g in groups for c in g}
                        for tid in waiting:
                            self.retry_at[tid] = self.retry_at[lost]
                        later |= waiting
                        groups = []
                        break
                    try:
                        self._drop(lost, why)
                    except Exception as err2:  # noqa: BLE001 - the soup stays as it was; the offer is retried
                        why = f"{why}; dropping {lost} failed too: {type(err2).__name__}: {err2}"
                    else:
                        groups.insert(0, group)
                        continue
                if len(group) > 1:
                    groups = [[c] for c in group] + groups
                    continue
                tid = group[0].id
                if self._attempt(tid):
                    later.add(tid)
                else:
                    failed[tid] = f"could not be evaluated after {self.attempts[tid]} attempts: {why}"
        for g in groups:  # the pass limit was reached: whatever is left is tried again later
            later |= {c.id for c in g}
        if last is None:
            return None, later, failed
        return (
            replace(
                last,
                previous_ingredients=before,
                previous_correct=before_correct,
                evaluations=evaluations,
                images_evaluated=images,
            ),
            later,
            failed,
        )

    def _drop(self, tid: str, why: str) -> None:
        """Take a soup candidate whose weights cannot be read any more out of the soup and commit that.

        The soup then equals the greedy soup of the others; the trial is listed
        as rejected with the reason, and a re-offer (the end of the sweep offers
        every trial again) tries it from the start.
        """
        update = self.soup.remove([tid])
        with self._lock:
            self.records.pop(tid, None)
            self.rejected[tid] = f"dropped from the soup: its checkpoint cannot be read any more ({why})"
            self.transient.add(tid)
            self.attempts.pop(tid, None)
            self.retry_at.pop(tid, None)
            if update.changed:
                self.publish_pending = self.publish_enabled
            self._commit()

    def publish_if_pending(self) -> bool:
        """Publish the current soup as the next version if it changed since the last one; returns whether it did.

        The version number moves on only once the folder is written, so a failed
        publish (a full disk, a lost mount) is retried with the next number
        still free and Serve never stays on an old soup for good.
        """
        if not self.publish_pending or time.time() < self.publish_retry_at:
            return False
        if not self.soup.ingredients:
            self.publish_pending = False
            return False
        version = max([self.version, *published_versions(self.paths.versions)]) + 1
        with self._lock:
            if self.retiring:  # the idle exit was decided: a folder half swapped in must not be left behind
                return False
            self.publishing = True
        try:
            self._publish(version)
        except Exception as err:
            with self._lock:
                self.publishing = False
            self.last_error = traceback.format_exc(limit=5)
            self.publish_retry_at = time.time() + 5.0
            lost = err.trial_id if isinstance(err, IngredientUnreadable) else None
            if lost is not None and lost in self.soup and not self._attempt(lost):
                try:
                    self._drop(lost, f"{type(err).__name__}: {err}")  # a soup without it is published next
                except Exception:  # noqa: BLE001 - retried at the next publish
                    self.last_error = traceback.format_exc(limit=5)
                else:
                    self.publish_retry_at = 0.0
            return False
        with self._lock:
            self.publishing = False
            self.version = version
            self.published = {
                "version": version,
                "folder": str(self.paths.version(version)),
                "ingredients": list(self.soup.ingredients),
            }
            self.publish_pending = False
            self.last_error = None
            self._persist()
            self._snapshot = self._make_snapshot()
        return True

    def _publish(self, version: int) -> None:
        ids = list(self.soup.ingredients)
        info = {
            "version": version,
            "ingredients": ids,
            "heldout_accuracy": self.soup.accuracy,
            "heldout_correct": self.soup.correct,
            "heldout_size": self.kitchen.heldout_size,
            "tie": self.tie,
            "published_at": time.time(),
        }
        weights = self.kitchen.soup_weights(ids)
        versions = self.paths.versions
        export_soup(self.paths.base, weights, self.paths.version(version), info)
        export_soup(self.paths.base, weights, self.paths.soup, info)
        old = sorted(p for p in versions.glob("v*") if p.is_dir())
        for p in old[: max(0, len(old) - self.keep_versions)]:
            shutil.rmtree(p, ignore_errors=True)

    def _metrics(self, admitted: int, rejected: int, update: Any) -> None:
        if self.on_processed is not None:
            self.on_processed(admitted, rejected, update, self)

    def run_forever(self, stop: threading.Event) -> None:
        """The worker loop: wait for offers, process them, repeat."""
        while not stop.is_set():
            if self.publish_pending:
                self.publish_if_pending()
            with self._lock:
                if not self.inbox:
                    self._wake.wait(timeout=0.5)
                    continue
            try:
                if self.process_inbox() == 0:
                    time.sleep(0.5)  # only offers waiting for a retry: their backoff has not run out yet
            except Exception:
                time.sleep(1.0)  # last_error is in status(); retry later

    @property
    def lock(self) -> threading.Lock:
        """The lock every offer takes: hold it to check and change the keeper's state with no offer in between."""
        return self._lock

    def set_retirement(self, idle_s: float | None) -> None:
        """Record (or clear) a pending exit after ``idle_s`` idle seconds, so a restart keeps it; call with :attr:`lock` held."""
        self.retire_idle_s = idle_s
        self._persist()

    def touch(self) -> None:
        """Count now as activity (restarts an idle countdown); call with :attr:`lock` held."""
        self.last_offer_at = time.time()

    def idle_seconds(self) -> float | None:
        """Seconds since the last offer or change, or None while offers are queued or evaluated or a soup is being
        published; call with :attr:`lock` held."""
        if self.inbox or self.busy or self.publishing:
            return None
        return time.time() - max(self.last_offer_at, self.last_change_at)

    def wait_idle(self, timeout: float) -> bool:
        """Block until the inbox is empty and nothing is being evaluated (or ``timeout`` passes)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.pending() == 0:
                return True
            time.sleep(0.05)
        return self.pending() == 0
