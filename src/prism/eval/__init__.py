"""`prism eval`: base / expert prompting / ungated adapter / PRISM on MT-Bench, MMLU, safety
refusal and XSTest, with bootstrap CIs. See harness.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prism.eval.harness import EVAL_PRESETS, EvalSettings, Evaluator


def run_eval(out: str | Path, run_dir: str | Path | None = None, model: str | None = None,
             preset: str = "quick", quiet: bool = False, chat_model=None, **overrides) -> dict:
    """Evaluate the systems of a finished run (or only base/persona of `model`) into `out`."""
    from prism.eval.data import default_dir
    from prism.eval.systems import Systems
    from prism.personas import PersonaRegistry

    if preset not in EVAL_PRESETS:
        raise ValueError(f"unknown eval preset {preset!r}; choose one of {', '.join(EVAL_PRESETS)}")
    if run_dir is None and model is None and chat_model is None:
        raise ValueError("give a run directory, or --model for base/persona rows only")
    settings = EvalSettings(data_dir=str(overrides.pop("data_dir", None) or default_dir()), **EVAL_PRESETS[preset])
    limits = overrides.pop("limits", None)
    if limits:
        settings.limits = {**settings.limits, **limits}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    prism = None
    if run_dir is not None:
        from prism.routed import PrismModel
        from prism.run import RunDir

        run = RunDir(run_dir)
        cfg = run.config()
        prism = PrismModel.load(run_dir, model=chat_model)
        chat = prism.model
        registry = PersonaRegistry.load(cfg.persona_dir)
        fingerprint = {"run": str(Path(run_dir).resolve()), "run_created": run.manifest.get("created"),
                       "model": run.manifest.get("model")}
        if "persona_length" not in overrides:
            settings = replace(settings, persona_length=cfg.persona_length)
        if "placement" not in overrides:
            settings = replace(settings, placement=cfg.placement)
    else:
        from prism.models import load_model

        chat = chat_model or load_model(model)
        registry = PersonaRegistry.builtin()
        fingerprint = {"model": chat.source}
        wanted = [s for s in settings.systems if s in ("base", "persona")]
        settings = replace(settings, systems=tuple(wanted))
    systems = Systems(chat, prism, registry, settings.persona_map, settings.persona_length, settings.placement)
    missing = [s for s in settings.systems if s not in systems.available]
    if missing:
        raise ValueError(f"systems {missing} need a run directory with an adapter and a gate")
    return Evaluator(systems, settings, out, fingerprint, quiet=quiet).run()


__all__ = ["run_eval", "EvalSettings", "EVAL_PRESETS"]
