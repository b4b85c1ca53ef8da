"""Streaming checkpoint averaging equals the in-memory average bit for bit and rejects mismatches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from soup_ray import checkpoint_average
from soup_ray.checkpoint_average import average_checkpoint_files, average_checkpoints
from soup_ray.soup import SoupError, average_state_dicts


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append(
            {
                "w32": torch.randn(33, 17, generator=g),
                "w16": torch.randn(40, generator=g).half(),
                "wbf": (torch.randn(8, 9, generator=g) * 1e3).bfloat16(),
                "w64": torch.randn(5, generator=g, dtype=torch.float64),
                "steps": torch.tensor([7, 1, 3]),
                "mask": torch.tensor([True, False]),
            }
        )
    return out


def _write(tmp_path, states):
    paths = []
    for i, s in enumerate(states):
        p = tmp_path / f"m{i}.safetensors"
        save_file(s, str(p))
        paths.append(p)
    return paths


@pytest.mark.parametrize("mapped", [True, False], ids=["memory-mapped", "positioned-reads"])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_files_equal_in_memory_average_exactly(tmp_path, monkeypatch, n, mapped):
    if not mapped:
        monkeypatch.setattr(checkpoint_average, "MAP_RELEASE", None)
    elif checkpoint_average.MAP_RELEASE is None:
        pytest.skip("no madvise on this platform: every tensor is read with positioned reads")
    states = _states(n)
    paths = _write(tmp_path, states)
    want = average_state_dicts(states)
    got = average_checkpoints(paths)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert torch.equal(got[k], want[k]), k
    # half types were summed in fp32: the mean differs from a naive half-precision sum
    naive = sum(s["wbf"] for s in states) / n
    if n > 2:
        assert not torch.equal(naive, got["wbf"])


def test_mixed_sources_and_written_file(tmp_path):
    states = _states(4, seed=1)
    paths = _write(tmp_path, states)
    mixed = [paths[0], states[1], paths[2], states[3]]
    want = average_state_dicts(states)
    out = average_checkpoint_files(mixed, tmp_path / "soup.safetensors", metadata={"n": "4"})
    back = load_file(str(out))
    assert all(torch.equal(back[k], want[k]) for k in want)
    assert not (tmp_path / "soup.safetensors.tmp").exists()


def test_mismatches_are_rejected(tmp_path):
    a, b = _states(2)
    with pytest.raises(SoupError, match="key set"):
        average_checkpoints(_write(tmp_path, [a, {k: v for k, v in b.items() if k != "w16"}]))
    with pytest.raises(SoupError, match="shapes"):
        average_checkpoints([a, dict(b, w32=torch.zeros(3))])
    with pytest.raises(SoupError, match="must be identical"):
        average_checkpoints([a, dict(b, steps=torch.tensor([7, 1, 4]))])
    with pytest.raises(SoupError, match="zero"):
        average_checkpoints([])


def test_written_file_keeps_metadata_and_is_not_left_half_written(tmp_path):
    from safetensors import safe_open

    states = _states(3, seed=2)
    paths = _write(tmp_path, states)
    out = average_checkpoint_files(paths, tmp_path / "soup.safetensors", metadata={"ingredients": "3"})
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"ingredients": "3"}
        assert sorted(f.keys()) == sorted(states[0])
    bad = dict(states[0], steps=torch.tensor([0, 0, 0]))
    with pytest.raises(SoupError):
        average_checkpoint_files([paths[0], bad], tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists() and not (tmp_path / "bad.safetensors.tmp").exists()


def test_mapped_tensors_leave_the_resident_set_and_truncation_is_named(tmp_path):
    """Each file's pages are dropped from the process after use, so N open maps cost no N-fold memory."""
    if checkpoint_average.MAP_RELEASE is None:
        pytest.skip("no madvise on this platform")
    psutil = pytest.importorskip("psutil")
    g = torch.Generator().manual_seed(3)
    states = [{"big": torch.randn(4 * 2**20, generator=g), "small": torch.randn(3, generator=g)} for _ in range(6)]
    paths = _write(tmp_path, states)  # six files of 16 MiB
    sources = [checkpoint_average._Source(p, i) for i, p in enumerate(paths)]
    try:
        proc = psutil.Process()
        before = proc.memory_info().rss
        acc = torch.zeros(4 * 2**20)
        for s in sources:
            v = s.tensor("big", checkpoint_average._Buffer())
            acc.add_(v)
            del v
            s.release("big")
        grown = proc.memory_info().rss - before
        assert grown < 2 * 16 * 2**20, f"resident set grew by {grown / 2**20:.0f} MiB over six 16 MiB maps"
        assert torch.allclose(acc, sum(st["big"] for st in states))
    finally:
        for s in sources:
            s.close()
    raw = paths[0].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SoupError, match="truncated"):
        average_checkpoints([paths[1], cut])


