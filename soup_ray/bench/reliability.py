"""Reliability under faults: five bounded fault scenarios on the embedded local Ray with the tiny offline stand-in.

``bench/reliability.py`` runs them and writes ``bench/results/reliability-<date>.json``:

1. **soup actor killed during a sweep**: a real ``run_sweep`` whose soup actor is
   killed (``ray.kill(..., no_restart=False)``, Ray restarts it) after some trial
   completions and, from a thread polling ``status()``, while it is evaluating
   (``busy``). Afterwards the published soup must be bit-identical to the batch
   greedy soup over the same trials (``Kitchen`` + ``greedy_soup``, ``torch.equal``
   on the head and on every open_clip tensor) and every offer accounted for
   (records + rejected), none lost, none counted twice.
2. **a trial killed mid-way and resumed**: a sweep with ``tune.max_failures: 1``
   and a resumable state after every epoch; the trial's worker process is
   SIGKILLed once, right after Tune registered its epoch-1 checkpoint. Tune
   restarts it from that checkpoint; its final weights must equal an
   uninterrupted in-process ``fine_tune`` of the same hyperparameters.
3. **the driver killed mid-sweep**: ``soup-ray sweep`` in a subprocess is
   SIGKILLed once a trial finished, then ``soup-ray sweep --resume``; counts the
   finished trials trained again, checks ``results.jsonl`` (every trial once) and
   the soup against the offline greedy soup, and that no process of the killed
   driver's Ray outlived it (any that did are killed by PID and reported).
4. **a Serve model replica killed under load**: the run of scenario 1 served
   (``serve_run``), load from ``loadgen.run_level`` at concurrency 8, the Model
   replica killed at t≈5 s; requests sent and failed, the recovery time and
   whether Serve brought a new replica back.
5. **soak**: concurrency 32 on loopback for 60 s (10 s with ``--quick``) against
   the same server: failed requests, p99 latency and the replica's RSS at the
   start and the end.

Every scenario is bounded in time (sweeps by a watchdog that stops Tune the way
Ctrl-C does, subprocesses by timeouts, load by ``run_level``'s own bounds) and
records what was injected and what survived. This is a benchmark, not a test:
a failed check is written into the JSON and the summary, never raised.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import psutil

from ..run_dir import HEAD_FILE, OPEN_CLIP_WEIGHTS, WEIGHTS_FILE, RunDir

Log = Callable[[str], None]

STANDIN_STEPS = 20
SCENARIO_NAMES = {
    1: "soup actor killed during a sweep",
    2: "trial killed mid-way and resumed",
    3: "driver killed mid-sweep, then --resume",
    4: "Serve model replica killed under load",
    5: "soak at concurrency 32",
}
FIELDS = ("faults_injected", "faults_survived", "offers_sent", "offers_accounted_for", "requests_sent",
          "requests_failed", "p99_ms", "replica_rss_start_mb", "replica_rss_end_mb", "recovery_s")


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
        "search_space": {"lr": {"loguniform": [1e-3, 4e-3]}, "weight_decay": 0.1, "epochs": 1, "batch_size": 64,
                         "warmup_steps": 2},
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


def blank(n: int) -> dict[str, Any]:
    """A scenario's record with every summary field present (None where it does not apply)."""
    out: dict[str, Any] = {"scenario": n, "name": SCENARIO_NAMES[n], "ok": None, "seconds": None}
    out.update({k: None for k in FIELDS})
    out.update(faults_injected=0, faults_survived=0, injected=[], checks={}, details={}, error=None)
    return out


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

    from ..export import clip_state_with_soup
    from ..ingredients import Kitchen, trial_records_from_results
    from ..soup import greedy_soup

    paths = RunDir(run_dir)
    kitchen = Kitchen(paths.path)
    candidates = [kitchen.admit(r) for r in trial_records_from_results(paths.path)]
    offline = greedy_soup(candidates, kitchen.evaluate, heldout_size=kitchen.heldout_size, tie=tie,  # type: ignore[arg-type]
                          early_rejection=early_rejection)
    published_info = json.loads(paths.soup_info.read_text())
    expected = kitchen.soup_weights(list(offline.ingredients))
    head = load_file(str(paths.soup / HEAD_FILE))
    head_equal = (torch.equal(head["weight"], expected["head.weight"])
                  and torch.equal(head["bias"], expected["head.bias"]))
    clip_expected = clip_state_with_soup(load_file(str(paths.base / OPEN_CLIP_WEIGHTS)), expected)
    clip_published = load_file(str(paths.soup / OPEN_CLIP_WEIGHTS))
    keys_equal = set(clip_expected) == set(clip_published)
    differing = sorted(k for k in clip_expected if k in clip_published
                       and not torch.equal(clip_expected[k].contiguous(), clip_published[k]))
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
        "bit_identical": bool(head_equal and keys_equal and not differing
                              and list(offline.ingredients) == list(published_info.get("ingredients") or [])),
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


