"""Stage 2: every query answered by the same model without a context and with one: its own
context, and with `answers.cross` also every context of scope `all` (so stage 4 learns what such
a context does beyond its own queries). With `answers.samples` > 1 a context with a program check answers
its own queries several times and the best-checked answer is kept."""

from __future__ import annotations

from prism.io import append_jsonl, read_jsonl
from prism.judging.verifiers import load_check
from prism.records import AnswerRecord, QueryRecord
from prism.stages.context import StageContext


def best_of(ctx: StageContext, q: QueryRecord, name: str, gens: list):
    """The answer of `name` to its own query that its program check scores highest (the first on ties)."""
    context = ctx.persona_by_name(name)
    check = load_check(context.check)
    return max(gens, key=lambda g: check(g.text, q.text, context, True))


def run_answers(ctx: StageContext) -> dict:
    cfg = ctx.config.answers
    queries = [QueryRecord.from_dict(r) for r in read_jsonl(ctx.run.queries)]
    names = [p.name for p in ctx.personas]
    # Cross answers only where they can matter: a context of scope `own` costs its full price on
    # queries it does not serve whatever it answers (stage 4).
    broad = [p.name for p in ctx.personas if p.scope == "all"] if cfg.cross else []
    pairs = [(q, name) for q in queries
             for name in ([q.persona] if q.persona in names else []) + [n for n in broad if n != q.persona]]
    path = ctx.run.answers
    rows = read_jsonl(path)
    done = {(r["query_id"], r["persona"]) for r in rows}
    base_of = {r["query_id"]: (r["answer_base"], r["tokens_base"]) for r in rows}  # one base answer per query
    todo = [(q, name) for q, name in pairs if (q.id, name) not in done]
    bar = ctx.progress(total=len(todo), desc="stage 2/5 answers")
    chunk = max(1, ctx.model.work_chunk)  # progress is saved per chunk
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        need_base = list({q.id: q for q, _ in part if q.id not in base_of}.values())
        base_prompts = [ctx.model.user_prompt(q.text) for q in need_base]
        # Several samples only where a program can pick the best: a context's own queries.
        counts = [cfg.samples if cfg.samples > 1 and name == q.persona and ctx.persona_by_name(name).check else 1
                  for q, name in part]
        context_prompts = [ctx.model.user_prompt(q.text, ctx.persona_text(ctx.persona_by_name(name)),
                                                 ctx.config.placement)
                           for (q, name), n in zip(part, counts) for _ in range(n)]
        seed = ctx.config.seed * 100_003 + 7_919 + (len(done) + start) * 1_000  # disjoint per chunk
        gens = ctx.model.generate(base_prompts + context_prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                  seed=seed)
        for q, g in zip(need_base, gens):
            base_of[q.id] = (g.text, g.n_tokens)
        picked, at = [], len(need_base)
        for (q, name), n in zip(part, counts):
            picked.append(gens[at] if n == 1 else best_of(ctx, q, name, gens[at : at + n]))
            at += n
        new = [AnswerRecord(query_id=q.id, persona=name, query=q.text, answer_base=base_of[q.id][0],
                            answer_persona=g.text, tokens_base=base_of[q.id][1], tokens_persona=g.n_tokens,
                            source=q.persona).to_dict()
               for (q, name), g in zip(part, picked)]
        append_jsonl(path, new)
        bar.update(len(part))
    bar.close()
    all_rows = read_jsonl(path)
    return {
        "count": len(all_rows),
        "tokens_base": sum(tokens for _, tokens in base_of.values()),
        "tokens_persona": sum(r["tokens_persona"] for r in all_rows),
    }
