"""Crash-safe files. Whole files and directories (manifest, tensors, an adapter, a checkpoint) are
written beside the target and renamed over it, so a reader sees the old or the new version, never
half of one. JSONL outputs grow one complete line per write; reading repairs a torn last line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from prism.errors import PrismError

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the mode an ordinary open() would (0666 less umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def atomic_write_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, written beside the target and renamed over it."""
    from safetensors.torch import save_file  # torch: imported only by the callers that write tensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path` for a writer that needs a file name (e.g. a GGUF
    writer); on success it is renamed over `path`, on an error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f"{target.name}.{tag}")


def recover_directory(target: str | Path) -> None:
    """Finish a swap that a kill interrupted between its two renames (see replace_directory)."""
    target = Path(target)
    old = _sibling(target, "old")
    if not target.exists() and old.is_dir():
        old.rename(target)


def replace_directory(source: str | Path, target: str | Path) -> None:
    """Move the complete directory `source` to `target`, replacing what was there. At every moment
    one complete version exists: the previous one waits as `<target>.old` until the new one is in."""
    source, target = Path(source), Path(target)
    old = _sibling(target, "old")
    recover_directory(target)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    source.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | Path):
    """Yield an empty `<target>.tmp` to fill; on success it replaces `target` whole. On an error
    the half-written directory is removed and `target` is untouched."""
    target = Path(target)
    tmp = _sibling(target, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed write of our own
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, target)


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Append rows as complete lines, all in one os.write (a kill cannot split one call's rows
    between "written" and "lost"), then fsync. A torn last line left by an earlier killed write is
    removed first, so the new rows never continue it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [(json.dumps(row, ensure_ascii=False) + "\n").encode() for row in rows]
    if path.is_file():
        repair_last_line(path)
    data = b"".join(lines)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:  # a short write: write the rest, never leave half a line behind
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(lines)


def repair_last_line(path: str | Path) -> None:
    """A last line without its newline is finished when it is a complete row, and cut off when it
    is the torn leftover of a killed write."""
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        start = end
        while start > 0:  # back to the byte after the last newline
            step = min(1 << 16, start)
            f.seek(start - step)
            cut = f.read(step).rfind(b"\n")
            if cut >= 0:
                start = start - step + cut + 1
                break
            start -= step
        f.seek(start)
        try:
            json.loads(f.read())
        except ValueError:
            log.warning("%s: dropping a partial last line left by an interrupted write", path)
            f.truncate(start)
        else:
            f.write(b"\n")


def read_jsonl(path: str | Path, repair: bool = True) -> list[dict]:
    """All complete rows of a JSONL file. A torn last line (no newline, not valid JSON) is a
    leftover of a killed write: it is dropped, and removed from the file if `repair`; a valid last
    row missing only its newline is kept (and its line finished if `repair`)."""
    path = Path(path)
    if not path.is_file():
        return []
    if repair:
        repair_last_line(path)
    lines = path.read_bytes().split(b"\n")
    rows, offset = [], 0
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                if n == len(lines):  # a torn last line, left in place (repair=False)
                    break
                raise PrismError(f"{path}: corrupt line {n} (byte {offset}): {line[:80]!r}") from None
            if not isinstance(row, dict):
                raise PrismError(f"{path}: line {n} is not a JSON object: {line[:80]!r}")
            rows.append(row)
        offset += len(line) + 1
    return rows


class LockHeld(Exception):
    """Another process holds the lock; `pid` is what it wrote into the lock file ('' if unknown)."""

    def __init__(self, path: Path, pid: str):
        super().__init__(f"{path} is held by process {pid or '(unknown)'}")
        self.path, self.pid = path, pid


@contextmanager
def exclusive_lock(path: str | Path, wait: bool = True):
    """Hold an exclusive advisory lock (flock) on `path` for the block. The kernel drops it when
    the holder exits or is killed, so no stale lock survives a crash. The file keeps the holder's
    pid and is left in place afterwards (removing it would let a third process lock a new file
    while a second still waits on the old one). Without `wait`, a held lock raises LockHeld."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockHeld(path, os.pread(fd, 32, 0).decode(errors="replace").strip()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
