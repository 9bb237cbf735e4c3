"""Runs the PRISM stages in order inside a run directory, skipping finished work."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

from prism.config import STAGES, PrismConfig
from prism.errors import PersonaError, RunError
from prism.model import ChatModel, load_model_for
from prism.model.engines import bulk_generation
from prism.contexts import ContextRegistry
from prism.run import RunDir, world_size
from prism.stages.answers import run_answers
from prism.stages.context import StageContext
from prism.stages.distill import run_distill
from prism.stages.gate import run_gate
from prism.stages.queries import run_queries
from prism.stages.verdicts import run_verdicts

log = logging.getLogger(__name__)

STAGE_FUNCS: dict[str, Callable[[StageContext], dict]] = {
    "queries": run_queries,
    "answers": run_answers,
    "verdicts": run_verdicts,
    "gate": run_gate,
    "distill": run_distill,
}
GENERATING = ("queries", "answers", "verdicts")  # the stages that generate text (on any engine)


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
    registry = ContextRegistry.load(config.persona_dir)
    personas = registry.select(config.personas)
    texts = {p.name: p.text(config.persona_length) for p in personas}
    run = RunDir(out)
    with run.lock():
        if run.exists or run.outputs():  # an existing run is checked before the model loads
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
            model = load_model_for(config)
        check_context_fits(model, config, texts)
        run.open(config, texts)  # a new run's manifest is written once its personas are known to fit
        run.record_model(model.source, model.supports_system_role, config.placement)
        _run_stages(run, config, model, personas, pending, quiet)
    return run


def check_context_fits(model: ChatModel, config: PrismConfig, texts: dict[str, str]) -> None:
    """Every persona prompt must leave room in the model's context for a query and an answer."""
    for name, text in texts.items():
        prompt = len(model.token_ids(model.user_prompt("", text, config.placement)))
        need = prompt + config.queries.max_new_tokens + config.answers.max_new_tokens
        if need > model.context_length:
            raise PersonaError(f"persona {name!r} ({config.persona_length}) takes {prompt} tokens; with a query of "
                               f"{config.queries.max_new_tokens} and an answer of {config.answers.max_new_tokens} "
                               f"tokens that is {need}, more than the {model.context_length} tokens the model "
                               "attends over: shorten it or pick another --length")


def _run_stages(run: RunDir, config: PrismConfig, model: ChatModel, personas, pending: list[str], quiet: bool) -> None:
    # Stages 1-3 generate on the configured engine; with vLLM, stage 5's teacher pass runs there too.
    teacher_on_engine = "distill" in pending and config.engine == "vllm" and not config.generator_url \
        and world_size() == 1
    on_engine = [s for s in pending if s in GENERATING or (s == "distill" and teacher_on_engine)]
    saved_prefix_cache = model.prefix_cache
    model.prefix_cache = config.prefix_cache
    try:
        with bulk_generation(config, model) if on_engine else nullcontext(model) as generator:
            teacher = getattr(getattr(generator, "generator", None), "teacher_topk", None)
            for stage in pending:
                ctx = StageContext(config=config, model=generator if stage in GENERATING else model,
                                   personas=personas, run=run, quiet=quiet,
                                   teacher=teacher if stage == "distill" else None)
                _run_stage(run, ctx, model, stage)
    finally:
        model.prefix_cache = saved_prefix_cache


def _run_stage(run: RunDir, ctx: StageContext, local: ChatModel, stage: str) -> None:
    model, config = ctx.model, ctx.config
    log.info("stage %s ...", stage)
    run.stage_started(stage)
    t0, tok0 = time.perf_counter(), model.tokens_generated
    try:
        if stage in GENERATING:  # stage 5 casts for its teacher logits only
            with local.inference_dtype(config.infer_dtype):
                facts = STAGE_FUNCS[stage](ctx)
        else:
            facts = STAGE_FUNCS[stage](ctx)
    finally:
        run.add_time(stage, time.perf_counter() - t0)
    facts["tokens_generated"] = run.manifest["stages"][stage].get("tokens_generated", 0) + (
        model.tokens_generated - tok0)
    if stage in GENERATING:  # which engine generated (a resumed stage: the last)
        engine = getattr(getattr(model, "generator", None), "engine", "torch")
        facts["engine"] = engine
        if stage == "verdicts":  # where the model judge's log-probabilities came from
            facts["scored_on"] = engine if getattr(model, "score_on_generator", False) else "torch"
    run.stage_done(stage, **facts)
    log.info("stage %s done in %.1fs: %s", stage, run.manifest["stages"][stage]["seconds"],
             {k: v for k, v in facts.items() if not isinstance(v, dict)})