# ---------------------------------------------------------------- scenario 1: the soup actor


def soup_actor_killer(name: str, namespace: str, at: set[int], extra_at: int, want: int, kills: list[dict],
                      sent: list[str], t0: float):
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
                    kills.append({"when": f"after trial completion {self.seen}", "t_s": round(time.time() - t0, 2),
                                  "while_evaluating": False})
                except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
                    kills.append({"when": f"after trial completion {self.seen}", "failed": repr(err)})

    return _KillSoupActor()


def busy_killer(name: str, namespace: str, kills: list[dict], stop: threading.Event, max_kills: int, t0: float,
                deadline: float, polls: list[int]) -> None:
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
            kills.append({"when": "while evaluating (status() said busy)", "t_s": round(time.time() - t0, 2),
                          "while_evaluating": True, "candidates_seen_then": seen, "queued_then": st.get("queued"),
                          "soup_version_then": st.get("version")})
        stop.wait(0.02)


def scenario_soup_actor(b: Bench, rec: dict[str, Any]) -> None:
    from ..cluster.actor import actor_name
    from ..cluster.sweep import run_sweep
    from ..config import parse_config
    from ..prepare import prepare_run

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
    poller = threading.Thread(target=busy_killer, args=(name, ns, kills, stop, 2, t0, t0 + bound, polls),
                              daemon=True, name="busy-killer")
    killer = soup_actor_killer(name, ns, at, n, 3, kills, sent, t0)
    rec["details"].update(trials=n, epochs=1, callback_kills_at_completions=sorted(at),
                          extra_kill_at_completion_if_fewer_than_3=n, busy_kills_at_most=2)
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
    rec["details"]["actor_final_status"] = {k: status.get(k) for k in ("version", "soup_size", "candidates_seen",
                                                                       "rejected", "restarts", "heldout_accuracy",
                                                                       "last_error")}
    rec["details"]["offer_messages"] = {
        "by_the_sweep_callback_on_trial_complete": len(sent),
        "re_offered_by_finish_soup": sum(1 for r in out.rows if r["status"] == "completed" and r.get("checkpoint"))}
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


# ---------------------------------------------------------------- scenario 2: a trial's worker


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
                record.update(armed=True, pid=result.get("pid"), trial_id=trial.trial_id,
                              pid_from="result['pid'] (added by Tune)")

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
            record.update(killed=True, armed=False, killed_in="on_trial_save after the epoch-1 result",
                          killed_at=time.time())

    return _KillTrialWorker()


