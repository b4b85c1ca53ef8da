"""The soup keeper under bad input: poison offers, unreadable inbox files, mismatched state, shared names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from soup_ray.cluster.actor import actor_name
from soup_ray.cluster.keeper import SoupKeeper, read_state
from soup_ray.ingredients import Kitchen, trial_records_from_results


def offers(run: Path) -> list[dict]:
    return [r.to_json() for r in trial_records_from_results(run)]


@pytest.mark.parametrize("bad", [-1, 10**6, "12", 3.5, [1]])
def test_a_poison_heldout_count_is_rejected_and_later_offers_still_join(run_copy: Path, bad) -> None:
    good = offers(run_copy)
    keeper = SoupKeeper(str(run_copy), publish=False)
    keeper.offer({**good[0], "trial_id": "poison", "heldout_correct": bad})
    keeper.process_inbox()  # must not raise: the poison goes to the rejected list
    status = keeper.status()
    assert "poison" in status["rejected"] and "held-out" in status["rejected"]["poison"]
    for t in good:
        keeper.offer(t)
    assert keeper.process_inbox() == len(good)
    assert set(keeper.status()["ingredients"]) <= {t["trial_id"] for t in good}
    assert keeper.status()["candidates_accepted_as_candidates"] == len(good)


def test_a_null_heldout_count_is_read_from_the_checkpoint(run_copy: Path) -> None:
    good = offers(run_copy)[0]
    keeper = SoupKeeper(str(run_copy), publish=False)
    keeper.offer({**good, "heldout_correct": None})
    keeper.process_inbox()
    assert keeper.status()["rejected"] == {} and keeper.status()["soup_size"] == 1


def test_an_unreadable_inbox_file_is_recorded_not_skipped(run_copy: Path) -> None:
    inbox = run_copy / "soup_state" / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "garbled.json").write_text('{"trial_id": "gar')
    keeper = SoupKeeper(str(run_copy), publish=False)
    status = keeper.status()
    assert "garbled.json" in " ".join(status["rejected"]) or any("garbled" in v for v in status["rejected"].values())
    assert (inbox / "garbled.json").exists() is False  # moved aside, kept for a person to read
    assert any(p.name.startswith("garbled") for p in (run_copy / "soup_state" / "unreadable").iterdir())


def test_a_restored_state_must_match_the_requested_tie_rule(run_copy: Path) -> None:
    keeper = SoupKeeper(str(run_copy), tie=">=", publish=False)
    keeper.offer(offers(run_copy)[0])
    keeper.process_inbox()
    assert read_state(run_copy)["tie"] == ">="
    with pytest.raises(ValueError, match="tie"):
        SoupKeeper(str(run_copy), tie=">", publish=False)


def test_state_files_are_synced_to_disk(run_copy: Path, monkeypatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    keeper = SoupKeeper(str(run_copy), publish=False)
    keeper.offer(offers(run_copy)[0])
    keeper.process_inbox()
    assert len(synced) >= 2  # the file and its folder


def test_two_runs_with_the_same_folder_name_get_different_actors(tmp_path: Path) -> None:
    a, b = tmp_path / "x" / "run", tmp_path / "y" / "run"
    assert actor_name(a) != actor_name(b)
    assert actor_name(a) == actor_name(tmp_path / "x" / ".." / "x" / "run")  # the same folder, however spelled
    assert actor_name(a).startswith("soup:run-")


def test_the_weight_cache_is_bounded_in_bytes(run_copy: Path) -> None:
    kitchen = Kitchen(run_copy, cache_bytes=1)
    records = trial_records_from_results(run_copy)
    for r in records:
        kitchen.admit(r)
    one = sum(t.numel() * t.element_size() for t in kitchen.weights(records[0].trial_id).values())
    assert kitchen.cache_bytes_used() <= one  # never more than the one just loaded
    big = Kitchen(run_copy, cache_bytes=10 * one)
    for r in records:
        big.admit(r)
    assert big.cache_bytes_used() == len(records) * one
