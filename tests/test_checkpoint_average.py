"""Streaming checkpoint averaging equals the in-memory average bit for bit and rejects mismatches."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from soup_ray.checkpoint_average import average_checkpoint_files, average_checkpoints
from soup_ray.soup import SoupError, average_state_dicts


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append({
            "w32": torch.randn(33, 17, generator=g),
            "w16": torch.randn(40, generator=g).half(),
            "wbf": (torch.randn(8, 9, generator=g) * 1e3).bfloat16(),
            "w64": torch.randn(5, generator=g, dtype=torch.float64),
            "steps": torch.tensor([7, 1, 3]),
            "mask": torch.tensor([True, False]),
        })
    return out


def _write(tmp_path, states):
    paths = []
    for i, s in enumerate(states):
        p = tmp_path / f"m{i}.safetensors"
        save_file(s, str(p))
        paths.append(p)
    return paths


@pytest.mark.parametrize("n", [1, 2, 5])
def test_files_equal_in_memory_average_exactly(tmp_path, n):
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
