"""Uniform average of safetensors checkpoints at disk speed, in memory that does not grow with their number.

The checkpoints are read tensor by tensor: for each tensor, its bytes are read
from every file in turn (plain positioned reads into one reused buffer) and
added into one reused fp32 accumulator; the mean is then written straight to
the output file (:func:`average_checkpoint_files`) or copied into the
returned state dict (:func:`average_checkpoints`). Memory beyond the result is
two buffers the size of the largest tensor, whatever the number of
checkpoints, and nothing is touched twice: the same work as reading the files.

Why not memory maps: a mapped file's pages count in the process's resident
set while it is open, so keeping N maps open (needed to go tensor by tensor)
makes peak RSS grow with N, and mapping one file at a time (file by file)
needs the whole fp32 sum in fresh memory; on the measured machines faulting in
fresh pages costs more than copying into a buffer that is already resident
(``bench/averaging.py`` measures both ways).

fp16/bf16 tensors are summed in fp32 and cast back; integer and boolean
buffers must be identical everywhere. The arithmetic is that of
:func:`soup_ray.soup.average_state_dicts` (copy of the first, ``add_`` of
each next one in order, division by N, cast to the first dtype), so the
result is bit-for-bit the same. Sources may be paths or in-memory state dicts
(the soup keeper's cached ingredients), mixed freely. ``soup/`` stays pure;
this module does the file work.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import torch
from torch import Tensor

from .soup.average import accumulator_dtype, is_averaged
from .soup.base import SoupError, key_set_difference

Source = Union[str, os.PathLike, Mapping[str, Tensor]]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(f: BinaryIO, where: str) -> tuple[dict[str, Entry], dict[str, str]]:
    """The tensors (name -> :class:`Entry`) and the metadata of an open safetensors file."""
    raw = f.read(8)
    if len(raw) != 8:
        raise SoupError(f"{where}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw)
    if n > 100 * 2**20:
        raise SoupError(f"{where}: not a safetensors file (header of {n} bytes)")
    try:
        header = json.loads(f.read(n))
    except ValueError as err:
        raise SoupError(f"{where}: unreadable safetensors header: {err}") from None
    meta = header.pop("__metadata__", None) or {}
    entries = {}
    for key, d in header.items():
        if d["dtype"] not in DTYPES:
            raise SoupError(f"{where}: tensor {key!r} has an unsupported dtype {d['dtype']}")
        a, b = d["data_offsets"]
        entries[key] = Entry(DTYPES[d["dtype"]], tuple(d["shape"]), 8 + n + a, b - a)
    return entries, meta


class _Buffer:
    """A reused, already resident byte buffer viewed as tensors of any dtype and shape."""

    def __init__(self) -> None:
        self.data = torch.empty(0, dtype=torch.uint8)

    def view(self, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int | None = None) -> Tensor:
        numel = 1
        for s in shape:
            numel *= s
        size = numel * torch.empty((), dtype=dtype).element_size() if nbytes is None else nbytes
        if self.data.numel() < size:
            self.data = torch.zeros(max(size, 2 * self.data.numel()), dtype=torch.uint8)  # zeros: fault in now
        return self.data[:size].view(dtype).view(shape)

    def fill_from(self, f: BinaryIO, e: Entry, where: str) -> Tensor:
        t = self.view(e.dtype, e.shape, e.nbytes)
        if e.nbytes:
            mv = memoryview(self.data.numpy())[: e.nbytes]
            f.seek(e.start)
            got = f.readinto(mv)
            while got < e.nbytes:  # short reads (rare) until the tensor is complete
                more = f.readinto(mv[got:])
                if not more:
                    raise SoupError(f"{where}: truncated tensor data")
                got += more
        return t


class _Source:
    """One ingredient: an open safetensors file or a state dict, read tensor by tensor."""

    def __init__(self, source: Source, index: int):
        self.mapping = source if isinstance(source, Mapping) else None
        self.where = f"state dict {index}" if self.mapping is not None else str(source)
        self.file: BinaryIO | None = None
        self.entries: dict[str, Entry] = {}
        if self.mapping is None:
            self.file = open(self.where, "rb")
            self.entries, _ = read_header(self.file, self.where)

    def keys(self) -> list[str]:
        return list(self.mapping) if self.mapping is not None else list(self.entries)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        if self.mapping is not None:
            v = self.mapping[key]
            if not isinstance(v, Tensor):
                raise SoupError(f"value for key {key!r} is not a tensor: {type(v).__name__}")
            return tuple(v.shape), v.dtype
        e = self.entries[key]
        return e.shape, e.dtype

    def tensor(self, key: str, buf: _Buffer) -> Tensor:
        if self.mapping is not None:
            return self.mapping[key].detach()
        assert self.file is not None
        return buf.fill_from(self.file, self.entries[key], self.where)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _check(sources: list[_Source]) -> tuple[list[str], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """Key sets, shapes and kinds of every source against the first, before anything is read."""
    first = sources[0]
    order = first.keys()
    if not order:
        raise SoupError(f"{first.where}: state dict is empty")
    ref = {k: first.shape_dtype(k) for k in order}
    for i, s in enumerate(sources[1:], start=1):
        difference = key_set_difference(order, s.keys())
        if difference:
            raise SoupError(f"ingredient {i} ({s.where}) has a different key set ({difference})")
        bad = []
        for k in order:
            shape, dtype = s.shape_dtype(k)
            if shape != ref[k][0]:
                bad.append(f"{k!r}: {ref[k][0]} vs {shape}")
            elif is_averaged(torch.empty((), dtype=dtype)) != is_averaged(torch.empty((), dtype=ref[k][1])):
                raise SoupError(f"key {k!r} changes kind: {ref[k][1]} vs {dtype}")
        if bad:
            raise SoupError(f"ingredient {i} ({s.where}) has mismatched shapes: " + "; ".join(bad))
    return order, ref


def _means(sources: Sequence[Source]):
    """Yield ``(key, mean)`` tensor by tensor; each mean is a view of a reused buffer, valid until the next."""
    if not sources:
        raise SoupError("cannot average zero state dicts")
    opened: list[_Source] = []
    try:
        for i, s in enumerate(sources):
            opened.append(_Source(s, i))
        order, ref = _check(opened)
        read_buf, acc_buf, out_buf = _Buffer(), _Buffer(), _Buffer()
        n = len(opened)
        with torch.no_grad():
            for key in order:
                shape, dtype = ref[key]
                first = opened[0].tensor(key, read_buf)
                if not is_averaged(first):
                    exact = acc_buf.view(first.dtype, shape)
                    exact.copy_(first)
                    for i, s in enumerate(opened[1:], start=1):
                        v = s.tensor(key, read_buf)
                        if v.dtype != exact.dtype or not torch.equal(v, exact):
                            raise SoupError(f"non-floating buffer {key!r} differs in ingredient {i}; "
                                            "integer/boolean tensors cannot be averaged and must be identical")
                    yield key, exact
                    continue
                acc = acc_buf.view(accumulator_dtype(dtype), shape)
                acc.copy_(first)
                for s in opened[1:]:
                    v = s.tensor(key, read_buf)
                    acc.add_(v if v.dtype == acc.dtype else v.to(acc.dtype))
                acc.div_(n)  # the same rounding as ``sum / n``
                if acc.dtype == dtype:
                    yield key, acc
                else:
                    out = out_buf.view(dtype, shape)
                    out.copy_(acc)
                    yield key, out
    finally:
        for s in opened:
            s.close()


def average_checkpoints(sources: Sequence[Source]) -> dict[str, Tensor]:
    """The uniform average of ``sources`` (safetensors paths and/or state dicts), read tensor by tensor.

    Raises :class:`soup_ray.soup.SoupError` on a key set, shape or kind
    mismatch (checked from the headers before any tensor is read) or a
    differing integer buffer. Equal to ``average_state_dicts`` of the loaded
    sources, bit for bit.
    """
    return {key: mean.clone() for key, mean in _means(sources)}


def average_checkpoint_files(sources: Sequence[Source], out: str | os.PathLike,
                             metadata: dict[str, str] | None = None) -> Path:
    """Average ``sources`` and write the result to ``out`` (safetensors) tensor by tensor, atomically.

    Memory holds no whole model: each mean goes to the file as soon as it is computed.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    layout: dict[str, dict] = {}
    means = _means(sources)
    try:
        first_key, first_mean = next(means)
        # the header needs every tensor's size up front: take it from the first source
        first = _Source(sources[0], 0)
        try:
            specs = [(k, *first.shape_dtype(k)) for k in first.keys()]
        finally:
            first.close()
        offset = 0
        for k, shape, dtype in specs:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            layout[k] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        header.update(layout)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            base = f.tell()
            _write_at(f, base + layout[first_key]["data_offsets"][0], first_mean)
            for key, mean in means:  # each mean is written before the next one overwrites its buffer
                _write_at(f, base + layout[key]["data_offsets"][0], mean)
        tmp.replace(out)
    except BaseException:
        means.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _write_at(f: BinaryIO, offset: int, t: Tensor) -> None:
    if t.numel():
        f.seek(offset)
        f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
