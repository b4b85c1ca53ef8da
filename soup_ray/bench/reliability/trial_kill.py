"""Scenario 2: a trial's worker SIGKILLed after its epoch-1 checkpoint, restarted by Tune from it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from ...run_dir import WEIGHTS_FILE
from .common import (
    Bench,
    descendants_of_me,
    result_lines,
    tiny_config,
    trial_dirs,
    watchdog,
)


def trial_worker_killer(record: dict[str, Any]):
    """A Tune callback: at the first epoch-1 result note the trial's worker pid (Tune's ``pid`` field); once Tune
    has registered that epoch's checkpoint (``on_trial_save``), SIGKILL the worker, once.

    Killing inside ``on_trial_result`` itself would kill the worker before Tune
    processes the epoch's checkpoint (it does so after the result callbacks), so
    the restart would start from scratch instead of from epoch 1.
    """
    from ray import tune

    class _KillTrialWorker(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if not record.get("armed") and not record.get("killed") and result.get("epoch") == 1:
                record.update(
                    armed=True, pid=result.get("pid"), trial_id=trial.trial_id, pid_from="result['pid'] (added by Tune)"
                )

        def on_trial_save(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if not record.get("armed") or record.get("killed") or trial.trial_id != record.get("trial_id"):
                return
            pid = int(record["pid"])
            record["is_descendant_of_this_process"] = pid in descendants_of_me()
            try:
                record["process_title"] = " ".join(psutil.Process(pid).cmdline())[:80]
            except psutil.Error:
                record["process_title"] = None
            if not record["is_descendant_of_this_process"]:
                record.update(killed=False, armed=False, refused="the pid is not a process of this Ray")
                return
            record["checkpoint_registered"] = trial.checkpoint is not None
            os.kill(pid, signal.SIGKILL)
            record.update(
                killed=True, armed=False, killed_in="on_trial_save after the epoch-1 result", killed_at=time.time()
            )

    return _KillTrialWorker()


def scenario_trial_kill(b: Bench, rec: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import load_file

    from ...cluster.sweep import run_sweep
    from ...config import parse_config
    from ...prepare import prepare_run
    from ...train import TrialContext, fine_tune

    epochs = 3
    cfg = parse_config(
        tiny_config(
            **{
                "tune.num_samples": 1,
                "tune.seed": 7,
                "tune.max_failures": 1,
                "tune.checkpoint_interval_s": 0,
                "search_space.epochs": epochs,
                "search_space.lr": 1e-3,
                "trial_resources.cpu": 1,
            }
        )
    )
    run_dir = b.work / "s2-trial-kill" / "run"
    prep = prepare_run(cfg, run_dir, log=b.quiet)
    record: dict[str, Any] = {}
    t0 = time.time()
    with watchdog(240.0 if b.quick else 300.0, "scenario 2's sweep"):
        out = run_sweep(
            cfg,
            prep.run_dir,
            log=b.quiet,
            callbacks=[trial_worker_killer(record)],
            prepared=prep,
            live_soup=False,
            verbose=False,
        )
    rec["details"]["sweep_s"] = round(time.time() - t0, 1)
    rec["details"].update(epochs=epochs, max_failures=1, checkpoint_interval_s=0, live_soup=False)
    record.pop("armed", None)
    if "killed_at" in record:
        record["killed_at_s"] = round(record.pop("killed_at") - t0, 2)
    rec["injected"] = [record]
    rec["faults_injected"] = 1 if record.get("killed") else 0
    row = out.rows[0] if out.rows else {}
    tdirs = trial_dirs(prep.run_dir)
    lines = result_lines(tdirs[0]) if tdirs else []
    rec["details"]["trial"] = {
        "trial_id": row.get("trial_id"),
        "status": row.get("status"),
        "hyperparameters": row.get("hyperparameters"),
        "epochs_reported": [x.get("epoch") for x in lines],
        "pids_reported": sorted({x.get("pid") for x in lines}),
        "resumed_from_epoch_final": lines[-1].get("resumed_from_epoch") if lines else None,
        "error": row.get("error"),
    }
    # Tune may or may not have logged the epoch-1 result when its worker died (the kill happens in on_trial_save,
    # racing the driver's logger), so the checks read the epochs the new worker reported
    killed_pid = record.get("pid")
    after = [x for x in lines if x.get("pid") != killed_pid]
    rec["details"]["trial"]["epochs_reported_after_the_kill"] = [x.get("epoch") for x in after]
    rec["details"]["epochs_trained_in_total"] = len(after) + 1  # epoch 1 before the kill
    equal, differing, ntensors = False, [], 0
    if row.get("status") == "completed" and row.get("checkpoint"):
        resumed = load_file(str(prep.run_dir / row["checkpoint"] / WEIGHTS_FILE))
        ctx = TrialContext(
            base_dir=str(prep.base_dir),
            data_json=cfg.data.model_dump_json(),
            eval_batch_size=cfg.eval_batch_size,
            threads=max(1, int(cfg.trial_resources.cpu)),
            precision=cfg.model.precision,
            gpus=cfg.trial_resources.gpu,
            num_workers=getattr(cfg.data, "num_workers", 0),
            checkpoint_interval_s=cfg.tune.checkpoint_interval_s,
        )
        final: dict[str, Any] = {}

        def keep(metrics: dict[str, Any], ckpt: str | None) -> None:
            if ckpt and metrics.get("status") == "completed":
                final.update(load_file(str(Path(ckpt) / WEIGHTS_FILE)))

        threads = torch.get_num_threads()
        t1 = time.time()
        try:
            fine_tune(dict(row["hyperparameters"]), ctx, keep)
        finally:
            torch.set_num_threads(threads)
        rec["details"]["uninterrupted_in_process_s"] = round(time.time() - t1, 1)
        ntensors = len(final)
        differing = sorted(k for k in final if k not in resumed or not torch.equal(final[k], resumed[k]))
        differing += sorted(set(resumed) - set(final))
        equal = bool(final) and not differing
    rec["details"]["weights"] = {"tensors": ntensors, "differing": differing[:20], "all_equal": equal}
    epochs_seen = rec["details"]["trial"]["epochs_reported"]
    rec["checks"] = {
        "worker killed once": bool(record.get("killed")),
        "epoch-1 checkpoint registered before the kill": bool(record.get("checkpoint_registered")),
        "trial completed after the restart": row.get("status") == "completed",
        "restarted from epoch 1 (no epoch trained twice)": [x.get("epoch") for x in after] == list(range(2, epochs + 1))
        and all(e == 1 for e in epochs_seen[: len(lines) - len(after)])
        and rec["details"]["trial"]["resumed_from_epoch_final"] == 1,
        "a new worker process finished it": bool(after) and after[-1].get("pid") not in (None, killed_pid),
        "final weights equal an uninterrupted fine_tune (torch.equal, every tensor)": equal,
    }
    rec["faults_survived"] = 1 if (record.get("killed") and equal) else 0
