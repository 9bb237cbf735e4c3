"""The run directory: every artifact path of a run, the manifest that explains it, resume checks,
and loading a finished run's config and model."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from prism.config import STAGES, PrismConfig
from prism.errors import RunError
from prism.io import LockHeld, atomic_write_json, exclusive_lock
from prism.records import SHARED

# Settings that change speed, not results: a run may resume with different values.
RUNTIME_KEYS = ("batch_size", "device", "prefix_cache", "generator_url", "generator_model", "generator_concurrency",
                "engine", "gguf", "vllm_args")
# The config section each stage alone reads: it may still change while its stage has not begun
# (run --until gate, then distil with other settings or under several processes).
STAGE_SECTIONS = {"queries": "queries", "answers": "answers", "judge": "verdicts", "gate": "gate",
                  "distill": "distill"}


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
    """A run directory. Every artifact's path is named here and nowhere else; the manifest is
    rewritten atomically after every change."""

    MANIFEST = "manifest.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest_path = self.path / self.MANIFEST
        # The artifacts: stage 1-3 records, then stage 4 and 5 folders, then eval's default output.
        self.queries = self.path / "queries.jsonl"
        self.answers = self.path / "answers.jsonl"
        self.verdicts = self.path / "verdicts.jsonl"
        self.judge_check = self.path / "judge_check.json"
        self.gate_dir = self.path / "gate"
        self.eval_dir = self.path / "eval"  # where `prism eval RUN` writes when no --out is given
        self.lock_path = self.path / "run.lock"  # held by the `prism run` writing here
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path} is a file, not a run directory; choose a directory for --out")
        self.manifest: dict[str, Any] = {}
        if self.manifest_path.is_file():
            self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        """The manifest, checked for what every command relies on (it may have been hand-edited)."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{self.manifest_path} is not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise RunError(f"{self.manifest_path} must hold a JSON object, not {type(manifest).__name__}")
        missing = [k for k in ("config", "stages") if not isinstance(manifest.get(k), dict)]
        if missing or not all(isinstance(v, dict) for v in manifest["stages"].values()):
            raise RunError(f"{self.manifest_path} has no valid {' or '.join(missing) or 'stages'}; it was edited or "
                           "written by another program (restore it, or start a new run in another --out)")
        return manifest

    def outputs(self) -> list[str]:
        """The artifacts of a run present here (a run that lost its manifest must not be adopted)."""
        paths = [self.queries, self.answers, self.verdicts, self.judge_check, self.gate_dir,
                 self.adapter_path(), self.path / "adapters", self.distill_path()]
        return [p.name for p in paths if p.exists()]

    @contextmanager
    def lock(self):
        """Only one `prism run` at a time writes a run directory (under `accelerate launch`, rank 0
        holds the lock for all ranks)."""
        if not is_main_process():
            yield
            return
        try:
            with exclusive_lock(self.lock_path, wait=False):
                yield
        except LockHeld as e:
            raise RunError(f"{self.path} is in use by another prism process (pid {e.pid or 'unknown'}); wait for "
                           "it to finish or choose another --out") from None

    def adapter_path(self, name: str = SHARED) -> Path:
        """A LoRA in PEFT format (PeftModel.from_pretrained loads it): `adapter/` for the shared one,
        `adapters/<context>/` for one per context."""
        return self.path / "adapter" if name == SHARED else self.path / "adapters" / name

    def distill_path(self, name: str = SHARED) -> Path:
        """Stage 5's working files of an adapter: teacher cache, checkpoint, losses, summary."""
        return self.path / "distill" if name == SHARED else self.path / "distill" / name

    def finished_adapters(self, add: str | None = None) -> list[str]:
        """The adapters stage 5 has written (runs from before several adapters: the shared one)."""
        done = self.manifest.setdefault("adapters", [SHARED] if self.status("distill") == "done" else [])
        if add is not None and add not in done:
            done.append(add)
            self.save()
        return list(done)

    # ----- state ------------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return bool(self.manifest)

    def config(self) -> PrismConfig:
        if not self.exists:
            raise RunError(f"{self.path} is not a PRISM run directory (no {self.MANIFEST})")
        try:
            return PrismConfig(**self.manifest["config"])
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise RunError(f"{self.manifest_path} holds no valid config ({where}: {err['msg']}); it was edited or "
                           "written by another program") from None

    def require(self, *stages: str) -> "RunDir":
        """Fail with a clear message unless every stage named is done."""
        if not self.exists:
            raise RunError(f"{self.path} is not a PRISM run directory (no {self.MANIFEST})")
        for stage in stages:
            if self.status(stage) != "done":
                raise RunError(f"{self.path}: stage {stage!r} is not finished; run `prism run --out {self.path}` "
                               "first")
        return self

    def load_base_model(self, first_layers: int | None = None, **overrides):
        """The run's base model with the run's settings; `first_layers=1`: only what the gate reads."""
        from prism.model import load_model_for

        return load_model_for(self.config(), first_layers=first_layers, **overrides)

    def open(self, config: PrismConfig, personas: dict[str, dict]) -> None:
        """Create the manifest, or check that an existing run was made with the same settings."""
        if self.exists:
            old = results_fingerprint(self.config())
            new = results_fingerprint(config)
            for section, stage in STAGE_SECTIONS.items():
                if self.status(stage) == "pending":
                    old.pop(section, None), new.pop(section, None)
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
            if self.manifest["config"] != config.to_dict():  # runtime keys and pending stages' sections
                self.manifest["config"] = config.to_dict()
                self.save()
            return
        found = self.outputs()
        if found:
            raise RunError(f"{self.path} holds run outputs ({', '.join(found)}) but no {self.MANIFEST}; they cannot "
                           "be resumed without it: restore the manifest, or choose another --out")
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

    def record_model(self, source: dict, supports_system_role: bool, placement: str) -> None:
        """Which weights the run uses (a resume with other weights is refused) and where the persona
        really goes: a template without a system role turns `system` placement into `user`."""
        old = self.manifest.get("model")
        if old and old != source:  # e.g. a new hub revision, or other local weights
            raise RunError(f"{self.path} was started with model {old}, not {source}; choose a new --out")
        self.manifest["model"] = source
        effective = placement if supports_system_role or placement == "user" else "user"
        self.manifest["placement"] = {"configured": placement, "effective": effective,
                                      "template_has_system_role": supports_system_role}
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
