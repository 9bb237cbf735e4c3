"""Stage 2: every query answered twice by the same model, without and with its persona."""

from __future__ import annotations

from prism.io import append_jsonl, read_jsonl
from prism.records import AnswerRecord, QueryRecord
from prism.stages.context import StageContext


def run_answers(ctx: StageContext) -> dict:
    cfg = ctx.config.answers
    queries = [QueryRecord.from_dict(r) for r in read_jsonl(ctx.run.queries)]
    path = ctx.run.answers
    done = {r["query_id"] for r in read_jsonl(path)}
    todo = [q for q in queries if q.id not in done]
    bar = ctx.progress(total=len(todo), desc="stage 2/5 answers")
    # Chunks of a few batches: progress is saved per chunk, and a chunk still fills batches.
    chunk = max(1, ctx.model.batch_size * 2)
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        base_prompts = [ctx.model.user_prompt(q.text) for q in part]
        persona_prompts = [
            ctx.model.user_prompt(q.text, ctx.persona_text(ctx.persona_by_name(q.persona)), ctx.config.placement)
            for q in part
        ]
        seed = ctx.config.seed * 100_003 + 7_919 + (len(done) + start) * 1_000  # disjoint per chunk
        gens = ctx.model.generate(base_prompts + persona_prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                  seed=seed)
        base, pers = gens[: len(part)], gens[len(part) :]
        rows = [
            AnswerRecord(query_id=q.id, persona=q.persona, query=q.text, answer_base=b.text,
                         answer_persona=p.text, tokens_base=b.n_tokens, tokens_persona=p.n_tokens).to_dict()
            for q, b, p in zip(part, base, pers)
        ]
        append_jsonl(path, rows)
        bar.update(len(part))
    bar.close()
    all_rows = read_jsonl(path)
    return {
        "count": len(all_rows),
        "tokens_base": sum(r["tokens_base"] for r in all_rows),
        "tokens_persona": sum(r["tokens_persona"] for r in all_rows),
    }
