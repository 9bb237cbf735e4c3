"""Helpers shared by the benchmark scripts: the machine, timing medians, tables, JSON, CPU checks."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "results"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def busy_processes(min_cpu: float = 20.0) -> list[str]:
    """Other processes using a CPU core noticeably right now (they distort timings on 2 cores)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,ni,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    me = {os.getpid(), os.getppid()}
    busy = []
    for line in out:
        parts = line.split(None, 3)
        if len(parts) < 4:
            continue
        pid, cpu = int(parts[0]), float(parts[1])
        if cpu < min_cpu:
            break
        if pid not in me and "ps -eo" not in parts[3]:
            busy.append(f"pid {pid} cpu {cpu:.0f}% nice {parts[2]}: {parts[3][:90]}")
    return busy


def machine() -> dict:
    """What the numbers were measured on, including anything else competing for the CPU."""
    import torch
    import transformers

    flags = _cpu_flags()
    return {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "load_average": [round(x, 2) for x in os.getloadavg()],
        "other_busy_processes": busy_processes(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def command() -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    script = Path(sys.argv[0]).resolve()
    shown = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0]
    return (env + " " if env else "") + "python " + " ".join([shown, *sys.argv[1:]])


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> str:
    """A Markdown table (readable in a terminal too)."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return (f"**{title}**\n\n" if title else "") + "\n".join(lines)


def write_json(name: str, data: dict, out: str | Path | None = None) -> Path:
    path = Path(out) if out else OUT_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def header(data: dict) -> str:
    m = data["machine"]
    busy = m["other_busy_processes"]
    note = f"; OTHER BUSY PROCESSES: {len(busy)}" if busy else ""
    return (f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, avx512_bf16="
            f"{m['avx512_bf16']}, torch {m['torch']}, load {m['load_average']}{note}\ncommand: {data['command']}")


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process (or of its finished children), in MiB (Linux: KiB)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


class RssSampler:
    """Samples this process's resident memory every `interval` s (peak over a block of code)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def current_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current_mb())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.current_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current_mb())


def finish(name: str, data: dict, text: str, out: str | Path | None = None) -> int:
    """Store the printed table in the JSON, write it, print machine + table + path; exit code 0."""
    data["table"] = text
    path = write_json(name, data, out)
    print(header(data) + "\n\n" + text + f"\n\nwritten: {path}")
    return 0
