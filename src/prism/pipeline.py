"""Runs the PRISM stages in order inside a run directory, skipping finished work."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from prism.config import STAGES, PrismConfig
from prism.models import ChatModel, load_model
from prism.personas import PersonaRegistry
from prism.run import RunDir, RunError, world_size
from prism.stages.answers import run_answers
from prism.stages.context import StageContext
from prism.stages.queries import run_queries
from prism.stages.verdicts import run_verdicts

log = logging.getLogger(__name__)

def run_gate(ctx: StageContext) -> dict:
    from prism.stages.gate import run_gate as fn  # training code: imported only when needed

    return fn(ctx)


def run_distill(ctx: StageContext) -> dict:
    from prism.stages.distill import run_distill as fn

    return fn(ctx)


STAGE_FUNCS: dict[str, Callable[[StageContext], dict]] = {
    "queries": run_queries,
    "answers": run_answers,
    "verdicts": run_verdicts,
    "gate": run_gate,
    "distill": run_distill,
}


def model_from_config(config: PrismConfig) -> ChatModel:
    return load_model(
        config.model, revision=config.model_revision, dtype=config.dtype, device=config.device,
        trust_remote_code=config.trust_remote_code, batch_size=config.batch_size,
        prefix_cache=config.prefix_cache,
    )


def run_pipeline(
    config: PrismConfig,
    out: str | Path,
    until: str | None = None,
    quiet: bool = False,
    model: ChatModel | None = None,
) -> RunDir:
    """Run every stage up to `until` (default: the last one) in `out`; resume where it stopped."""
    if until is not None and until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; choose one of {', '.join(STAGES)}")
    until = until or STAGES[-1]
    registry = PersonaRegistry.load(config.persona_dir)
    personas = registry.select(config.personas)
    texts = {p.name: p.text(config.persona_length) for p in personas}
    run = RunDir(out)
    run.open(config, texts)
    wanted = list(STAGES[: STAGES.index(until) + 1])
    pending = [s for s in wanted if run.status(s) != "done"]
    if not pending:
        log.info("%s: every stage up to %s is done; nothing to do", run.path, until)
        return run
    if world_size() > 1 and pending != ["distill"]:
        raise RunError(f"{world_size()} processes can only share stage 5 (distill); run stages 1-4 first with "
                       f"`prism run --until gate --out {run.path}`, then `accelerate launch` the same command")
    if model is None:
        model = model_from_config(config)
    old = run.manifest.get("model")
    if old and old != model.source:  # e.g. a new hub revision, or other local weights
        raise RunError(f"{run.path} was started with model {old}, not {model.source}; choose a new --out")
    run.manifest["model"] = model.source
    run.save()
    if config.generator_url and {"queries", "answers", "verdicts"} & set(pending):
        # stages 1-3 generate on a remote server; judging by scores, the gate and distillation stay local
        from prism.serve.openai_backend import OpenAIGenerator, RemoteGenerationModel

        model = RemoteGenerationModel(model, OpenAIGenerator(
            config.generator_url, config.generator_model, concurrency=config.generator_concurrency))
        log.info("generating on %s (model %s)", config.generator_url, model.generator.model)
    ctx = StageContext(config=config, model=model, personas=personas, run=run, quiet=quiet)
    local = getattr(model, "_local", model)  # the ChatModel behind a remote generator
    saved_prefix_cache = local.prefix_cache
    local.prefix_cache = config.prefix_cache
    try:
        for stage in pending:
            _run_stage(run, ctx, stage)
    finally:
        local.prefix_cache = saved_prefix_cache
    return run


def _run_stage(run: RunDir, ctx: StageContext, stage: str) -> None:
    model, config = ctx.model, ctx.config
    log.info("stage %s ...", stage)
    run.stage_started(stage)
    t0, tok0 = time.perf_counter(), model.tokens_generated
    try:
        if stage in ("queries", "answers", "verdicts"):  # stage 5 casts for its teacher logits only
            with getattr(model, "_local", model).inference_dtype(config.infer_dtype):
                facts = STAGE_FUNCS[stage](ctx)
        else:
            facts = STAGE_FUNCS[stage](ctx)
    finally:
        run.add_time(stage, time.perf_counter() - t0)
    facts["tokens_generated"] = run.manifest["stages"][stage].get("tokens_generated", 0) + (
        model.tokens_generated - tok0)
    run.stage_done(stage, **facts)
    log.info("stage %s done in %.1fs: %s", stage, run.manifest["stages"][stage]["seconds"],
             {k: v for k, v in facts.items() if not isinstance(v, dict)})