def scenario_trial_kill(b: Bench, rec: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import load_file

    from ..cluster.sweep import run_sweep
    from ..config import parse_config
    from ..prepare import prepare_run
    from ..train import TrialContext, fine_tune

    epochs = 3
    cfg = parse_config(tiny_config(**{
        "tune.num_samples": 1, "tune.seed": 7, "tune.max_failures": 1, "tune.checkpoint_interval_s": 0,
        "search_space.epochs": epochs, "search_space.lr": 1e-3, "trial_resources.cpu": 1,
    }))
    run_dir = b.work / "s2-trial-kill" / "run"
    prep = prepare_run(cfg, run_dir, log=b.quiet)
    record: dict[str, Any] = {}
    t0 = time.time()
    with watchdog(240.0 if b.quick else 300.0, "scenario 2's sweep"):
        out = run_sweep(cfg, prep.run_dir, log=b.quiet, callbacks=[trial_worker_killer(record)], prepared=prep,
                        live_soup=False, verbose=False)
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
        "trial_id": row.get("trial_id"), "status": row.get("status"), "hyperparameters": row.get("hyperparameters"),
        "epochs_reported": [x.get("epoch") for x in lines], "pids_reported": sorted({x.get("pid") for x in lines}),
        "resumed_from_epoch_final": lines[-1].get("resumed_from_epoch") if lines else None,
        "error": row.get("error"),
    }
    rec["details"]["epochs_trained_in_total"] = len(lines)
    equal, differing, ntensors = False, [], 0
    if row.get("status") == "completed" and row.get("checkpoint"):
        resumed = load_file(str(prep.run_dir / row["checkpoint"] / WEIGHTS_FILE))
        ctx = TrialContext(
            base_dir=str(prep.base_dir), data_json=cfg.data.model_dump_json(), data_kind=cfg.data.kind,
            eval_batch_size=cfg.eval_batch_size, threads=max(1, int(cfg.trial_resources.cpu)),
            precision=cfg.model.precision, gpus=cfg.trial_resources.gpu,
            num_workers=getattr(cfg.data, "num_workers", 0), checkpoint_interval_s=cfg.tune.checkpoint_interval_s)
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
        "restarted from epoch 1 (no epoch trained twice)": epochs_seen == list(range(1, epochs + 1))
        and rec["details"]["trial"]["resumed_from_epoch_final"] == 1,
        "a new worker process finished it": len(rec["details"]["trial"]["pids_reported"]) == 2,
        "final weights equal an uninterrupted fine_tune (torch.equal, every tensor)": equal,
    }
    rec["faults_survived"] = 1 if (record.get("killed") and equal) else 0


# ---------------------------------------------------------------- scenario 3: the driver


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


