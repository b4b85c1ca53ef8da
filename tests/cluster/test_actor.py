"""The soup keeper/actor: exact incremental soup from real checkpoints, rejections, persistence, export."""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from soup_ray.cluster.keeper import TRANSIENT_ATTEMPTS, SoupKeeper, read_state
from soup_ray.export import load_soup
from soup_ray.ingredients import Kitchen, trial_records_from_results
from soup_ray.soup import greedy_soup


def offline_greedy(run: Path, tie: str = ">=") -> list[str]:
    kit = Kitchen(run)
    cands = [kit.admit(r) for r in trial_records_from_results(run)]
    return greedy_soup(cands, kit.evaluate, heldout_size=kit.heldout_size, tie=tie).ingredients


def offers(run: Path) -> list[dict]:
    return [r.to_json() for r in trial_records_from_results(run)]


@pytest.mark.parametrize("order_seed", [0, 1])
def test_keeper_equals_batch_greedy_in_any_order(run_copy: Path, order_seed: int) -> None:
    trials = offers(run_copy)
    random.Random(order_seed).shuffle(trials)
    keeper = SoupKeeper(str(run_copy))
    for t in trials:
        assert keeper.offer(t)["queued"]
        keeper.process_inbox()
    assert keeper.status()["ingredients"] == offline_greedy(run_copy)
    assert keeper.status()["candidates_seen"] == len(trials)


def test_offer_is_idempotent(run_copy: Path) -> None:
    keeper = SoupKeeper(str(run_copy))
    t = offers(run_copy)[0]
    assert keeper.offer(t)["queued"] is True
    assert keeper.offer(t)["duplicate"] is True  # still queued
    keeper.process_inbox()
    assert keeper.offer(t)["duplicate"] is True  # already processed
    assert keeper.status()["candidates_seen"] == 1


def _bad_copy(run: Path, src: dict, name: str) -> dict:
    dest = run / "bad" / name
    shutil.copytree(src["checkpoint"], dest)
    return {**src, "trial_id": name, "checkpoint": str(dest)}


