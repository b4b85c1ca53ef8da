"""The soup scheduler end to end on a short real sweep (embedded local Ray, one trial at a time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soup_ray.config import parse_config
from soup_ray.results import read_jsonl
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow


def _oracle_greedy(run_dir: Path, rows: list[dict]) -> list[str]:
    """The batch greedy soup by plain torch: candidates by held-out count (ties by id), each kept when the plain
    mean of the weights scores at least as well on the held-out images as the soup without it."""
    from soup_ray.data import build_dataset
    from soup_ray.model import load_base

    clf, meta = load_base(run_dir / "base")
    cfg = parse_config(json.loads((run_dir / "config.json").read_text()))
    heldout = build_dataset(cfg.data, int(meta["image_size"])).heldout
    xs = torch.stack([heldout[i][0] for i in range(len(heldout))])
    ys = torch.as_tensor([int(heldout[i][1]) for i in range(len(heldout))])

    def score(ids: list[str]) -> int:
        parts = [load_file(str(run_dir / by_id[i]["checkpoint"] / "model.safetensors")) for i in ids]
        mean = {k: torch.stack([p[k].double() for p in parts]).mean(0).to(parts[0][k].dtype) for k in parts[0]}
        clf.load_state_dict(mean)
        clf.eval()
        with torch.no_grad():
            return int((clf(xs).argmax(1) == ys).sum())

    by_id = {r["trial_id"]: r for r in rows if r["status"] == "completed"}
    order = sorted(by_id, key=lambda i: (-by_id[i]["heldout_correct"], i))
    soup: list[str] = [order[0]]
    best = score(soup)
    for tid in order[1:]:
        s = score([*soup, tid])
        if s >= best:
            soup, best = [*soup, tid], s
    return soup


def test_a_trial_the_soup_scheduler_stops_still_reaches_the_soup(prepared, tmp_path: Path, monkeypatch) -> None:
    from soup_ray.cluster.sweep import run_sweep
    from soup_ray.prepare import prepare_run

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = parse_config(
        tiny_config_dict(
            **{
                # lr 0.5 wrecks a trial: its rung checkpoints cost the soup held-out images
                "search_space.lr": {"choice": [1e-3, 0.5]},
                "search_space.epochs": 3,
                "tune.num_samples": 4,
                "tune.seed": 2,
                "tune.scheduler": "soup",
                # the tiny stand-in's trials are weak: any rung checkpoint that costs the soup an image stops
                "tune.soup_margin": 0,
                "tune.reduction_factor": 2,  # rungs at epochs 1 and 2
            }
        )
    )
    run_dir = tmp_path / "run"
    prep = prepare_run(cfg, run_dir, log=lambda m: None)
    lines: list[str] = []
    outcome = run_sweep(cfg, run_dir, log=lines.append, prepared=prep)
    assert not outcome.interrupted
    rows = outcome.rows
    assert len(rows) == 4 and all(r["status"] == "completed" and r["checkpoint"] for r in rows), rows

    # every rung decision is logged with its signal; a stop is exactly a soup that would lose more than the margin
    log = [json.loads(x) for x in (run_dir / "scheduler.jsonl").read_text().splitlines()]
    assert log and all(d["scheduler"] == "soup" for d in log)
    for d in log:
        assert (d["decision"] == "STOP") == (d.get("soup_size", 0) > 0 and d["soup_gain"] < -cfg.tune.soup_margin), d
    stopped = [r for r in rows if r.get("stopped_early")]
    assert stopped, f"no trial was stopped: {log}"
    for r in stopped:
        stop = next(d for d in log if d["trial_id"] == r["trial_id"] and d["decision"] == "STOP")
        assert r["epochs_run"] == stop["epoch"] < r["hyperparameters"]["epochs"]
        # it trained no epoch past its rung, and its rung checkpoint is a whole soup candidate
        trial_dir = next(d for d in (run_dir / "tune").iterdir() if d.name.find(r["trial_id"]) >= 0)
        epochs = [json.loads(x)["epoch"] for x in (trial_dir / "result.json").read_text().splitlines() if x.strip()]
        assert max(epochs) == stop["epoch"]
        ckpt = run_dir / r["checkpoint"]
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "logits.safetensors").is_file()
        assert r["test"] is not None and r["heldout_correct"] is not None

    # the soup actor was offered every trial, the stopped ones included, and its soup is the batch greedy
    soup = outcome.soup
    assert soup is not None and soup["candidates_seen"] == 4 and not soup["rejected"]
    state = json.loads((run_dir / "soup_state" / "state.json").read_text())
    assert {r["trial_id"] for r in stopped} <= set(json.dumps(state).split('"'))
    info = json.loads((run_dir / "soup" / "soup.json").read_text())
    assert info["ingredients"] == _oracle_greedy(run_dir, read_jsonl(run_dir / "results.jsonl"))