def cli_env(b: Bench) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def scenario_driver_kill(b: Bench, rec: dict[str, Any]) -> None:
    import yaml

    from ..results import read_jsonl

    n = 3 if b.quick else 4
    cfg = tiny_config(**{"tune.num_samples": n, "tune.seed": 5, "tune.checkpoint_interval_s": 0,
                         "search_space.epochs": 2})
    folder = b.work / "s3-driver-kill"
    folder.mkdir(parents=True, exist_ok=True)
    cfg_file = folder / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run_dir = (folder / "run").resolve()
    first_cmd = [sys.executable, "-m", "soup_ray.cli", "sweep", str(cfg_file), "--out", str(run_dir), "--no-dashboard"]
    resume_cmd = [sys.executable, "-m", "soup_ray.cli", "sweep", "--resume", str(run_dir), "--no-dashboard"]
    rec["details"].update(trials=n, epochs=2, checkpoint_interval_s=0,
                          commands=[" ".join(["python", *first_cmd[1:]]), " ".join(["python", *resume_cmd[1:]])])
    log1 = (folder / "first.log").open("w")
    t0 = time.time()
    proc = subprocess.Popen(first_cmd, stdout=log1, stderr=subprocess.STDOUT, env=cli_env(b), start_new_session=True)
    from safetensors.torch import load_file

    finished_before: dict[str, int] = {}
    weights_before: dict[str, dict[str, Any]] = {}
    leftover_names: list[str] = []
    try:
        deadline = t0 + (300 if b.quick else 360)
        finals: list[Path] = []
        while time.time() < deadline and proc.poll() is None:
            finals = sorted(run_dir.glob("tune/*/checkpoint_*/model.safetensors"))
            if finals:
                break
            time.sleep(0.5)
        if not finals:
            raise ScenarioTimeout(f"no trial finished within the bound (exit code {proc.poll()}); see "
                                  f"{folder / 'first.log'}")
        # the final checkpoint is persisted before Tune's driver logs the result: wait (bounded) for that line
        done_dirs = {f.parents[1] for f in finals}
        for _ in range(40):
            if all(any(x.get("status") == "completed" for x in result_lines(d)) for d in done_dirs):
                break
            time.sleep(0.25)
        children = [k for k in (process_key(p) for p in psutil.Process(proc.pid).children(recursive=True)) if k]
        for d in trial_dirs(run_dir):
            lines = result_lines(d)
            if any(x.get("status") == "completed" for x in lines):
                finished_before[d.name] = len(lines)
                finals_of = sorted(d.glob("checkpoint_*/model.safetensors"))
                if finals_of:
                    weights_before[d.name] = load_file(str(finals_of[-1]))
        states = sorted(RunDir(run_dir).tune.glob("experiment_state-*.json"))
        rec["details"]["experiment_state_age_at_kill_s"] = (round(time.time() - states[-1].stat().st_mtime, 2)
                                                            if states else None)
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=30)
        rec["injected"] = [{"what": "SIGKILL to the `soup-ray sweep` driver", "t_s": round(killed_at - t0, 1),
                            "trials_finished_before": len(finished_before),
                            "driver_children_before": len(children)}]
        rec["faults_injected"] = 1
        alive: list[psutil.Process] = []
        timeline: dict[str, int] = {}
        marks = [1.0, 5.0, 10.0, 20.0, 30.0]
        for _ in range(120):  # up to 30 s for the embedded Ray to go with its driver
            alive = still_alive(children) + [p for p in in_session(proc.pid)
                                             if (p.pid, p.create_time()) not in set(children)]
            while marks and time.time() - killed_at >= marks[0]:
                timeline[f"{marks.pop(0):g}s"] = len(alive)
            if not alive or time.time() - killed_at >= 30.0:
                break
            time.sleep(0.25)
        rec["details"]["driver_ray_processes_alive_after_kill"] = timeline
        rec["details"]["ray_processes_left_30s_after_driver_kill"] = len(alive)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                leftover_names.append(" ".join(p.cmdline())[:80] or p.name())
                p.kill()  # by PID: only processes of the driver this benchmark started
        rec["details"]["leftover_processes_killed"] = leftover_names
        rec["details"]["seconds_until_driver_children_gone"] = (round(time.time() - killed_at, 1)
                                                                if not alive else None)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log1.close()
    first_rows = read_jsonl(RunDir(run_dir).results) if RunDir(run_dir).results.exists() else []
    rec["details"]["results_jsonl_rows_at_kill"] = len(first_rows)
    log2 = (folder / "resume.log").open("w")
    t1 = time.time()
    resumed = subprocess.Popen(resume_cmd, stdout=log2, stderr=subprocess.STDOUT, env=cli_env(b),
                               start_new_session=True)
    try:
        code = resumed.wait(timeout=360 if b.quick else 420)
    except subprocess.TimeoutExpired:
        code = None
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(resumed.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        resumed.kill()
        resumed.wait(timeout=30)
    finally:
        log2.close()
    rec["details"]["resume_s"] = round(time.time() - t1, 1)
    rec["details"]["resume_exit_code"] = code
    if code is None:
        raise ScenarioTimeout(f"the resumed sweep ran past its bound; see {folder / 'resume.log'}")
    rows = [r for r in read_jsonl(RunDir(run_dir).results) if "trial_id" in r]
    ids = [r["trial_id"] for r in rows]
    retrained = {}
    for d in trial_dirs(run_dir):
        if d.name in finished_before:
            grown = len(result_lines(d)) - finished_before[d.name]
            if grown:
                retrained[d.name] = grown
    rec["details"]["finished_trials_trained_again"] = len(retrained)
    rec["details"]["retrained_result_lines_added"] = retrained
    same_after: dict[str, bool | None] = {}
    import torch

    for name in retrained:  # did training it again change its weights? (same seed, CPU: it should not)
        row = next((r for r in rows if r["trial_id"] in name and r.get("checkpoint")), None)
        if row is None or name not in weights_before:
            same_after[name] = None
            continue
        now = load_file(str(run_dir / row["checkpoint"] / WEIGHTS_FILE))
        before = weights_before[name]
        same_after[name] = set(now) == set(before) and all(torch.equal(now[k], before[k]) for k in now)
    rec["details"]["retrained_trials_final_weights_unchanged"] = same_after
    cmp: dict[str, Any] = {"bit_identical": False}
    if code == 0:
        cmp = compare_with_offline_soup(run_dir)
    rec["details"]["soup_vs_offline"] = cmp
    state = RunDir(run_dir).state_file
    if state.exists():
        acc = accounting(state, [r["trial_id"] for r in rows if r["status"] == "completed"], None)
        rec["offers_sent"], rec["offers_accounted_for"] = acc["offers_sent"], acc["offers_accounted_for"]
        rec["details"]["accounting"] = acc
    rec["checks"] = {
        "at least one trial finished before the kill": len(finished_before) >= 1,
        "the killed driver's Ray processes were gone within 30 s": not leftover_names,
        "--resume exited 0": code == 0,
        "results.jsonl has every trial once": sorted(ids) == sorted(set(ids)) and len(ids) == n,
        "every trial completed": all(r["status"] == "completed" for r in rows) and len(rows) == n,
        "0 finished trials trained again": not retrained,
        "soup equals the offline greedy soup (bit-identical)": cmp.get("bit_identical", False),
    }
    rec["faults_survived"] = 1 if (code == 0 and len(ids) == n == len(set(ids)) and cmp.get("bit_identical")) else 0


# ---------------------------------------------------------------- scenarios 4 and 5: Serve


class TimelineClient:
    """An ``httpx.Client`` stand-in for ``loadgen.run_level`` that also records every request's start, end and
    status (what the recovery time is measured from)."""

    def __init__(self, concurrency: int, timeout_s: float):
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.Client(timeout=timeout_s, limits=limits, trust_env=False)
        self.lock = threading.Lock()
        self.events: list[tuple[float, float, str]] = []

    def post(self, url: str, **kw: Any) -> Any:
        start = time.time()
        try:
            r = self.client.post(url, **kw)
        except Exception as err:
            with self.lock:
                self.events.append((start, time.time(), f"exc:{type(err).__name__}"))
            raise
        with self.lock:
            self.events.append((start, time.time(), str(r.status_code)))
        return r

    def close(self) -> None:
        self.client.close()


def _ok(key: str) -> bool:
    return key.isdigit() and 200 <= int(key) < 300


def recovery_time(events: Sequence[tuple[float, float, str]], kill_t: float) -> dict[str, Any]:
    """Seconds from the kill until requests succeed again.

    Answers already on their way at the kill (completed within ``max(1 s, 3 x``
    the median latency before the kill``)``) do not count; after that, the first
    successful answer that completed after the last failed one is the
    recovery, whether the requests in between failed (503/504) or waited for
    the new replica.
    """
    from .stats import percentile

    before = [e[1] - e[0] for e in events if e[1] < kill_t and _ok(e[2])]
    in_transit = max(1.0, 3.0 * (percentile(before, 50) or 0.0))
    after = [e for e in events if e[1] >= kill_t]
    failures = [e for e in after if not _ok(e[2])]
    out: dict[str, Any] = {"failures_after_kill": len(failures), "in_transit_cutoff_s": round(in_transit, 3)}
    since = kill_t + in_transit
    if failures:
        last_fail = max(e[1] for e in failures)
        out["first_failure_s"] = round(min(e[1] for e in failures) - kill_t, 3)
        out["last_failure_s"] = round(last_fail - kill_t, 3)
        since = max(since, last_fail)
    oks = [e[1] for e in after if _ok(e[2]) and e[1] >= since]
    out["recovery_s"] = round(min(oks) - kill_t, 3) if oks else None
    slow = [e[1] - e[0] for e in after if e[0] <= kill_t + 1.0]
    out["slowest_request_around_kill_s"] = round(max(slow), 3) if slow else None
    return out


def local_info(url: str) -> dict[str, Any]:
    import httpx

    r = httpx.get(f"{url}/info", params={"detail": "local"}, timeout=10, trust_env=False)
    r.raise_for_status()
    return r.json()


def wait_ready(url: str, body: bytes, seconds: float) -> float:
    """Poll until ``/healthz`` and ``POST /predict`` answer 200; returns the seconds waited."""
    from .serving_bench import wait_ready as wait_route

    try:
        return wait_route(url, "/predict", body, seconds)
    except TimeoutError as err:
        raise ScenarioTimeout(str(err)) from None


def rss_mb(pid: int) -> float | None:
    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 2)
    except psutil.Error:
        return None


