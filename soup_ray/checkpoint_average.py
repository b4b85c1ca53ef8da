"""Uniform average of safetensors checkpoints at disk speed, in memory that does not grow with their number.

The checkpoints are read tensor by tensor: for each tensor, its bytes are
taken from every file in turn and added into one reused fp32 accumulator; the
mean is then written straight to the output file
(:func:`average_checkpoint_files`) or copied into the returned state dict
(:func:`average_checkpoints`).

Each file is memory-mapped (copy-on-write, never written) and every tensor is
added straight from the mapped page cache, so the bytes are touched once, as
a plain read touches them. Right after a tensor is used its pages are
dropped from this process's mappings (``madvise(MADV_DONTNEED)``; the page
cache keeps them), so the resident set holds at most one tensor of each map
at a time, however many files are open: memory beyond the result is the
accumulator and one cast buffer, the size of the largest tensor. Where a map
cannot be used (no ``madvise`` on the platform, a tensor whose offset is not
aligned to its element size), that tensor is read with a positioned read
into one reused buffer instead.

Open files do not grow with the number of checkpoints either: a mapped file
holds one descriptor (the map's; the file itself is closed once mapped), and
at most half of the descriptors still free under ``RLIMIT_NOFILE`` are spent on
maps. The files beyond that are read tensor by tensor with positioned reads,
each opened only for its read. Before a tensor is read, the file's current
size is checked against its header, so a checkpoint truncated while it is being
averaged (rewritten in place) is a :class:`SoupError` rather than a ``SIGBUS``
from touching a page past its end (a truncation in the instant between that
check and the read cannot be caught this way).

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
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from .soup.average import accumulator_dtype, is_averaged
from .soup.base import SoupError, key_set_difference

Source = str | os.PathLike | Mapping[str, Tensor]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
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


MAP_RELEASE = getattr(mmap, "MADV_DONTNEED", None) if hasattr(mmap.mmap, "madvise") else None
# a page fault on a map also maps neighbouring cached pages (Linux "fault-around", 64 KiB by default, up to a
# huge page); releasing this much before each tensor as well drops those that belong to tensors already done
RELEASE_MARGIN = 2 * 2**20


def map_budget() -> int:
    """How many files may be memory-mapped at once: half of the descriptors still free under the soft
    ``RLIMIT_NOFILE`` (the rest of the process keeps the other half)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    return max(0, (int(soft) - in_use) // 2)


class _Source:
    """One ingredient: a safetensors file (memory-mapped, or read with positioned reads) or a state dict,
    read tensor by tensor.

    A file is opened only to read its header and map it; the map keeps one
    descriptor of its own. With ``mapped=False`` (or no ``madvise``) no
    descriptor stays open: each tensor's read opens the file for that read.
    """

    def __init__(self, source: Source, index: int, mapped: bool = True):
        self.mapping = source if isinstance(source, Mapping) else None
        self.where = f"state dict {index}" if self.mapping is not None else str(source)
        self.map: mmap.mmap | None = None
        self.entries: dict[str, Entry] = {}
        if self.mapping is None:
            with open(self.where, "rb") as f:
                self.entries, _ = read_header(f, self.where)
                size = os.fstat(f.fileno()).st_size
                self._check_size(size, self.entries.values())
                if mapped and MAP_RELEASE is not None and size:
                    self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def _check_size(self, size: int, entries) -> None:
        end = max((e.start + e.nbytes for e in entries), default=0)
        if end > size:
            raise SoupError(f"{self.where}: truncated tensor data ({size} bytes, the header needs {end})")

    def keys(self) -> list[str]:
        """The tensor names; for a file in the order of their bytes (one sequential pass over the file)."""
        if self.mapping is not None:
            return list(self.mapping)
        return sorted(self.entries, key=lambda k: self.entries[k].start)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        if self.mapping is not None:
            v = self.mapping[key]
            if not isinstance(v, Tensor):
                raise SoupError(f"value for key {key!r} is not a tensor: {type(v).__name__}")
            return tuple(v.shape), v.dtype
        e = self.entries[key]
        return e.shape, e.dtype

    def tensor(self, key: str, buf: _Buffer) -> Tensor:
        """The tensor ``key``: a view of the map (call :meth:`release` after use) or of ``buf``."""
        if self.mapping is not None:
            return self.mapping[key].detach()
        e = self.entries[key]
        size = e.dtype.itemsize
        if self.map is not None and e.nbytes and e.start % size == 0:
            self._check_size(self.map.size(), [e])  # the file now, not at open: it may have been rewritten
            return torch.frombuffer(self.map, dtype=e.dtype, count=e.nbytes // size, offset=e.start).view(e.shape)
        with open(self.where, "rb") as f:
            self._check_size(os.fstat(f.fileno()).st_size, [e])
            return buf.fill_from(f, e, self.where)

    def release(self, key: str) -> None:
        """Drop the pages of ``key`` from this process's map (they stay in the page cache)."""
        if self.map is None:  # a map exists only where MAP_RELEASE does
            return
        e = self.entries[key]
        start = max(0, e.start - RELEASE_MARGIN)
        start -= start % mmap.PAGESIZE
        end = min(len(self.map), e.start + e.nbytes)
        if end > start:
            self.map.madvise(MAP_RELEASE, start, end - start)

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a view is still alive somewhere: the map closes when it goes
                pass


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


def _means(sources: Sequence[Source], into: Mapping[str, Tensor] | None = None):
    """Yield ``(key, mean)`` tensor by tensor; each mean is a view of a reused buffer, valid until the next.

    ``into`` (optional) is checked against the sources' keys and shapes before anything is read.
    """
    if not sources:
        raise SoupError("cannot average zero state dicts")
    opened: list[_Source] = []
    try:
        maps = map_budget()
        for i, s in enumerate(sources):
            opened.append(_Source(s, i, mapped=maps > 0))
            maps -= opened[-1].map is not None
        order, ref = _check(opened)
        if into is not None:
            _check_target(into, order, ref)
        read_buf, second_buf, acc_buf, out_buf = _Buffer(), _Buffer(), _Buffer(), _Buffer()
        n = len(opened)
        with torch.no_grad():
            for key in order:
                shape, dtype = ref[key]
                first = opened[0].tensor(key, read_buf)
                if not is_averaged(first):
                    exact = acc_buf.view(first.dtype, shape)
                    exact.copy_(first)
                    del first
                    opened[0].release(key)
                    for i, s in enumerate(opened[1:], start=1):
                        v = s.tensor(key, read_buf)
                        same = v.dtype == exact.dtype and torch.equal(v, exact)
                        del v
                        s.release(key)
                        if not same:
                            raise SoupError(
                                f"non-floating buffer {key!r} differs in ingredient {i}; "
                                "integer/boolean tensors cannot be averaged and must be identical"
                            )
                    yield key, exact
                    continue
                acc = _target_accumulator(into, key, accumulator_dtype(dtype))
                if acc is None:
                    acc = acc_buf.view(accumulator_dtype(dtype), shape)
                second = opened[1].tensor(key, second_buf) if n > 1 else None
                if second is not None and first.dtype == second.dtype == acc.dtype:
                    torch.add(first, second, out=acc)  # the same sum as a copy and an add_, one pass fewer
                else:
                    acc.copy_(first)
                    if second is not None:
                        acc.add_(second if second.dtype == acc.dtype else second.to(acc.dtype))
                del first, second
                for s in opened[:2]:
                    s.release(key)
                for s in opened[2:]:
                    v = s.tensor(key, read_buf)
                    acc.add_(v if v.dtype == acc.dtype else v.to(acc.dtype))
                    del v
                    s.release(key)
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


def _target_accumulator(into: Mapping[str, Tensor] | None, key: str, dtype: torch.dtype) -> Tensor | None:
    """The target tensor itself when the sum can be accumulated in it (CPU, contiguous, the accumulator's dtype)."""
    if into is None:
        return None
    t = into[key]
    return t if t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() else None


def _check_target(into: Mapping[str, Tensor], order: list[str], ref: dict) -> None:
    difference = key_set_difference(order, list(into))
    if difference:
        raise SoupError(f"the target state dict has a different key set than the ingredients ({difference})")
    bad = [f"{k!r}: {ref[k][0]} vs {tuple(into[k].shape)}" for k in order if tuple(into[k].shape) != ref[k][0]]
    if bad:
        raise SoupError("the target state dict has mismatched shapes: " + "; ".join(bad))


def average_checkpoints(sources: Sequence[Source], into: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The uniform average of ``sources`` (safetensors paths and/or state dicts), read tensor by tensor.

    Raises :class:`soup_ray.soup.SoupError` on a key set, shape or kind
    mismatch (checked from the headers before any tensor is read) or a
    differing integer buffer. Equal to ``average_state_dicts`` of the loaded
    sources, bit for bit.

    With ``into`` (a model's ``state_dict()``, whose tensors share the
    model's storage) each mean is copied straight into the tensor of the same
    name (cast to its dtype, moved to its device) and ``into`` is returned:
    no second copy of the model is allocated. Its keys and shapes are checked
    before anything is written; a differing integer buffer found later
    leaves it partly overwritten.
    """
    if into is None:
        return {key: mean.clone() for key, mean in _means(sources)}
    with torch.no_grad():
        for key, mean in _means(sources, into):
            if mean is not into[key]:  # fp32 CPU weights were accumulated in place already
                into[key].copy_(mean)
    return dict(into)


def average_checkpoint_files(
    sources: Sequence[Source], out: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
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
