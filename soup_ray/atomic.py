"""Writing run files whole or not at all: a temporary file beside the target, then one rename.

A run can be stopped at any moment (Ctrl-C, a lost node); a reader, a resumed
run or ``soup-ray report`` then finds either the old file or the new one, never
half of one. ``durable`` also syncs the file and its folder, for state that
must survive a power loss (the soup keeper's). Standard library only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _tmp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def sync(path: str | os.PathLike) -> None:
    """``fsync`` a file, or a folder (so that the names created or renamed in it survive a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, it replaces ``path`` in one rename.

    If the block raises (a Ctrl-C included), the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        sync(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> None:
    with replacing(path, durable) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str, durable: bool = False) -> None:
    with replacing(path, durable) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2, durable: bool = False) -> None:
    write_text(path, json.dumps(data, indent=indent), durable)