class Server:
    """The run of scenario 1 served on 127.0.0.1 (a free port) by a Ray this benchmark starts and stops."""

    def __init__(self, b: Bench):
        self.b = b
        self.url: str | None = None
        self.bodies: list[bytes] = []
        self.started = False

    def ensure(self) -> str:
        if self.url is not None:
            return self.url
        from ..cluster.session import free_port
        from ..serving import serve_run

        run = self.b.served_run
        if run is None:
            raise RuntimeError("no finished run to serve: run scenario 1 in the same invocation or pass --serve-run")
        from .loadgen import sample_pngs

        self.bodies = sample_pngs(run, n=32)
        port = free_port(0)
        t0 = time.time()
        self.started = True
        url = serve_run(run, "127.0.0.1", port, blocking=False, log=self.b.quiet, verbose=False, ensemble=0)
        wait_ready(url, self.bodies[0], 240.0)
        self.ready_s = round(time.time() - t0, 1)
        self.url = url
        self.b.log(f"  serving {run} at {url} (ready after {self.ready_s:.0f}s)")
        return url

    def stop(self) -> None:
        if self.started:
            from ..serving import stop_serve_and_ray

            with contextlib.suppress(Exception):
                stop_serve_and_ray()
            self.started = False


def scenario_replica_kill(b: Bench, server: Server, rec: dict[str, Any]) -> None:
    import ray

    from .loadgen import run_level

    url = server.ensure()
    seconds, kill_after, concurrency = (15.0, 3.0, 8) if b.quick else (24.0, 5.0, 8)
    before = local_info(url)
    old_actor, old_pid = before.get("actor"), before.get("pid")
    if not old_actor:
        from ray.util.state import list_actors

        alive = list_actors(filters=[("class_name", "=", "ServeReplica:default:Model"), ("state", "=", "ALIVE")])
        old_actor = alive[0].name if alive else None
    rec["details"].update(concurrency=concurrency, load_seconds=seconds, kill_at_s=kill_after,
                          replica_before={"actor": old_actor, "pid": old_pid})
    client = TimelineClient(concurrency, 30.0)
    marks: dict[str, Any] = {}

    def kill_then_watch(t_start: float) -> None:
        time.sleep(max(0.0, t_start + kill_after - time.time()))
        try:
            ray.kill(ray.get_actor(old_actor, namespace="serve"))
        except Exception as err:  # noqa: BLE001
            marks["kill_error"] = repr(err)
            return
        marks["kill_t"] = time.time()
        deadline = marks["kill_t"] + 60.0
        while time.time() < deadline:
            try:
                info = local_info(url)
                if info.get("actor") and info["actor"] != old_actor and info.get("ready"):
                    marks["new_actor"], marks["new_pid"] = info["actor"], info.get("pid")
                    marks["replica_back_s"] = round(time.time() - marks["kill_t"], 3)
                    return
            except Exception:  # noqa: BLE001 - the ingress answers 503 while the replica is down
                pass
            time.sleep(0.25)

    t_start = time.time()
    watcher = threading.Thread(target=kill_then_watch, args=(t_start,), daemon=True, name="replica-killer")
    watcher.start()
    try:
        level = run_level(f"{url}/predict", server.bodies, concurrency, 1_000_000, seconds, timeout_s=30.0,
                          client=client)  # type: ignore[arg-type]
    finally:
        client.close()
    watcher.join(timeout=70)
    rec["requests_sent"], rec["requests_failed"] = level.sent, level.sent - level.ok
    rec["p99_ms"] = level.latency_ms.get("p99")
    rec["details"]["load"] = {k: v for k, v in level.to_json().items() if k != "extra"}
    if "kill_t" in marks:
        rec["faults_injected"] = 1
        rec["injected"] = [{"what": "ray.kill of the Model replica actor", "actor": old_actor,
                            "t_s": round(marks["kill_t"] - t_start, 2)}]
        rec["details"]["recovery"] = recovery_time(client.events, marks["kill_t"])
        rec["recovery_s"] = rec["details"]["recovery"]["recovery_s"]
    rec["details"]["replica_after"] = {"actor": marks.get("new_actor"), "pid": marks.get("new_pid"),
                                       "replica_back_s": marks.get("replica_back_s"), "error": marks.get("kill_error")}
    failed_kinds = {k for k in level.errors}
    rec["checks"] = {
        "replica killed": "kill_t" in marks,
        "Serve brought a new replica back": bool(marks.get("new_actor")),
        "requests succeed again": rec["recovery_s"] is not None,
        "failures are JSON 503/504 answers, never a hang or a 500": failed_kinds <= {"503", "504"}
        and level.unfinished == 0,
    }
    rec["faults_survived"] = 1 if (marks.get("new_actor") and rec["recovery_s"] is not None) else 0


