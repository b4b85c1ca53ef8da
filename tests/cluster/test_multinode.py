"""Many nodes on one machine: a real sweep on Ray's own ``cluster_utils.Cluster`` (a head and two worker nodes,
each its own raylet process), with the worker node that hosts the soup actor and a running trial removed midway.

The head offers no trial resources: trials and the soup actor ask for a custom resource that only the workers
declare, as a cluster's GPU nodes would. The run folder is the shared storage (on a real cluster, a mounted
bucket); nothing is read from a node's own temporary folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from soup_ray.config import parse_config
from soup_ray.results import read_jsonl
from tests.conftest import tiny_config_dict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # three raylets and a sweep on two cores

EPOCHS = 2
TRIALS = 6


def test_a_lost_worker_node_costs_no_finished_trial_and_no_soup(
    prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from safetensors.torch import load_file

    from soup_ray.bench.reliability.node_loss import CLUSTER, node_remover
    from soup_ray.cluster.actor import actor_name
    from soup_ray.cluster.dryrun import check_resources
    from soup_ray.cluster.sweep import run_sweep
    from soup_ray.export import export_soup
    from soup_ray.ingredients import Kitchen, trial_records_from_results
    from soup_ray.prepare import prepare_run
    from soup_ray.soup import greedy_soup
    from tests.cluster.test_sweep import check_live_soup_survived

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Each worker node fits one trial and the soup actor; the head fits neither.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "resources": {}},
    )
    CLUSTER["cluster"] = cluster  # the node remover (shared with bench/reliability.py scenario 6) finds it here
    try:
        workers = [cluster.add_node(num_cpus=1, resources={"worker": 4}) for _ in range(2)]
        cluster.wait_for_nodes()
        cfg = parse_config(
            tiny_config_dict(
                **{
                    "tune.num_samples": TRIALS,
                    "tune.seed": 3,
                    "tune.max_failures": 2,
                    "tune.checkpoint_interval_s": 0,  # a resumable checkpoint after every epoch
                    "search_space.epochs": EPOCHS,
                    "trial_resources": {"cpu": 0.5, "custom": {"worker": 3}},
                    "soup.resources": {"cpu": 0.25, "custom": {"worker": 1}},
                    "ray.address": cluster.address,
                }
            )
        )
        # what `soup-ray run --dry-run` says about this cluster's nodes, before anything runs
        resources = check_resources(cfg, log=lambda m: None)
        assert resources.status == "ok", resources.details
        assert "a trial and the soup actor fit; 2 trial(s) at once on the live nodes" in resources.summary
        assert any(
            d.startswith("worker node: 1 CPU, 0 GPU, 4 worker x2 live -> 1 trial(s) per node; with the soup actor: 1")
            for d in resources.details
        ), resources.details
        assert any(d.startswith("head node: 0 CPU, 0 GPU x1 live -> 0 trial(s)") for d in resources.details)
        run_dir = tmp_path / "run"
        prep = prepare_run(cfg, run_dir, log=lambda m: None)
        record: dict[str, Any] = {}
        name = actor_name(prep.run_dir)
        outcome = run_sweep(
            cfg,
            run_dir,
            log=lambda m: None,
            prepared=prep,
            callbacks=[node_remover(name, cfg.ray.namespace, record, last_epoch=EPOCHS)],
            verbose=False,
        )
        removed = record.get("removed")
        assert removed, "no trial checkpointed on the soup actor's node before its last epoch"
        survivor = next(n.node_id for n in workers if n.node_id != removed)
        assert record["trial_id"] in {tid for tid, _ in record["running_on_it"]}

        # every trial finished once, on a worker node, and results.jsonl has each of them once
        rows = read_jsonl(run_dir / "results.jsonl")
        assert sorted(r["trial_id"] for r in rows) == sorted({r["trial_id"] for r in rows}) and len(rows) == TRIALS
        assert all(r["status"] == "completed" for r in rows), [(r["trial_id"], r["status"]) for r in rows]
        lines = {d.name: _result_lines(d) for d in (run_dir / "tune").iterdir() if (d / "params.json").is_file()}
        assert len(lines) == TRIALS
        worker_ids = {n.node_id for n in workers}
        assert all(x["node_id"] in worker_ids for ls in lines.values() for x in ls), "a trial ran on the head"

        # the lost trial resumed on the surviving node from its last epoch checkpoint, not from scratch
        lost = next(ls for d, ls in lines.items() if record["trial_id"] in d)
        after = [x for x in lost if x["node_id"] != removed]
        assert after and all(x["node_id"] == survivor for x in after)
        done = record["epoch"]  # the epoch its checkpoint held when the node went
        assert [x["epoch"] for x in after] == list(range(done + 1, EPOCHS + 1)), [
            (x["epoch"], x["node_id"][:8]) for x in lost
        ]
        assert after[-1].get("resumed_from_epoch") == done

        # the soup actor came back on the surviving node and resumed from soup_state/
        ray.init(address=cluster.address, namespace=cfg.ray.namespace)
        try:
            status = ray.get(ray.get_actor(name).status.remote(), timeout=60)
        finally:
            ray.shutdown()
        assert status["node_id"] == survivor
        state = json.loads((run_dir / "soup_state" / "state.json").read_text())
        assert state["restarts"] >= 1

        # every finished trial counted once, and the soup is the offline batch greedy soup, tensor for tensor
        check_live_soup_survived(outcome, prep)
        kit = Kitchen(prep.run_dir)
        offline = greedy_soup(
            [kit.admit(r) for r in trial_records_from_results(prep.run_dir)],
            kit.evaluate,
            heldout_size=kit.heldout_size,
        )
        info = json.loads((run_dir / "soup" / "soup.json").read_text())
        assert info["ingredients"] == offline.ingredients
        # the offline soup written as the actor writes its soup: both folders hold the same tensors, bit for bit
        export_soup(prep.base_dir, kit.soup_weights(offline.ingredients), tmp_path / "offline", {"version": 1})
        for name in ("open_clip_model.safetensors", "classifier_head.safetensors"):
            live, batch = load_file(str(run_dir / "soup" / name)), load_file(str(tmp_path / "offline" / name))
            assert live.keys() == batch.keys()
            assert all(torch.equal(live[k], batch[k]) for k in batch), name
    finally:
        CLUSTER.clear()
        cluster.shutdown()


def _result_lines(trial_dir: Path) -> list[dict[str, Any]]:
    f = trial_dir / "result.json"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
