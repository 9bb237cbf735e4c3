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
    """Append rows, each as one complete line written with a single os.write, then fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for row in rows:
            data = (json.dumps(row, ensure_ascii=False) + "\n").encode()
            while data:  # a short write must not leave half a line behind
                data = data[os.write(fd, data):]
            n += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    return n


def read_jsonl(path: str | Path, repair: bool = True) -> list[dict]:
    """All complete rows of a JSONL file. A torn last line (no newline, not valid JSON) is a
    leftover of a killed write: it is dropped, and removed from the file if `repair`; a valid last
    row missing only its newline is kept and its line finished."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    head, newline, tail = data.rpartition(b"\n")
    rows, offset = [], 0
    for line in head.split(b"\n") if newline else []:
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}: corrupt line at byte {offset}: {line[:80]!r}") from None
        offset += len(line) + 1
    if tail.strip():
        try:
            rows.append(json.loads(tail))
            torn = False
        except ValueError:
            torn = True
        if repair and torn:
            log.warning("%s: dropping a partial last line left by an interrupted write", path)
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(tail))
        elif repair:
            with open(path, "ab") as f:
                f.write(b"\n")
    return rows