def scenario_soak(b: Bench, server: Server, rec: dict[str, Any]) -> None:
    from .loadgen import run_level

    url = server.ensure()
    seconds, concurrency = (10.0, 32) if b.quick else (60.0, 32)
    info = local_info(url)
    pid = int(info["pid"])
    warm = run_level(f"{url}/predict", server.bodies, concurrency, 1_000_000, 3.0, timeout_s=30.0)
    start = rss_mb(pid)
    samples: list[tuple[float, float | None]] = []
    stop = threading.Event()

    def sample(t0: float) -> None:
        for _ in range(1000):
            if stop.wait(5.0):
                return
            samples.append((round(time.time() - t0, 1), rss_mb(pid)))

    t0 = time.time()
    sampler = threading.Thread(target=sample, args=(t0,), daemon=True, name="rss-sampler")
    sampler.start()
    try:
        level = run_level(f"{url}/predict", server.bodies, concurrency, 10_000_000, seconds, timeout_s=30.0)
    finally:
        stop.set()
        sampler.join(timeout=10)
    end = rss_mb(pid)
    after = local_info(url)
    rec["requests_sent"], rec["requests_failed"] = level.sent, level.sent - level.ok
    rec["p99_ms"] = level.latency_ms.get("p99")
    rec["replica_rss_start_mb"], rec["replica_rss_end_mb"] = start, end
    growth = (end / start - 1.0) if start and end else None
    rec["details"].update(
        concurrency=concurrency, seconds=seconds, replica_pid=pid, warmup={"sent": warm.sent, "ok": warm.ok},
        rss_growth_ratio=round(growth, 4) if growth is not None else None, rss_samples_mb=samples,
        load={k: v for k, v in level.to_json().items() if k != "extra"},
        same_replica_throughout=after.get("pid") == pid)
    rec["checks"] = {
        "0 failed requests": level.sent > 0 and level.sent == level.ok,
        "replica RSS growth < 10%": growth is not None and growth < 0.10,
        "same replica throughout": after.get("pid") == pid,
    }


