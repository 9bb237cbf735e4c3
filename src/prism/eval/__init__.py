"""`prism eval`: base / expert prompting / ungated adapter / PRISM on MT-Bench, MMLU, safety
refusal and XSTest, with bootstrap CIs (see evaluator.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prism.config import EvalConfig, load_eval_config


def run_eval(out: str | Path | None = None, run_dir: str | Path | None = None, model: str | None = None,
             preset: str | None = None, config_file: str | Path | None = None,
             overrides: dict[str, Any] | None = None, quiet: bool = False, chat_model=None,
             settings: EvalConfig | None = None, engine=None) -> dict:
    """Evaluate the systems of a finished run (or only base/persona of `model`) into `out`
    (default: RUN_DIR/eval). Settings: preset -> config file -> overrides, or `settings`.
    Replies are generated on `engine` (a running LlamaCppEngine or VllmEngine with the run's model
    and adapters), else on the engine the settings name (started here, stopped afterwards)."""
    from prism.bench.data import default_dir
    from prism.eval.evaluator import Evaluator
    from prism.eval.systems import Systems
    from prism.contexts import ContextRegistry

    s = settings or load_eval_config(preset, config_file, overrides)
    if run_dir is None and model is None and chat_model is None:
        raise ValueError("give a run directory, or --model for base/persona rows only")
    if run_dir is None and out is None:
        raise ValueError("--out is needed when no run directory is given")
    data_dir = str(s.data or default_dir())
    if s.suite == "paper":
        check_data(data_dir, s)  # a missing or malformed file fails now, not after the model loaded
    prism = None
    if run_dir is not None:
        from prism.routed import PrismModel
        from prism.run import RunDir

        run = RunDir(run_dir).require("gate", "distill")
        cfg = run.config()
        prism = PrismModel.load(run.path, model=chat_model)
        chat = prism.model
        registry = ContextRegistry.load(cfg.persona_dir)
        fingerprint = {"run": str(run.path.resolve()), "run_created": run.manifest.get("created"),
                       "model": run.manifest.get("model")}
        s = s.model_copy(update={"persona_length": s.persona_length or cfg.persona_length,
                                 "placement": s.placement or cfg.placement})
        out = out if out is not None else run.eval_dir
    else:
        from prism.model import load_model

        chat = chat_model or load_model(model)
        registry = ContextRegistry.builtin()
        fingerprint = {"model": chat.source}
        s = s.model_copy(update={"systems": tuple(x for x in s.systems if x in ("base", "persona")),
                                 "persona_length": s.persona_length or "long",
                                 "placement": s.placement or "system"})
    if s.suite == "contexts":
        from prism.eval.contexts import ContextSuite

        if prism is None:
            raise ValueError("the context suite needs a run directory (`prism eval RUN --suite contexts`)")
        return ContextSuite(prism, registry, list(run.manifest["personas"]), out, data_dir, s.suite_max_new_tokens,
                            s.suite_mtbench, s.seed, s.n_boot, quiet, s.suite_limit).run()
    systems = Systems(chat, prism, registry, s.persona_map, s.persona_length, s.placement)
    own = None
    if engine is None and prism is not None:
        from prism.routed import run_on_engine

        engine = own = run_on_engine(run, s.engine, chat, s.gguf, s.vllm_args)
    if engine is not None:
        fingerprint["engine"] = engine.engine
    try:
        return Evaluator(systems, s, data_dir, out, quiet=quiet, engine=engine).run(fingerprint)
    finally:
        if own is not None:
            own.close()


def check_data(data_dir: str, s: EvalConfig) -> None:
    """Read every benchmark file the evaluation will use (a DataError names the file and line)."""
    from prism.bench import data as D

    for bench in s.benchmarks:
        if bench == "mtbench":
            D.load_mt_bench(data_dir)
            D.load_judge_prompts(data_dir)
        elif bench == "mmlu":
            D.load_mmlu(data_dir, split="test")
            if s.mmlu_shots:
                D.load_mmlu(data_dir, split="dev")
        elif bench == "safety":
            D.load_safety(data_dir, {})
        else:
            D.load_xstest(data_dir)


__all__ = ["run_eval", "EvalConfig", "load_eval_config"]
