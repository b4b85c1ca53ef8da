"""The schedulers of tune.scheduler, driven with fake trials and results (no Ray started)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from soup_ray.cluster.scheduler import LoggingASHA, SoupScheduler, make_scheduler
from soup_ray.config import ConfigError, parse_config
from tests.conftest import tiny_config_dict


def _trial(tid: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid)


def test_soup_scheduler_stops_only_rung_results_that_would_cost_the_soup(tmp_path: Path) -> None:
    log = tmp_path / "scheduler.jsonl"
    s = SoupScheduler(margin=1, log_path=log)
    ctl = None
    # an epoch without a rung is never judged, whatever it carries
    assert s.on_trial_result(ctl, _trial("a"), {"epoch": 2, "soup_size": 3, "soup_gain": -50}) == "CONTINUE"
    # no soup yet: the first trials run on
    assert s.on_trial_result(ctl, _trial("a"), {"epoch": 1, "rung": 1, "soup_size": 0}) == TrialScheduler.CONTINUE
    assert (
        s.on_trial_result(ctl, _trial("b"), {"epoch": 1, "rung": 1, "soup_size": 2, "soup_gain": -1})
        == TrialScheduler.CONTINUE
    )
    assert (
        s.on_trial_result(ctl, _trial("c"), {"epoch": 1, "rung": 1, "soup_size": 2, "soup_gain": -2, "soup_version": 4})
        == TrialScheduler.STOP
    )
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(r["trial_id"], r["decision"]) for r in rows] == [("a", "CONTINUE"), ("b", "CONTINUE"), ("c", "STOP")]
    assert rows[2]["soup_gain"] == -2 and rows[2]["soup_version"] == 4 and "costs more than 1" in rows[2]["reason"]
    assert s.judged == 2 and "1 of 3 rung decisions stopped" in s.debug_string()
    assert s.gains == {1: [-1, -2]}


def test_the_cut_compares_a_gain_with_the_gains_seen_at_the_same_rung_only() -> None:
    s = SoupScheduler(margin=None, reduction_factor=2.0)
    got = []
    for tid, rung, gain in [("a", 1, -5), ("b", 1, -1), ("c", 4, -9), ("d", 1, -8), ("e", 1, 0), ("f", 4, -2)]:
        got.append(
            s.on_trial_result(None, _trial(tid), {"epoch": rung, "rung": rung, "soup_size": 2, "soup_gain": gain})
        )
    # rung 1: a alone (its own median), b above a's, d below the median of (-5, -1, -8), e above;
    # rung 4 starts its own list: c alone, f above the median of (-9, -2)
    assert got == ["CONTINUE", "CONTINUE", "CONTINUE", "STOP", "CONTINUE", "CONTINUE"]


def test_an_unwritable_log_never_changes_a_decision(tmp_path: Path) -> None:
    s = SoupScheduler(margin=0, log_path=tmp_path / "missing" / "scheduler.jsonl")
    assert s.on_trial_result(None, _trial("a"), {"rung": 1, "soup_size": 1, "soup_gain": -3}) == TrialScheduler.STOP


def test_config_picks_the_scheduler_and_its_rungs(tmp_path: Path) -> None:
    def cfg(**kw):
        return parse_config(tiny_config_dict(**{"search_space.epochs": {"randint": [2, 8]}, **kw}))

    assert make_scheduler(cfg()) is None
    c = cfg(**{"tune.scheduler": "soup", "tune.soup_margin": 2})
    s = make_scheduler(c, tmp_path / "log.jsonl")
    assert isinstance(s, SoupScheduler) and s.margin == 2 and s.reduction_factor is None
    d = make_scheduler(cfg(**{"tune.scheduler": "soup", "tune.soup_cut": True, "tune.soup_margin": None}))
    assert d.margin is None and d.reduction_factor == 4.0
    assert make_scheduler(cfg(**{"tune.scheduler": "soup"})).margin == 20
    assert c.tune.rungs(c.search_space.max_epochs()) == [1, 4]
    a = make_scheduler(cfg(**{"tune.scheduler": "asha", "tune.reduction_factor": 2}))
    assert isinstance(a, LoggingASHA) and a._max_t == 8
    c2 = cfg(**{"tune.scheduler": "asha", "tune.reduction_factor": 2})
    assert c2.tune.rungs(8) == [1, 2, 4]
    with pytest.raises(ConfigError, match="no rung is below the most epochs a trial can draw"):
        parse_config(tiny_config_dict(**{"tune.scheduler": "soup", "search_space.epochs": 1}))
    with pytest.raises(ConfigError, match="scheduler"):
        parse_config(tiny_config_dict(**{"tune.scheduler": "hyperband"}))


def test_logging_asha_decides_as_tunes_asha_and_logs_its_rungs(tmp_path: Path) -> None:
    from ray.tune.schedulers import ASHAScheduler

    log = tmp_path / "asha.jsonl"
    ours = LoggingASHA(time_attr="epoch", max_t=8, grace_period=1, reduction_factor=2, log_path=log)
    theirs = ASHAScheduler(time_attr="epoch", max_t=8, grace_period=1, reduction_factor=2)
    decisions = []
    for sch in (ours, theirs):
        sch.set_search_properties("heldout_acc", "max")
        got = []
        for i, acc in enumerate([0.5, 0.9, 0.4, 0.8, 0.3]):
            t = _trial(f"t{i}")
            sch.on_trial_add(None, t)
            got.append(sch.on_trial_result(None, t, {"epoch": 1, "rung": 1, "heldout_acc": acc}))
        decisions.append(got)
    assert decisions[0] == decisions[1]
    assert TrialScheduler.STOP in decisions[0]
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["decision"] for r in rows] == decisions[0] and all(r["scheduler"] == "asha" for r in rows)