def test_bad_checkpoints_are_rejected_with_reason_and_soup_unchanged(run_copy: Path) -> None:
    good = offers(run_copy)
    keeper = SoupKeeper(str(run_copy))
    for t in good:
        keeper.offer(t)
    keeper.process_inbox()
    before = keeper.status()
    src = good[0]

    wrong_base = _bad_copy(run_copy, src, "wrong-base")
    p = Path(wrong_base["checkpoint"]) / "model.safetensors"
    save_file(load_file(str(p)), str(p), metadata={"base_fingerprint": "0" * 64})

    nan = _bad_copy(run_copy, src, "nan")
    p = Path(nan["checkpoint"]) / "model.safetensors"
    sd = load_file(str(p))
    k = next(k for k, v in sd.items() if v.is_floating_point())
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("nan")
    save_file(sd, str(p), metadata={"base_fingerprint": keeper.kitchen.fingerprint})

    shape = _bad_copy(run_copy, src, "shape")
    p = Path(shape["checkpoint"]) / "model.safetensors"
    sd = load_file(str(p))
    sd["head.bias"] = torch.zeros(3)
    save_file(sd, str(p), metadata={"base_fingerprint": keeper.kitchen.fingerprint})

    keys = _bad_copy(run_copy, src, "keys")
    p = Path(keys["checkpoint"]) / "model.safetensors"
    sd = load_file(str(p))
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, str(p), metadata={"base_fingerprint": keeper.kitchen.fingerprint})

    corrupt = _bad_copy(run_copy, src, "corrupt")
    p = Path(corrupt["checkpoint"]) / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])

    garbage = _bad_copy(run_copy, src, "not-safetensors")
    (Path(garbage["checkpoint"]) / "model.safetensors").write_bytes(b"\x89PNG\r\n" + bytes(range(256)) * 8)

    pickled = _bad_copy(run_copy, src, "pickle")  # a pickle named like safetensors is refused, never unpickled
    torch.save(
        load_file(str(Path(src["checkpoint"]) / "model.safetensors")), Path(pickled["checkpoint"]) / "model.safetensors"
    )

    other_arch = _bad_copy(run_copy, src, "other-arch")
    p = Path(other_arch["checkpoint"]) / "model.safetensors"
    save_file(
        {"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)},
        str(p),
        metadata={"base_fingerprint": keeper.kitchen.fingerprint},
    )

    fewer = _bad_copy(run_copy, src, "missing-key")
    p = Path(fewer["checkpoint"]) / "model.safetensors"
    sd = load_file(str(p))
    sd.pop("head.weight")
    save_file(sd, str(p), metadata={"base_fingerprint": keeper.kitchen.fingerprint})

    no_metrics = {**_bad_copy(run_copy, src, "no-metrics"), "heldout_correct": None}
    (Path(no_metrics["checkpoint"]) / "metrics.json").unlink()

    bad_metrics = {**_bad_copy(run_copy, src, "bad-metrics"), "heldout_correct": None}
    (Path(bad_metrics["checkpoint"]) / "metrics.json").write_text('{"heldout_correct": "many"}')

    bad = (wrong_base, nan, shape, keys, corrupt, garbage, pickled, other_arch, fewer, no_metrics, bad_metrics)
    for t in bad:
        keeper.offer(t)
    keeper.process_inbox()
    missing = {**src, "trial_id": "missing", "checkpoint": str(run_copy / "nowhere")}
    keeper.offer(missing)
    for _ in range(TRANSIENT_ATTEMPTS):  # not there (yet): retried a few times, then set aside with the reason
        keeper.retry_at.clear()
        keeper.process_inbox()
    after = keeper.status()
    assert after["ingredients"] == before["ingredients"] and after["version"] == before["version"]
    reasons = after["rejected"]
    assert "fingerprint" in reasons["wrong-base"]
    assert "non-finite" in reasons["nan"]
    assert "shape of head.bias" in reasons["shape"]
    assert "extra.weight" in reasons["keys"]
    assert "unreadable" in reasons["corrupt"]
    assert "unreadable" in reasons["not-safetensors"] and "unreadable" in reasons["pickle"]
    assert "conv1.weight" in reasons["other-arch"] and "missing ['head.weight']" in reasons["missing-key"]
    assert "no held-out score" in reasons["no-metrics"] and "no held-out score" in reasons["bad-metrics"]
    assert "no model.safetensors" in reasons["missing"] and "still unreadable" in reasons["missing"]
    assert after["queued"] == 0 and set(reasons) >= {t["trial_id"] for t in bad}


def test_restart_resumes_exactly_and_replays_the_inbox(run_copy: Path) -> None:
    trials = offers(run_copy)
    keeper = SoupKeeper(str(run_copy))
    for t in trials[:3]:
        keeper.offer(t)
    keeper.process_inbox()
    mid = keeper.status()
    for t in trials[3:]:
        keeper.offer(t)  # accepted, then the process "dies" before processing them
    del keeper
    revived = SoupKeeper(str(run_copy))
    assert revived.status()["ingredients"] == mid["ingredients"]
    assert revived.status()["version"] == mid["version"]
    assert revived.status()["queued"] == len(trials) - 3
    assert revived.restarts == 1
    revived.process_inbox()
    assert revived.status()["ingredients"] == offline_greedy(run_copy)
    assert revived.status()["candidates_seen"] == len(trials)
    state = read_state(run_copy)
    assert state is not None and state["version"] == revived.status()["version"]
    assert not list((run_copy / "soup_state" / "inbox").glob("*.json"))


def test_published_soup_loads_through_open_clip_and_predicts_like_the_soup(run_copy: Path) -> None:
    keeper = SoupKeeper(str(run_copy), tie=">")
    for t in offers(run_copy):
        keeper.offer(t)
    keeper.process_inbox()
    st = keeper.status()
    soup_dir = run_copy / "soup"
    info = json.loads((soup_dir / "soup.json").read_text())
    assert info["ingredients"] == st["ingredients"] and info["version"] == st["version"]
    assert info["heldout_accuracy"] == pytest.approx(st["heldout_accuracy"])
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{soup_dir}")
    assert model is not None and preprocess is not None
    clf, _ = load_soup(soup_dir)
    kit = Kitchen(run_copy)
    for r in trial_records_from_results(run_copy):
        kit.admit(r)
    ref = kit.classifier(st["ingredients"]).eval()
    x, _ = kit.bundle.test.tensors
    with torch.no_grad():
        assert torch.allclose(clf(x), ref(x), atol=1e-5)
        assert torch.equal(clf(x).argmax(1), ref(x).argmax(1))
    versions = sorted(p.name for p in (run_copy / "soup_versions").iterdir())
    assert versions and versions[-1] == f"v{st['version']:04d}"


def test_status_answers_while_an_evaluation_runs(run_copy: Path) -> None:
    import threading

    keeper = SoupKeeper(str(run_copy))
    trials = offers(run_copy)
    keeper.offer(trials[0])
    keeper.process_inbox()
    gate, entered = threading.Event(), threading.Event()
    real = keeper.kitchen.evaluate

    def slow(ids, max_wrong):
        entered.set()
        assert gate.wait(60), "test gate never opened"
        return real(ids, max_wrong)

    keeper.soup.evaluate = slow
    keeper.offer(trials[1])
    worker = threading.Thread(target=keeper.process_inbox)
    worker.start()
    try:
        assert entered.wait(60), "the evaluation never started"
        st = keeper.status()  # must not wait for the blocked evaluation
        assert st["busy"] is True and st["candidates_seen"] == 1
        assert keeper.offer(trials[2])["queued"] is True  # offers are taken while busy too
    finally:
        gate.set()
        worker.join(60)
    keeper.process_inbox()
    assert keeper.status()["candidates_seen"] == 3 and keeper.status()["busy"] is False


ACTOR_NS = "actor-tests"


@pytest.fixture(scope="module")
def local_ray():
    """One embedded Ray for the actor tests of this module (each run folder is its own actor)."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, namespace=ACTOR_NS)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_an_idle_actor_retires_for_good_and_keeps_its_state(local_ray, run_copy: Path) -> None:
    """On a cluster the detached actor must not hold its GPU share forever: once idle it exits, not restarted."""
    import ray

    from soup_ray.cluster.actor import actor_name, start_soup_actor
    from soup_ray.cluster.keeper import read_state

    actor = start_soup_actor(run_copy, cpu=0.25)
    for o in offers(run_copy)[:2]:
        ray.get(actor.offer.remote(o))
    assert ray.get(actor.wait_idle.remote(120.0))
    before = ray.get(actor.status.remote())
    # a new sweep on the run cancels a pending retirement
    ray.get(actor.retire_when_idle.remote(1.0, 0.2))
    ray.get(actor.keep_alive.remote())
    time.sleep(2.5)
    assert ray.get(actor.status.remote(), timeout=10)["version"] == before["version"]
    assert ray.get(actor.retire_when_idle.remote(1.0, 0.2)) == 1.0  # returns at once
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            ray.get(actor.status.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.3)
    else:
        pytest.fail("the idle actor did not exit")
    time.sleep(1.0)
    with pytest.raises(ValueError):  # dead for good: max_restarts=-1 did not bring it back
        ray.get_actor(actor_name(run_copy), namespace=ACTOR_NS)
    state = read_state(run_copy)
    assert state is not None and state["version"] == before["version"]
    # a new actor for the run resumes from the persisted state
    again = start_soup_actor(run_copy, cpu=0.25)
    st = ray.get(again.status.remote())
    assert st["ingredients"] == before["ingredients"] and st["restarts"] == before["restarts"] + 1
    # a pending exit survives a crash: the restarted actor re-arms it from the state on disk (a timer thread
    # alone would die with the process and the detached actor would hold its GPU share for good)
    ray.get(again.retire_when_idle.remote(2.0, 0.2))
    ray.kill(again, no_restart=False)
    deadline = time.time() + 90
    gone = False
    while time.time() < deadline and not gone:
        try:
            ray.get_actor(actor_name(run_copy), namespace=ACTOR_NS)
            time.sleep(0.5)
        except ValueError:
            gone = True
    assert gone, "the restarted actor forgot it was to exit when idle"


def _gone(name: str, namespace: str, within_s: float = 60.0) -> bool:
    import ray

    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return True
        time.sleep(0.3)
    return False


@pytest.mark.slow
def test_a_broken_actor_is_not_left_up_and_a_fixed_state_starts_a_fresh_one(local_ray, run_copy: Path) -> None:
    """A detached actor whose keeper cannot start must not hold its CPU/GPU share, and the printed remedy (fix
    soup_state/ and resume) must work: a new start must not reattach to the broken actor."""
    import ray

    from soup_ray.cluster.actor import actor_name, start_soup_actor
    from soup_ray.cluster.sweep import SoupActorFailed, check_actor
    from soup_ray.run_dir import RunDir

    first = offers(run_copy)[0]
    keeper = SoupKeeper(str(run_copy), publish=False)
    keeper.offer(first)
    keeper.process_inbox()
    state_file = RunDir(run_copy).state_file
    good = state_file.read_text()
    state_file.write_text("{ not json")
    name, ns = actor_name(run_copy), ACTOR_NS
    # asked to retire (the end of a sweep on a cluster), a broken actor exits at once
    broken = start_soup_actor(run_copy, cpu=0.25)
    assert ray.get(broken.retire_when_idle.remote(3600.0), timeout=60) == 0.0
    assert _gone(name, ns), "the broken actor stayed up after retire_when_idle"
    # the driver's check stops it: nothing is left listed, holding resources or a sticky error
    broken = start_soup_actor(run_copy, cpu=0.25)
    # it answers with the reason instead of restarting forever, and the driver's check ends with a clear
    # error naming the actor, well within its time-out
    with pytest.raises(ray.exceptions.RayTaskError, match="could not start"):
        ray.get(broken.offer.remote(first), timeout=60)
    t0 = time.time()
    with pytest.raises(SoupActorFailed, match=re.escape(name) + ".*could not start: JSONDecodeError"):
        check_actor(broken, name, timeout=60)
    assert time.time() - t0 < 60
    assert _gone(name, ns), "the broken actor is still listed after the failed check"
    state_file.write_text(good)  # the remedy: fix soup_state/ and start again
    again = start_soup_actor(run_copy, cpu=0.25)
    status = check_actor(again, name, timeout=60)
    assert "fatal_error" not in status and status["ingredients"] == [first["trial_id"]]
