"""Scenario 6: a worker node lost, first under a sweep, then under serving load (Ray's ``cluster_utils.Cluster``).

Three raylets on this machine, each its own process: a head with no trial resources and two worker nodes with one
fake GPU and a custom ``worker`` resource each, as a cluster's GPU nodes would have.

1. **Sweep.** 4 trials of 2 epochs (a checkpoint after every epoch) and the soup actor ask for the ``worker``
   resource. Once a trial on the soup actor's node has checkpointed its first epoch, that node is removed (its
   raylet and every worker on it killed). Recorded: the trials it cost, the epochs they lost (retrained), how long
   until a lost trial reported its next epoch on the surviving node, every offer accounted for, and whether the
   final soup is bit-identical to the offline batch greedy soup over the same trials.
2. **Serving.** A new worker joins; the run is served with the replica asking for a GPU (so it lands on a worker)
   and the HTTP proxy on the head only. Under load, the replica's node is removed. Recorded: the failed requests,
   their kinds, and the seconds until requests succeed again on a replica on the other worker.
"""

from __future__ import annotations

import time
from typing import Any

from ...results import read_jsonl
from .common import Bench, accounting, compare_with_offline_soup, result_lines, tiny_config, trial_dirs, watchdog
from .serve_faults import fault_under_load, local_info, recovery_time, wait_ready

EPOCHS = 2
CLUSTER: dict[str, Any] = {}
"""``{"cluster": ray.cluster_utils.Cluster}`` that ``node_remover`` removes nodes from (set it before the sweep):
kept out of the callback itself, which Tune pickles with the experiment."""


def _remove(node_id: str) -> None:
    cluster = CLUSTER["cluster"]
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    cluster.remove_node(node, allow_graceful=False)