# ---------------------------------------------------------------- driver


def parse_only(text: str | None) -> list[int]:
    if not text:
        return sorted(SCENARIO_NAMES)
    try:
        picked = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--only takes scenario numbers like 1,4 (got {text!r})") from None
    bad = [n for n in picked if n not in SCENARIO_NAMES]
    if bad or not picked:
        raise argparse.ArgumentTypeError(f"--only: scenarios are 1-5 (got {text!r})")
    return picked


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    lines = "\n".join(f"  {n}. {name}" for n, name in SCENARIO_NAMES.items())
    ap = argparse.ArgumentParser(
        prog="bench/reliability.py",
        description="Fault scenarios on the embedded local Ray with the tiny offline stand-in CLIP "
                    f"({STANDIN_STEPS} stand-in steps); writes bench/results/reliability-<date>.json.\n\n"
                    f"Scenarios:\n{lines}\n\nScenarios 4 and 5 serve the run scenario 1 produced (or --serve-run).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smaller and shorter: 4 trials in scenario 1, 3 in scenario 3, 15 s of load in 4, a 10 s soak")
    ap.add_argument("--only", type=parse_only, default=parse_only(None), metavar="N,M",
                    help="run only these scenarios (e.g. --only 1,4)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default bench/results/reliability-<YYYY-MM-DD>.json, -quick with --quick)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="stand-in cache (SOUP_RAY_CACHE) to reuse; default: a private folder under the work folder "
                         "(the tiny stand-in is built once, about a minute or more)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the run folders go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (run folders, logs) afterwards")
    ap.add_argument("--serve-run", default=None, help="a finished run folder for scenarios 4 and 5 (default: "
                                                      "scenario 1's run)")
    ap.add_argument("--verbose", action="store_true", help="show the sweeps' own progress lines")
    return ap.parse_args(argv)


