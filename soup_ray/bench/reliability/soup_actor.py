"""Scenario 1: the soup actor killed during a sweep (after trial completions and while evaluating)."""

from __future__ import annotations

import threading
import time
from typing import Any

from ...run_dir import RunDir
from .common import Bench, accounting, compare_with_offline_soup, tiny_config, watchdog


def soup_actor_killer(
    name: str, namespace: str, at: set[int], extra_at: int, want: int, kills: list[dict], sent: list[str], t0: float
):
    """A Tune callback: kill the soup actor (Ray restarts it) after the trial completions in ``at``, and once more
    at ``extra_at`` if fewer than ``want`` kills happened by then; records the offers the sweep sends."""
    from ray import tune

    class _KillSoupActor(tune.Callback):
        def __init__(self) -> None:
            self.seen = 0

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            import ray

            self.seen += 1
            result = trial.last_result or {}
            if result.get("status") == "completed" and trial.checkpoint is not None:
                sent.append(trial.trial_id)  # the sweep's SoupCallback offers exactly these
            if self.seen in at or (self.seen == extra_at and len(kills) < want):
                try:
                    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=False)
                    kills.append(
                        {
                            "when": f"after trial completion {self.seen}",
                            "t_s": round(time.time() - t0, 2),
                            "while_evaluating": False,
                        }
                    )
                except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
                    kills.append({"when": f"after trial completion {self.seen}", "failed": repr(err)})

    return _KillSoupActor()


def busy_killer(
    name: str,
    namespace: str,
    kills: list[dict],
    stop: threading.Event,
    max_kills: int,
    t0: float,
    deadline: float,
    polls: list[int],
) -> None:
    """Poll the soup actor's ``status()``; kill it when it reports ``busy`` (evaluating or publishing).

    At most ``max_kills`` times, and only after the actor processed at least one
    more offer since the last such kill (so it is never kept from making progress).
    """
    import ray

    last_seen, last_kill = -1, 0.0
    done = 0
    for _ in range(200_000):
        if stop.is_set() or time.time() >= deadline or done >= max_kills:
            return
        try:
            actor = ray.get_actor(name, namespace=namespace)
            st = ray.get(actor.status.remote(), timeout=5.0)
            polls[0] += 1
        except Exception:  # noqa: BLE001 - not created yet, restarting: try again shortly
            stop.wait(0.2)
            continue
        seen = int(st.get("candidates_seen") or 0)
        if st.get("busy") and seen > last_seen and time.time() - last_kill > 2.0:
            ray.kill(actor, no_restart=False)
            last_seen, last_kill = seen, time.time()
            done += 1
            kills.append(
                {
                    "when": "while evaluating (status() said busy)",
                    "t_s": round(time.time() - t0, 2),
                    "while_evaluating": True,
                    "candidates_seen_then": seen,
                    "queued_then": st.get("queued"),
                    "soup_version_then": st.get("version"),
                }
            )
        stop.wait(0.02)


def scenario_soup_actor(b: Bench, rec: dict[str, Any]) -> None:
    from ...cluster.actor import actor_name
    from ...cluster.sweep import run_sweep
    from ...config import parse_config
    from ...prepare import prepare_run

    n = 4 if b.quick else 6
    cfg = parse_config(tiny_config(**{"tune.num_samples": n, "tune.seed": 3}))
    run_dir = b.work / "s1-soup-actor" / "run"
    t_prep = time.time()
    prep = prepare_run(cfg, run_dir, log=b.quiet)
    rec["details"]["prepare_s"] = round(time.time() - t_prep, 1)
    name, ns = actor_name(prep.run_dir), cfg.ray.namespace
    at = {max(1, n // 3), n - 1}  # the extra kill at the last completion only if fewer than 3 happened by then
    kills: list[dict] = []
    sent: list[str] = []
    polls = [0]
    t0 = time.time()
    bound = 300.0 if b.quick else 420.0
    stop = threading.Event()
    poller = threading.Thread(
        target=busy_killer, args=(name, ns, kills, stop, 2, t0, t0 + bound, polls), daemon=True, name="busy-killer"
    )
    killer = soup_actor_killer(name, ns, at, n, 3, kills, sent, t0)
    rec["details"].update(
        trials=n,
        epochs=1,
        callback_kills_at_completions=sorted(at),
        extra_kill_at_completion_if_fewer_than_3=n,
        busy_kills_at_most=2,
    )
    poller.start()
    try:
        with watchdog(bound, "scenario 1's sweep"):
            out = run_sweep(cfg, prep.run_dir, log=b.quiet, callbacks=[killer], prepared=prep, verbose=False)
    finally:
        stop.set()
        poller.join(timeout=10)
    rec["details"]["sweep_s"] = round(time.time() - t0, 1)
    rec["details"]["status_polls"] = polls[0]
    good_kills = [k for k in kills if "failed" not in k]
    rec["injected"] = kills
    rec["faults_injected"] = len(good_kills)
    status = out.soup or {}
    acc = accounting(RunDir(prep.run_dir).state_file, sent, status)
    rec["offers_sent"], rec["offers_accounted_for"] = acc["offers_sent"], acc["offers_accounted_for"]
    rec["details"]["accounting"] = acc
    rec["details"]["actor_final_status"] = {
        k: status.get(k)
        for k in ("version", "soup_size", "candidates_seen", "rejected", "restarts", "heldout_accuracy", "last_error")
    }
    rec["details"]["offer_messages"] = {
        "by_the_sweep_callback_on_trial_complete": len(sent),
        "re_offered_by_finish_soup": sum(1 for r in out.rows if r["status"] == "completed" and r.get("checkpoint")),
    }
    cmp = compare_with_offline_soup(prep.run_dir, cfg.soup.tie, cfg.soup.early_rejection)
    rec["details"]["soup_vs_offline"] = cmp
    completed = [r for r in out.rows if r["status"] == "completed"]
    # the actor's last answer: finish_soup asks for its status once its queue drained, after the last kill (a
    # lookup after run_sweep returned would find nothing on a Ray the caller keeps: the sweep's handles to the
    # non-detached actor are gone by then and Ray releases it; its state stays in the run folder)
    last_kill = max((k["t_s"] for k in good_kills), default=0.0)
    alive = bool(status) and status.get("fatal_error") is None and rec["details"]["sweep_s"] > last_kill
    rec["details"]["actor_answered_after_last_kill"] = alive
    rec["checks"] = {
        "sweep finished (not interrupted)": not out.interrupted,
        f"all {n} trials completed": len(completed) == n,
        "soup actor killed >= 3 times": len(good_kills) >= 3,
        "killed at least once while evaluating": any(k.get("while_evaluating") for k in good_kills),
        "soup actor answered after the last kill (finish_soup's final status)": alive,
        "every offer accounted for": acc["offers_accounted_for"] == acc["offers_sent"] == n,
        "0 lost": acc["lost"] == 0,
        "0 double-counted": acc["double_counted"] == 0,
        "soup bit-identical to the offline greedy soup": cmp["bit_identical"],
    }
    survived = alive and acc["lost"] == 0 and acc["double_counted"] == 0 and cmp["bit_identical"]
    rec["faults_survived"] = len(good_kills) if survived else 0
    b.served_run = b.served_run or prep.run_dir
