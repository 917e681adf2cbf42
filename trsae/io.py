"""Atomic file writes: a reader never sees a partial file. Standard library only (imports nothing of trsae),
so that every module, the pure SAE and metric modules included, can share it."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class NoSpaceError(OSError):
    """A write failed because the disk (or a quota or file-size limit) is full; nothing partial was left."""

    def __str__(self) -> str:
        return self.strerror


def _no_space(exc: BaseException) -> int | None:
    """The errno of a full-disk failure, also when a library wrapped it (safetensors' Rust writer reports
    ``I/O error: ... (os error 28)``); None for any other error."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return exc.errno
    m = re.search(r"os error (\d+)", str(exc))
    return int(m.group(1)) if m and int(m.group(1)) in _NO_SPACE else None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder to write to; on success it is fsynced, given the usual
    permissions (mkstemp makes 0600) and renamed over ``path``; on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        code = _no_space(e)
        if code is not None:
            raise NoSpaceError(code, f"no space left to write {path} ({os.strerror(code)}); nothing partial was "
                                     "left: free space there or write to another folder, then rerun the same "
                                     "command (a harvest or training run resumes)") from e
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 1, sort_keys: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