def summary_table(scenarios: Sequence[dict[str, Any]]) -> str:
    cols = [("#", "scenario"), ("ok", "ok"), ("faults", "faults"), ("offers", "offers"), ("requests", "requests"),
            ("p99 ms", "p99_ms"), ("rss MB", "rss"), ("recovery s", "recovery_s"), ("s", "seconds")]

    def cell(r: dict[str, Any], key: str) -> str:
        if key == "ok":
            return "error" if r.get("error") else ("yes" if r.get("ok") else "NO")
        if key == "faults":
            return f"{r['faults_survived']}/{r['faults_injected']} survived"
        if key == "offers":
            return "-" if r["offers_sent"] is None else f"{r['offers_accounted_for']}/{r['offers_sent']}"
        if key == "requests":
            return "-" if r["requests_sent"] is None else f"{r['requests_failed']} failed of {r['requests_sent']}"
        if key == "rss":
            s, e = r["replica_rss_start_mb"], r["replica_rss_end_mb"]
            return "-" if s is None else f"{s:.0f} -> {e:.0f}" if e is not None else f"{s:.0f} -> ?"
        v = r.get(key)
        return "-" if v is None else (f"{v:g}" if isinstance(v, (int, float)) else str(v))

    rows = [[h for h, _ in cols]] + [[f"{r['scenario']} {r['name']}" if k == "scenario" else cell(r, k)
                                       for _, k in cols] for r in scenarios]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    out = []
    for j, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    failed = [(r["scenario"], name) for r in scenarios for name, good in r["checks"].items() if not good]
    for n, name in failed:
        out.append(f"  scenario {n}: check failed: {name}")
    for r in scenarios:
        if r.get("error"):
            out.append(f"  scenario {r['scenario']}: {r['error']}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected scenarios, write the JSON, print the summary; 0 if every check held, 1 otherwise."""
    args = parse_args(argv)
    t_all = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_all:6.1f}s] {msg}", flush=True)

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.pop("RAY_ADDRESS", None)  # the embedded local Ray, never a cluster named in the environment
    work = Path(args.workdir or tempfile.mkdtemp(prefix="soup-ray-reliability-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).resolve() if args.cache else work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    cache_had_standin = any(cache.glob("standin-*"))
    os.environ["SOUP_RAY_CACHE"] = str(cache)
    today = datetime.date.today().isoformat()
    out_path = args.out or Path("bench/results") / f"reliability-{today}{'-quick' if args.quick else ''}.json"
    b = Bench(args, work, log)
    from .host import machine_info

    report: dict[str, Any] = {
        "benchmark": "reliability under faults (embedded local Ray, tiny offline stand-in)",
        "date": today,
        "command": "python bench/reliability.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
        "machine": machine_info(),
        "settings": {
            "quick": b.quick, "scenarios": args.only, "model": "soupray-digits-tiny (offline stand-in)",
            "standin_steps": STANDIN_STEPS, "standin_cache_reused": cache_had_standin,
            "data": "digits (sklearn), shifts rotate and noise", "trial_cpu": 0.875, "serve_ensemble": 0,
            "ray": "embedded local (address='local'), no dashboard", "bind": "127.0.0.1",
        },
        "scenarios": [],
    }
    log(f"reliability benchmark: scenarios {args.only}{' (quick)' if b.quick else ''}; work folder {work}")
    server = Server(b)
    own_ray = False
    try:
        for n in args.only:
            rec = blank(n)
            log(f"scenario {n}: {SCENARIO_NAMES[n]}")
            t0 = time.time()
            try:
                if n in (1, 2):
                    if not own_ray:
                        from ..cluster.session import ray_session
                        from ..config import parse_config

                        own_ray = ray_session("local", namespace=parse_config(tiny_config()).ray.namespace,
                                              log=b.quiet, verbose=False)
                    (scenario_soup_actor if n == 1 else scenario_trial_kill)(b, rec)
                else:
                    if own_ray:  # scenario 3 runs its own Ray in subprocesses, 4 and 5 a fresh one for Serve
                        import ray

                        ray.shutdown()
                        own_ray = False
                    if n == 3:
                        scenario_driver_kill(b, rec)
                    elif n == 4:
                        scenario_replica_kill(b, server, rec)
                    else:
                        scenario_soak(b, server, rec)
            except Exception as err:  # noqa: BLE001 - a benchmark records a failed scenario and goes on
                import traceback

                rec["error"] = f"{type(err).__name__}: {err}"
                rec["details"]["traceback"] = traceback.format_exc(limit=8)
            rec["seconds"] = round(time.time() - t0, 1)
            rec["ok"] = rec["error"] is None and bool(rec["checks"]) and all(rec["checks"].values())
            report["scenarios"].append(rec)
            log(f"scenario {n} {'ok' if rec['ok'] else 'NOT ok'} in {rec['seconds']:.0f}s: "
                + ", ".join(f"{k}={rec[k]}" for k in FIELDS if rec[k] is not None)
                + (f"; error: {rec['error']}" if rec["error"] else ""))
    finally:
        server.stop()
        if own_ray:
            import ray

            ray.shutdown()
        report["seconds"] = round(time.time() - t_all, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(summary_table(report["scenarios"]))
    print(f"\nwritten {out_path} in {report['seconds']:.0f}s" + (f"; work folder kept: {work}" if args.keep else ""))
    return 0 if all(r["ok"] for r in report["scenarios"]) else 1


if __name__ == "__main__":
    sys.exit(main())
