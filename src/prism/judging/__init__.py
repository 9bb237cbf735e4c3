"""Judges of every kind, built from settings in one place: pairwise (stage 3), rating (MT-Bench),
refusal, program verifiers; every model judge reports the same sanity check (`sanity.py`)."""

from __future__ import annotations

from prism.judging.pairwise import Judge, check_judge, make_pairwise_judge
from prism.judging.sanity import SanityCheck, mismatched_pairs, wilson

__all__ = ["Judge", "SanityCheck", "check_judge", "mismatched_pairs", "wilson", "build_pairwise_judge",
           "build_rating_judge"]


def _load_like(model, name: str):
    """Another model as the judge, loaded in the precision and on the device of `model`."""
    from prism.model import load_model

    return load_model(name, dtype=model.dtype_name, device=model.device.type, batch_size=model.batch_size)


def build_pairwise_judge(cfg, model) -> Judge:
    """The stage-3 judge a `JudgeConfig` names: `model` itself, or `judge.model`."""
    if cfg.model:
        model = _load_like(model, cfg.model)
    kind = "likelihood" if cfg.kind == "program" else cfg.kind  # contexts without a check fall back to it
    return make_pairwise_judge(kind, model, margin=cfg.margin, max_new_tokens=cfg.max_new_tokens)


def build_rating_judge(cfg, model, prompts: dict[str, dict]):
    """The MT-Bench grader a `RatingJudgeConfig` names: an endpoint, another model, or `model` itself.
    `prompts` are MT-Bench's judge prompts by name."""
    from prism.judging.rating import HttpRatingJudge, ModelRatingJudge

    if cfg.url:
        return HttpRatingJudge(cfg.url, cfg.served_model, prompts, cfg.key_env)
    if cfg.model == "self":
        return ModelRatingJudge(model, prompts, label=f"self ({model.name})")
    return ModelRatingJudge(_load_like(model, cfg.model), prompts)