def test_average_into_a_model_state_dict_writes_in_place_and_checks_first(tmp_path):
    states = _states(3, seed=4)
    paths = _write(tmp_path, states)
    want = average_state_dicts(states)
    target = {k: torch.zeros_like(v) for k, v in states[0].items()}
    storage = {k: v.data_ptr() for k, v in target.items()}
    got = average_checkpoints([paths[0], states[1], paths[2]], into=target)
    assert all(torch.equal(target[k], want[k]) for k in want)
    assert {k: v.data_ptr() for k, v in got.items()} == storage  # the same tensors, no copy of the model
    # a target of another architecture is refused before a single tensor is written
    untouched = {k: torch.full_like(v, 3) for k, v in states[0].items() if k != "w16"}
    with pytest.raises(SoupError, match="key set"):
        average_checkpoints(paths, into=untouched)
    wrong = dict(untouched, w16=torch.zeros(41).half())
    with pytest.raises(SoupError, match="mismatched shapes"):
        average_checkpoints(paths, into=wrong)
    assert all(torch.equal(v, torch.full_like(v, 3)) for k, v in wrong.items() if k != "w16")


def _child(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a lowered limit or a fatal signal stays there)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )


FEW_DESCRIPTORS = r"""
import resource, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from soup_ray.checkpoint_average import average_checkpoint_files, average_checkpoints
from soup_ray.soup import average_state_dicts

folder, n = Path(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
states = [{"w": torch.randn(300, generator=g), "h": torch.randn(7, generator=g).half(),
           "b": torch.randn(3, generator=g)} for _ in range(n)]
paths = []
for i, s in enumerate(states):
    paths.append(folder / f"m{i}.safetensors")
    save_file(s, str(paths[-1]))
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
want = average_state_dicts(states)
got = average_checkpoints(paths)
assert all(torch.equal(got[k], want[k]) for k in want), "differs"
average_checkpoint_files(paths, folder / "mean.safetensors")
print("averaged", n)
"""


@pytest.mark.slow  # runs long on its own: the full suite only
@pytest.mark.parametrize("n", [40, 200])
def test_averaging_many_files_stays_within_a_small_descriptor_limit(tmp_path, n):
    """Memory is flat in the number of checkpoints: open files must not grow with it either (soft limit 64)."""
    done = _child(FEW_DESCRIPTORS, str(tmp_path), str(n))
    assert done.returncode == 0 and f"averaged {n}" in done.stdout, done.stderr[-2000:]


REWRITTEN_WHILE_MAPPED = r"""
import sys
from collections.abc import Mapping
from pathlib import Path
import torch
from safetensors.torch import save_file
from soup_ray.checkpoint_average import average_checkpoints, read_header
from soup_ray.soup import SoupError

path = Path(sys.argv[1]) / "m0.safetensors"
g = torch.Generator().manual_seed(0)
states = [{f"t{j}": torch.randn(2**16, generator=g) for j in range(4)} for _ in range(2)]  # 256 KiB each
save_file(states[0], str(path))
with open(path, "rb") as f:
    entries, _ = read_header(f, str(path))
order = sorted(entries, key=lambda k: entries[k].start)
first_end = entries[order[0]].start + entries[order[0]].nbytes


class Rewriting(Mapping):
    # the second ingredient: reading its first tensor truncates the first file, as a rewrite in place does
    def __init__(self, state):
        self.state, self.reads = state, 0

    def __getitem__(self, k):
        if k == order[0]:
            self.reads += 1
            if self.reads == 2:  # the first read was the shape check
                with open(path, "r+b") as f:
                    f.truncate(first_end)
        return self.state[k]

    def __iter__(self):
        return iter(order)

    def __len__(self):
        return len(self.state)


try:
    average_checkpoints([path, Rewriting(states[1])])
    print("averaged")
except SoupError as err:
    print("refused:", err)
"""


@pytest.mark.slow  # runs long on its own: the full suite only
def test_a_checkpoint_truncated_while_it_is_mapped_is_an_error_not_a_crash(tmp_path):
    """The soup actor must not die of SIGBUS when a checkpoint is rewritten in place during an average."""
    if checkpoint_average.MAP_RELEASE is None:
        pytest.skip("no memory maps on this platform: positioned reads see the truncation")
    done = _child(REWRITTEN_WHILE_MAPPED, str(tmp_path))
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-2000:]}"
    assert "refused:" in done.stdout and "truncated" in done.stdout
