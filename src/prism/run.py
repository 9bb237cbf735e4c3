"""The run directory: stage outputs, the manifest that explains the run, and resume logic."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

from prism.config import STAGES, PrismConfig
from prism.io import atomic_write_json

MANIFEST = "manifest.json"
FILES = {"queries": "queries.jsonl", "answers": "answers.jsonl", "verdicts": "verdicts.jsonl"}
# Settings that change speed, not results: a run may resume with different values.
RUNTIME_KEYS = ("batch_size", "device", "prefix_cache", "generator_url", "generator_model", "generator_concurrency")


class RunError(RuntimeError):
    """The run directory cannot be used as asked."""


def world_size() -> int:
    """Processes started by `accelerate launch` / torchrun (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("prism-persona", "torch", "transformers", "peft", "gguf", "safetensors", "accelerate"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def results_fingerprint(config: PrismConfig) -> dict[str, Any]:
    data = config.to_dict()
    for key in RUNTIME_KEYS:
        data.pop(key, None)
    return data


class RunDir:
    """A run directory. The manifest is rewritten atomically after every change."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest_path = self.path / MANIFEST
        self.manifest: dict[str, Any] = {}
        if self.manifest_path.is_file():
            try:
                self.manifest = json.loads(self.manifest_path.read_text())
            except json.JSONDecodeError as e:
                raise RunError(f"{self.manifest_path} is not valid JSON ({e})") from None

    def file(self, stage: str) -> Path:
        return self.path / FILES[stage]

    @property
    def exists(self) -> bool:
        return bool(self.manifest)

    def config(self) -> PrismConfig:
        if not self.exists:
            raise RunError(f"{self.path} is not a PRISM run directory (no {MANIFEST})")
        return PrismConfig(**self.manifest["config"])

    def open(self, config: PrismConfig, personas: dict[str, dict]) -> None:
        """Create the manifest, or check that an existing run was made with the same settings."""
        if self.exists:
            old = results_fingerprint(PrismConfig(**self.manifest["config"]))
            new = results_fingerprint(config)
            diffs = _diff(old, new)
            if diffs:
                raise RunError(
                    f"{self.path} was started with different settings ({'; '.join(diffs[:6])}); "
                    "resume it with the same settings or choose a new --out"
                )
            old_p = self.manifest.get("personas", {})
            if old_p != personas:
                changed = sorted(n for n in set(old_p) | set(personas) if old_p.get(n) != personas.get(n))
                raise RunError(f"{self.path}: the persona texts changed since the run started ({changed[:5]})")
            if self.manifest["config"] != config.to_dict():  # runtime keys may change
                self.manifest["config"] = config.to_dict()
                self.save()
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest = {
            "prism_run": 1,
            "created": _now(),
            "config": config.to_dict(),
            "personas": personas,
            "model": None,
            "versions": package_versions(),
            "stages": {s: {"status": "pending"} for s in STAGES},
        }
        self.save()

    def save(self) -> None:
        if not is_main_process():  # under `accelerate launch`, rank 0 alone writes the manifest
            return
        atomic_write_json(self.manifest_path, self.manifest)

    def status(self, stage: str) -> str:
        return self.manifest.get("stages", {}).get(stage, {}).get("status", "pending")

    def stage_started(self, stage: str) -> None:
        info = self.manifest["stages"].setdefault(stage, {})
        info["status"] = "running"
        info.setdefault("started", _now())
        self.save()

    def stage_done(self, stage: str, **facts: Any) -> None:
        info = self.manifest["stages"].setdefault(stage, {})
        info.update(status="done", finished=_now(), **facts)
        self.save()

    def add_time(self, stage: str, seconds: float) -> None:
        """Wall time accumulates over resumed invocations of a stage."""
        info = self.manifest["stages"].setdefault(stage, {})
        info["seconds"] = round(info.get("seconds", 0.0) + seconds, 2)
        self.save()


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
