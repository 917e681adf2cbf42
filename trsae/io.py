"""Atomic file writes: a reader never sees a partial file or folder. Standard library only (imports nothing of
trsae, nor torch or numpy), so that every module, the pure SAE and metric modules included, can share it.

    atomic_path        a temporary file to write, renamed over the target on success
    atomic_dir         a temporary folder to fill, renamed over the target on success
    atomic_write_*     bytes, text, JSON
    write_json_atomic  results JSON: `to_jsonable` first (tensors, arrays, NaN -> null), indent 2
    folder_lock        one writing process per folder (a store, a run): a second is refused at once
    deferred_signals   SIGTERM and SIGINT recorded, not acted on, so a loop can checkpoint and stop cleanly
"""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None


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
        _raise_no_space(e, path)
        raise


def _raise_no_space(e: BaseException, path: Path) -> None:
    code = _no_space(e)
    if code is not None:
        raise NoSpaceError(code, f"no space left to write {path} ({os.strerror(code)}); nothing partial was "
                                 "left: free space there or write to another folder, then rerun the same "
                                 "command (a harvest or training run resumes)") from e


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on success it replaces ``path`` (an existing folder
    there is removed first); on any error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as e:
        _raise_no_space(e, path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 1, sort_keys: bool = True,
                      allow_nan: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")


def to_jsonable(obj: Any) -> Any:
    """Tensors, numpy values, paths and tuples to plain JSON types; NaN / ±inf to ``None``.

    Duck-typed, so that this module needs neither torch nor numpy: a torch tensor is what has ``detach``, a numpy
    array or scalar what has ``tolist`` and ``dtype``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):
        return to_jsonable(obj.detach().cpu().tolist())
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):
        return to_jsonable(obj.tolist())
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``to_jsonable(obj)`` as JSON to ``path`` atomically: keys in insertion order, ``indent`` 2, no NaN."""
    return atomic_write_json(path, to_jsonable(obj), indent=indent, sort_keys=False, allow_nan=False)


# --- one writer per folder ----------------------------------------------------------------------------

LOCK_FILE = ".trsae.lock"
_HELD: dict[Path, int] = {}  # folders this process holds -> nesting depth


class FolderBusyError(RuntimeError):
    """Another live process holds the folder's lock."""


def _holder(path: Path) -> str:
    """Who holds the lock at ``path``, from what it wrote there (read again briefly while still empty)."""
    for _ in range(20):
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text:
            pid, host, cmd = (text.split(" ", 2) + ["", ""])[:3]
            where = "" if host == socket.gethostname() else f" on {host}"
            return f"process {pid}{where} ({cmd})" if cmd else f"process {pid}{where}"
        time.sleep(0.05)
    return "another process"


def _command(limit: int = 100) -> str:
    """This process's command line, shortened (``python -m trsae train ...`` for the CLI)."""
    argv = sys.argv or [""]
    head = Path(argv[0])
    head = f"python -m {head.parent.name}" if head.name == "__main__.py" else head.name
    cmd = " ".join([head, *argv[1:]])
    return cmd if len(cmd) <= limit else cmd[:limit - 1] + "…"


def _acquire(path: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive flock (released by the OS when the process dies, so
    a lock left by a killed process never blocks); FolderBusyError if a live process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # the umask applies
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = _holder(path)
            raise FolderBusyError(f"{path.parent} is being written by {who}; wait for it to finish or stop it, "
                                  "then rerun (one process per folder)") from None
        try:  # the holder we waited on may have removed the file: then lock the new one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()} {_command()}\n".encode())
            return fd
        os.close(fd)


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder``'s lock (creating the folder) for the block; reentrant within a process.

    A second process (a CLI run, a notebook) asking for the same folder meanwhile gets FolderBusyError at once,
    naming the holder's pid. The lock file is removed on release."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder; name a folder to write to")
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if fcntl is None or key in _HELD:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    fd = _acquire(folder / LOCK_FILE)
    _HELD[key] = 1
    try:
        yield folder
    finally:
        del _HELD[key]
        (folder / LOCK_FILE).unlink(missing_ok=True)  # while still held: a waiter then locks a new file
        os.close(fd)


@contextmanager
def deferred_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[list[int]]:
    """Inside, these signals only append themselves to the yielded list, for a loop to see at the end of its step
    (then checkpoint and stop); outside the main thread, where no handler can be set, nothing changes."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in signums}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)
