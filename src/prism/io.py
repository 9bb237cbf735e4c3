"""Crash-safe files: atomic whole-file writes and append-only JSON lines.

Whole files (manifest, configs) are written to a temporary file and renamed over the target,
so a reader sees the old or the new version, never half of one. JSONL stage outputs grow one
complete line per write; if a kill ever leaves a partial last line, reading drops and repairs it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the mode an ordinary open() would (0666 less umask)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


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
    leftover of a killed write: it is dropped, and removed from the file if `repair`."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    rows: list[dict] = []
    good_end = 0
    for line in _lines_with_ends(data):
        text, end, complete = line
        if not text.strip():
            good_end = end
            continue
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError:
            if complete:
                raise ValueError(f"{path}: corrupt line at byte {good_end}: {text[:80]!r}") from None
            break
        if not complete:  # valid JSON but no newline: keep it and finish the line
            if repair:
                with open(path, "ab") as f:
                    f.write(b"\n")
            good_end = end + 1
            break
        good_end = end
    if good_end < len(data) and repair:
        log.warning("%s: dropping a partial last line left by an interrupted write", path)
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows


def _lines_with_ends(data: bytes) -> Iterator[tuple[str, int, bool]]:
    start = 0
    while start < len(data):
        nl = data.find(b"\n", start)
        if nl == -1:
            yield data[start:].decode(errors="replace"), len(data), False
            return
        yield data[start:nl].decode(errors="replace"), nl + 1, True
        start = nl + 1