def node_remover(actor_name: str, namespace: str, record: dict[str, Any], last_epoch: int = EPOCHS):
    """A Tune callback: after a trial on the soup actor's node checkpoints an epoch before ``last_epoch``, remove
    that node (from ``CLUSTER``) once. ``record`` gets the node, the trial, its epoch, the ``(trial, last
    epoch)`` pairs running there and the time."""
    from ray import tune

    class _RemoveActorNode(tune.Callback):
        def on_trial_save(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            import ray

            if record.get("removed"):
                return
            result = trial.last_result or {}
            epoch, node = result.get("epoch"), result.get("node_id")
            if not epoch or epoch >= last_epoch or node is None:
                return
            actor = ray.get_actor(actor_name, namespace=namespace)
            if ray.get(actor.status.remote(), timeout=60)["node_id"] != node:
                return
            running = [
                (t.trial_id, (t.last_result or {}).get("epoch", 0))
                for t in trials
                if t.status == "RUNNING" and (t.last_result or {}).get("node_id") == node
            ]
            record.update(removed=node, trial_id=trial.trial_id, epoch=epoch, running_on_it=running, at=time.time())
            _remove(node)

    return _RemoveActorNode()


def _sweep_part(b: Bench, rec: dict[str, Any], cluster: Any) -> dict[str, Any]:
    import ray

    from ...cluster.actor import actor_name
    from ...cluster.sweep import run_sweep
    from ...config import parse_config
    from ...prepare import prepare_run

    cfg = parse_config(
        tiny_config(
            **{
                "tune.num_samples": 4,
                "tune.seed": 3,
                "tune.max_failures": 2,
                "tune.checkpoint_interval_s": 0,
                "search_space.epochs": EPOCHS,
                "trial_resources": {"cpu": 0.5, "custom": {"worker": 3}},
                "soup.resources": {"cpu": 0.25, "custom": {"worker": 1}},
                "ray.address": cluster.address,
            }
        )
    )
    run_dir = b.work / "s6-node-loss" / "run"
    prep = prepare_run(cfg, run_dir, log=b.quiet)
    record: dict[str, Any] = {}
    name = actor_name(prep.run_dir)
    t0 = time.time()
    with watchdog(420.0, "scenario 6's sweep"):
        run_sweep(
            cfg,
            prep.run_dir,
            log=b.quiet,
            prepared=prep,
            callbacks=[node_remover(name, cfg.ray.namespace, record)],
            verbose=False,
        )
    out: dict[str, Any] = {"sweep_s": round(time.time() - t0, 1), "trials": 4, "epochs": EPOCHS}
    removed = record.get("removed")
    lines = {d.name: result_lines(d) for d in trial_dirs(prep.run_dir)}
    lost = {tid: ep for tid, ep in record.get("running_on_it", [])}
    resumed, epochs_retrained, first_after = [], 0, []
    for tid, done in lost.items():
        rows = next((ls for d, ls in lines.items() if tid in d), [])
        after = [x for x in rows if x.get("node_id") != removed]
        if after:
            resumed.append(tid)
            # an epoch reported again after the loss was trained twice (each epoch is checkpointed, so only the
            # epoch in progress on the lost node is lost: it is not reported there, and is trained once, here)
            epochs_retrained += sum(1 for x in after if x.get("epoch", 0) <= done)
            first_after.append(min(x.get("timestamp", 0) for x in after))
    ray.init(address=cluster.address, namespace=cfg.ray.namespace, logging_level="ERROR")
    try:
        status = ray.get(ray.get_actor(name).status.remote(), timeout=60)
    finally:
        ray.shutdown()
    finished = [r["trial_id"] for r in read_jsonl(prep.run_dir / "results.jsonl") if r.get("trial_id")]
    acc = accounting(prep.run_dir / "soup_state" / "state.json", finished, status)
    soup = compare_with_offline_soup(prep.run_dir)
    out.update(
        removed_node=removed,
        removed_at_s=round(record["at"] - t0, 1) if "at" in record else None,
        trials_on_the_lost_node=[tid for tid in lost],
        trials_resumed=resumed,
        epochs_retrained=epochs_retrained,
        recovery_s=round(min(first_after) - record["at"], 1) if first_after and "at" in record else None,
        actor_node_after=status.get("node_id"),
        actor_restarts=acc.get("actor_restarts_in_state"),
        offers_accounted_for=acc["offers_accounted_for"],
        double_counted=acc["double_counted"],
        soup_bit_identical=soup["bit_identical"],
        soup=soup,
    )
    completed = sum(1 for ls in lines.values() if ls and ls[-1].get("epoch") == EPOCHS)
    rec["offers_sent"] = len(finished)
    rec["offers_accounted_for"] = acc["offers_accounted_for"]
    rec["checks"].update(
        {
            "sweep: the node with the soup actor and a running trial was removed": bool(removed and lost),
            "sweep: every lost trial resumed on the surviving node": bool(lost) and sorted(resumed) == sorted(lost),
            "sweep: every trial finished": completed == len(lines) == 4,
            "sweep: the soup actor came back on another node": bool(removed) and status.get("node_id") != removed,
            "sweep: every offer accounted for, none twice": acc["offers_accounted_for"] == len(finished) == 4
            and acc["double_counted"] == 0
            and acc["lost"] == 0,
            "sweep: no checkpointed epoch trained again": epochs_retrained == 0,
            "sweep: the soup is bit-identical to the offline greedy soup": soup["bit_identical"],
        }
    )
    if removed:
        rec["faults_injected"] += 1
        rec["injected"].append({"what": "worker node removed during the sweep", "node": removed, **out})
        if all(rec["checks"][k] for k in rec["checks"] if k.startswith("sweep:")):
            rec["faults_survived"] += 1
    return {"run_dir": prep.run_dir, **out}


def _serve_part(b: Bench, rec: dict[str, Any], cluster: Any, run_dir: Any) -> dict[str, Any]:
    import ray

    from ...cluster.session import free_port
    from ...serving import serve_run, stop_serve_and_ray
    from ..loadgen import sample_pngs

    cluster.add_node(num_cpus=1, num_gpus=1, resources={"worker": 4})  # the lost node's replacement
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    seconds, kill_after, concurrency = (16.0, 4.0, 8) if b.quick else (24.0, 6.0, 8)
    out: dict[str, Any] = {"concurrency": concurrency, "load_seconds": seconds, "kill_at_s": kill_after}
    try:
        bodies = sample_pngs(run_dir, n=32)
        url = serve_run(
            run_dir,
            "127.0.0.1",
            free_port(0),
            blocking=False,
            log=b.quiet,
            verbose=False,
            ensemble=0,
            num_gpus=1,  # only the workers have a (fake) GPU: the replica runs on one of them
            proxy_location="HeadOnly",  # every node of this cluster is 127.0.0.1: one proxy, on the head
        )
        out["ready_s"] = round(wait_ready(url, bodies[0], 240.0), 1)
        before = local_info(url)
        node = before.get("node_id")
        workers = {n.node_id for n in cluster.worker_nodes}
        out["replica_node_before"] = node
        level, marks, events = fault_under_load(
            url,
            bodies,
            concurrency,
            seconds,
            kill_after,
            lambda: _remove(node),
            lambda info: bool(info.get("ready") and info.get("node_id") not in (None, node)),
            90.0,
        )
        recovery = recovery_time(events, marks["kill_t"]) if "kill_t" in marks else {}
        out.update(
            replica_node_after=(marks.get("back_info") or {}).get("node_id"),
            replica_back_s=marks.get("replica_back_s"),
            recovery=recovery,
            requests_sent=level.sent,
            requests_failed=level.sent - level.ok,
            errors=dict(level.errors),
            unfinished=level.unfinished,
            p99_ms=level.latency_ms.get("p99"),
            error=marks.get("error"),
        )
    finally:
        stop_serve_and_ray()
    rec["requests_sent"], rec["requests_failed"] = out["requests_sent"], out["requests_failed"]
    rec["p99_ms"] = out["p99_ms"]
    rec["recovery_s"] = (out.get("recovery") or {}).get("recovery_s")
    survivors = workers - {node}
    rec["checks"].update(
        {
            "serve: the replica ran on a worker node": node in workers,
            "serve: its node was removed under load": "kill_t" in marks,
            "serve: a new replica answers from the other worker": out.get("replica_node_after") in survivors,
            "serve: requests succeed again": rec["recovery_s"] is not None,
            "serve: failures are JSON 503/504 answers, never a hang or a 500": set(out["errors"]) <= {"503", "504"}
            and out["unfinished"] == 0,
        }
    )
    if "kill_t" in marks:
        rec["faults_injected"] += 1
        rec["injected"].append({"what": "the serving replica's worker node removed under load", "node": node})
        if all(rec["checks"][k] for k in rec["checks"] if k.startswith("serve:")):
            rec["faults_survived"] += 1
    return out


def scenario_node_loss(b: Bench, rec: dict[str, Any]) -> None:
    from ray.cluster_utils import Cluster

    from ...serving.launch import DEFAULT_THROUGHPUT_MODE, throughput_mode_env

    # what cluster.yaml's `ray start` lines set on every node: Serve's throughput mode and soup-ray's proxy
    # callback (a request whose replica is lost gets the JSON 503, not the proxy's plain 500); the raylets below
    # inherit this process's environment
    rec["details"]["ray_start_env"] = throughput_mode_env(DEFAULT_THROUGHPUT_MODE, log=b.quiet)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    CLUSTER["cluster"] = cluster
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, num_gpus=1, resources={"worker": 4})
        cluster.wait_for_nodes()
        sweep = _sweep_part(b, rec, cluster)
        run_dir = sweep.pop("run_dir")
        rec["details"]["sweep"] = sweep
        rec["details"]["serve"] = _serve_part(b, rec, cluster, run_dir)
    finally:
        CLUSTER.clear()
        cluster.shutdown()
