"""The soup keeper under bad input: poison offers, unreadable inbox files, mismatched state, shared names."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from soup_ray.cluster.actor import actor_name
from soup_ray.cluster.keeper import TRANSIENT_ATTEMPTS, SoupKeeper, read_state
from soup_ray.ingredients import Kitchen, TrialRecord, trial_records_from_results
from soup_ray.run_dir import RunDir
from soup_ray.soup import greedy_soup


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


def _weights(run: Path, i: int = 0) -> dict:
    return load_file(str(Path(offers(run)[i]["checkpoint"]) / "model.safetensors"))


def test_a_published_soup_is_synced_to_disk_files_and_folders(run_copy: Path, monkeypatch) -> None:
    """The keeper's fsynced state says "published": the soup's own files must be on disk too."""
    from soup_ray import export

    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    out = run_copy / "published" / "soup"
    for version in (1, 2):  # a first folder, then one replacing it
        synced.clear()
        export.export_soup(RunDir(run_copy).base, _weights(run_copy, version), out, {"version": version})
        names = {Path(p).name for p in synced}
        assert {
            "open_clip_model.safetensors",
            "classifier_head.safetensors",
            "open_clip_config.json",
            "soup.json",
        } <= names, synced
        assert any(Path(p).name.startswith(".soup.") for p in synced)  # the new folder before it is swapped in
        assert str(out.parent) in synced  # and the folder holding it, after the swap


class Crash(BaseException):
    """Stands for the process being killed at that point."""


@pytest.mark.parametrize("exchange", [True, False], ids=["one-step-swap", "two-renames"])
def test_a_crash_at_any_step_of_a_publish_leaves_a_loadable_soup(run_copy: Path, monkeypatch, exchange) -> None:
    """Readers (ModelSlot, the live page, load_soup) follow soup/: it must hold the old or the new soup whole."""
    import shutil

    from soup_ray import export

    if exchange and not export.exchange_supported(run_copy):
        pytest.skip("no one-step swap on this platform or file system")
    if not exchange:
        monkeypatch.setattr(export, "exchange_paths", lambda a, b: False)
    base = RunDir(run_copy).base
    steps = [
        (os, "rename"),
        (os, "replace"),
        (Path, "rename"),
        (Path, "replace"),
        (shutil, "rmtree"),
        (export, "exchange_paths"),
    ]
    for crash_at in range(1, 6):
        out = run_copy / f"crash{crash_at}" / "soup"
        export.export_soup(base, _weights(run_copy, 0), out, {"version": 1})
        calls = {"n": 0}
        for owner, name in steps:
            real = getattr(owner, name)

            def counted(*a, _real=real, _calls=calls, _crash_at=crash_at, **kw):
                _calls["n"] += 1
                if _calls["n"] == _crash_at:
                    raise Crash
                return _real(*a, **kw)

            monkeypatch.setattr(owner, name, counted)
        try:
            export.export_soup(base, _weights(run_copy, 1), out, {"version": 2})
        except Crash:
            pass
        monkeypatch.undo()
        if not exchange:
            monkeypatch.setattr(export, "exchange_paths", lambda a, b: False)
            export.recover_folder(out)  # what the keeper does on start and every export first: two renames
            # leave a moment with no folder, and a crash inside it leaves the old soup aside, whole
        _, info = export.load_soup(out)
        assert info["version"] in (1, 2), crash_at


def test_the_idle_exit_waits_for_a_publish_in_progress(run_copy: Path, monkeypatch) -> None:
    trial = offers(run_copy)[0]
    keeper = SoupKeeper(str(run_copy))
    real = keeper._publish
    gate, entered = threading.Event(), threading.Event()

    def slow(version):
        entered.set()
        assert gate.wait(60), "test gate never opened"
        real(version)

    monkeypatch.setattr(keeper, "_publish", slow)
    keeper.offer(trial)
    worker = _offer_in_thread(keeper)
    try:
        assert entered.wait(60), "the publish never started"
        with keeper.lock:
            keeper.busy = False  # the retried publish of run_forever runs outside an offer's batch
            assert keeper.idle_seconds() is None  # a publish in progress is not idle: the watcher must not kill
    finally:
        gate.set()
        worker.join(60)
    with keeper.lock:
        assert keeper.idle_seconds() is not None
        keeper.retiring = True  # the watcher decided: no publish may start after that
    keeper.publish_pending, keeper.publish_retry_at = True, 0.0
    assert not keeper.publish_if_pending()


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


def move_checkpoint_away(run: Path, trial: dict) -> tuple[Path, Path]:
    folder = Path(trial["checkpoint"])
    hidden = folder.with_name(folder.name + ".not-yet-visible")
    folder.rename(hidden)
    return folder, hidden


def test_a_checkpoint_not_visible_yet_is_retried_not_rejected(run_copy: Path) -> None:
    trial = offers(run_copy)[0]
    folder, hidden = move_checkpoint_away(run_copy, trial)
    keeper = SoupKeeper(str(run_copy))
    keeper.offer(trial)
    keeper.process_inbox()
    st = keeper.status()
    assert trial["trial_id"] not in st["rejected"] and st["queued"] == 1 and st["version"] == 0
    hidden.rename(folder)  # the mount caught up
    keeper.retry_at.clear()  # skip the backoff pause
    keeper.process_inbox()
    st = keeper.status()
    assert st["ingredients"] == [trial["trial_id"]] and st["queued"] == 0 and st["version"] == 1


def test_a_trial_given_up_as_unreadable_joins_when_offered_again(run_copy: Path) -> None:
    trial = offers(run_copy)[0]
    folder, hidden = move_checkpoint_away(run_copy, trial)
    keeper = SoupKeeper(str(run_copy))
    keeper.offer(trial)
    for _ in range(TRANSIENT_ATTEMPTS):
        keeper.retry_at.clear()
        keeper.process_inbox()
    assert "still unreadable" in keeper.status()["rejected"][trial["trial_id"]]
    hidden.rename(folder)
    again = SoupKeeper(str(run_copy))  # also across a restart
    assert again.offer(trial)["queued"]  # the end-of-sweep re-offer is not dropped as a duplicate
    again.process_inbox()
    assert again.status()["ingredients"] == [trial["trial_id"]]
    assert trial["trial_id"] not in again.status()["rejected"]


def test_a_failed_publish_is_retried_and_keeps_the_version_number(run_copy: Path, monkeypatch) -> None:
    trial = offers(run_copy)[0]
    keeper = SoupKeeper(str(run_copy))
    real = keeper._publish
    calls = {"n": 0}

    def flaky(version: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        real(version)

    monkeypatch.setattr(keeper, "_publish", flaky)
    keeper.offer(trial)
    keeper.process_inbox()
    st = keeper.status()
    assert st["version"] == 0 and st["publish_pending"] and "No space left" in st["last_error"]
    assert st["ingredients"] == [trial["trial_id"]] and st["queued"] == 0  # the offer itself is not lost
    assert not RunDir(run_copy).version(1).exists()
    keeper.publish_retry_at = 0.0
    assert keeper.publish_if_pending()
    st = keeper.status()
    assert st["version"] == 1 and not st["publish_pending"] and st["last_error"] is None
    info = json.loads((RunDir(run_copy).version(1) / "soup.json").read_text())
    assert info["version"] == 1 and info["ingredients"] == [trial["trial_id"]]


def test_a_restart_after_a_publish_it_did_not_record_never_reuses_the_number(run_copy: Path) -> None:
    trials = offers(run_copy)
    keeper = SoupKeeper(str(run_copy))
    keeper.offer(trials[0])
    keeper.process_inbox()
    v1 = RunDir(run_copy).version(1) / "soup.json"
    first = v1.read_text()
    # the crash came after the folder was written and before the state said so
    state = json.loads(RunDir(run_copy).state_file.read_text())
    state["version"], state["published"] = 0, {}
    RunDir(run_copy).state_file.write_text(json.dumps(state))
    again = SoupKeeper(str(run_copy))
    assert again.status()["version"] >= 1
    for t in trials[1:]:
        again.offer(t)
    again.process_inbox()
    again.publish_if_pending()
    assert v1.read_text() == first  # v1 names one soup only
    assert again.status()["version"] >= 2


def _offer_in_thread(keeper: SoupKeeper) -> threading.Thread:
    def work() -> None:
        try:
            keeper.process_inbox()
        except Exception:  # noqa: BLE001 - the state on disk is what the test looks at
            pass

    worker = threading.Thread(target=work)
    worker.start()
    return worker


def test_a_persist_during_an_evaluation_never_records_the_offer_before_its_soup(run_copy: Path) -> None:
    """keep_alive / retire_when_idle persist the state while the worker evaluates: that state must not say the
    offer was processed, or a keeper restarted after the evaluation failed (OOM, preemption) loses it for good."""
    trials = offers(run_copy)
    keeper = SoupKeeper(str(run_copy), publish=False)
    keeper.offer(trials[0])
    keeper.process_inbox()
    gate, entered = threading.Event(), threading.Event()

    def dies(ids, max_wrong):
        entered.set()
        assert gate.wait(60), "test gate never opened"
        raise RuntimeError("CUDA out of memory")

    keeper.soup.evaluate = dies
    keeper.offer(trials[1])
    worker = _offer_in_thread(keeper)
    try:
        assert entered.wait(60), "the evaluation never started"
        with keeper.lock:
            keeper.set_retirement(3600.0)  # what keep_alive, retire_when_idle and the actor's re-arm do
        persisted = read_state(run_copy)
        assert trials[1]["trial_id"] not in persisted["records"]  # its soup is not decided yet
    finally:
        gate.set()
        worker.join(60)
    again = SoupKeeper(str(run_copy), publish=False)  # the actor died with the evaluation; a new one starts
    assert again.status()["queued"] == 1
    again.process_inbox()
    st = again.status()
    assert st["candidates_accepted_as_candidates"] == 2 and st["queued"] == 0
    assert trials[1]["trial_id"] in {c.id for c in again.soup.candidates}


def test_an_offer_recorded_without_its_soup_is_queued_again(run_copy: Path) -> None:
    """A state written mid-evaluation by an older keeper lists an offer its soup never saw: it is offered again."""
    trials = offers(run_copy)
    keeper = SoupKeeper(str(run_copy), publish=False)
    keeper.offer(trials[0])
    keeper.process_inbox()
    state = read_state(run_copy)
    state["records"][trials[1]["trial_id"]] = trials[1]
    RunDir(run_copy).state_file.write_text(json.dumps(state))
    again = SoupKeeper(str(run_copy), publish=False)
    assert again.status()["queued"] == 1 and trials[1]["trial_id"] not in read_state(run_copy)["records"]
    again.process_inbox()
    assert trials[1]["trial_id"] in again.soup and again.status()["candidates_accepted_as_candidates"] == 2


def _small_cache(run: Path) -> None:
    cfg = json.loads(RunDir(run).config.read_text())
    cfg["soup"]["cache_mb"] = 1e-6  # one byte: every ingredient but the newest is read from disk again
    RunDir(run).config.write_text(json.dumps(cfg))


def _best_first(trials: list[dict]) -> list[dict]:
    return sorted(trials, key=lambda t: (-t["heldout_correct"], t["trial_id"]))


def test_an_ingredient_whose_weights_vanish_is_dropped_and_later_offers_still_join(run_copy: Path) -> None:
    _small_cache(run_copy)
    a, b, c = _best_first(offers(run_copy))[:3]  # a is the best: the soup always starts with it
    keeper = SoupKeeper(str(run_copy))
    for t in (a, b):
        keeper.offer(t)
        keeper.process_inbox()
    assert a["trial_id"] in keeper.status()["ingredients"]
    (Path(a["checkpoint"]) / "model.safetensors").unlink()  # deleted or moved after it joined
    keeper.offer(c)
    for _ in range(TRANSIENT_ATTEMPTS):  # maybe a mount not caught up: retried with a back-off, then dropped
        keeper.retry_at.clear()
        keeper.process_inbox()
    st = keeper.status()
    assert st["queued"] == 0 and c["trial_id"] in {x.id for x in keeper.soup.candidates}
    assert a["trial_id"] not in st["ingredients"] and "cannot be read" in st["rejected"][a["trial_id"]]
    kitchen = Kitchen(run_copy)
    cands = [kitchen.admit(TrialRecord.from_json(t)) for t in (b, c)]
    assert st["ingredients"] == greedy_soup(cands, kitchen.evaluate, heldout_size=kitchen.heldout_size).ingredients
    info = json.loads(RunDir(run_copy).soup_info.read_text())
    assert info["ingredients"] == st["ingredients"] and info["version"] == st["version"]


def test_a_publish_that_needs_vanished_weights_drops_them_and_publishes_the_others(run_copy: Path, monkeypatch) -> None:
    _small_cache(run_copy)
    a, b = _best_first(offers(run_copy))[:2]
    keeper = SoupKeeper(str(run_copy))
    real = keeper._publish
    monkeypatch.setattr(keeper, "_publish", lambda version: (_ for _ in ()).throw(OSError(28, "No space left")))
    for t in (a, b):
        keeper.offer(t)
        keeper.process_inbox()
    assert keeper.status()["publish_pending"] and a["trial_id"] in keeper.status()["ingredients"]
    monkeypatch.setattr(keeper, "_publish", real)
    (Path(a["checkpoint"]) / "model.safetensors").unlink()
    for _ in range(TRANSIENT_ATTEMPTS + 1):
        keeper.publish_retry_at = 0.0
        if keeper.publish_if_pending():
            break
    st = keeper.status()
    assert not st["publish_pending"] and st["version"] == 1 and a["trial_id"] not in st["ingredients"]
    assert "cannot be read" in st["rejected"][a["trial_id"]]
    assert json.loads(RunDir(run_copy).soup_info.read_text())["ingredients"] == st["ingredients"] == [b["trial_id"]]


def test_a_checkpoint_of_another_dtype_is_rejected_when_offered(run_copy: Path) -> None:
    good = offers(run_copy)
    src = Path(good[0]["checkpoint"])
    dest = run_copy / "bad" / "half"
    import shutil

    shutil.copytree(src, dest)
    p = dest / "model.safetensors"
    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(p))
    k = next(k for k, v in sd.items() if v.is_floating_point())
    sd[k] = sd[k].to(torch.int32)
    save_file(sd, str(p), metadata=meta)
    keeper = SoupKeeper(str(run_copy), publish=False)
    keeper.offer({**good[0], "trial_id": "other-dtype", "checkpoint": str(dest)})
    for t in good:
        keeper.offer(t)
    assert keeper.process_inbox() == len(good) + 1
    st = keeper.status()
    assert "dtype" in st["rejected"]["other-dtype"] and st["candidates_accepted_as_candidates"] == len(good)


def test_an_evaluation_that_keeps_failing_rejects_only_its_own_offer(run_copy: Path) -> None:
    trials = offers(run_copy)
    keeper = SoupKeeper(str(run_copy), publish=False)
    keeper.offer(trials[0])
    keeper.process_inbox()
    real = keeper.soup.evaluate

    def poisoned(ids, max_wrong):
        if trials[1]["trial_id"] in ids:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(ids, max_wrong)

    keeper.soup.evaluate = poisoned
    for t in trials[1:]:
        keeper.offer(t)
    for _ in range(TRANSIENT_ATTEMPTS):
        keeper.retry_at.clear()
        keeper.process_inbox()
    st = keeper.status()
    assert st["queued"] == 0 and "could not be evaluated" in st["rejected"][trials[1]["trial_id"]]
    assert st["candidates_accepted_as_candidates"] == len(trials) - 1
    keeper.soup.evaluate = real
    assert keeper.offer(trials[1])["queued"]  # given up for now, not for good: a re-offer tries it again
    keeper.process_inbox()
    assert keeper.status()["candidates_accepted_as_candidates"] == len(trials)
