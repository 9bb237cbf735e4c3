"""Stage 3: what each context did to each answer, as a gain and a label.

A context with a program check (`check:` in its file, or `judge.kind: program` for all) is judged
by the program: gain = check(answer with the context) - check(answer without). Otherwise the model
judges the pair, twice with the positions swapped: gain +1 when the context's answer wins both
orders, -1 when it loses both, else 0. Label 1 (distill) only for a positive gain. The model judge
is first checked (and its position bias calibrated) on pairs with a known right answer; the result
is kept in `judge_check.json` so a resumed run labels with the same calibration.
"""

from __future__ import annotations

import json
import logging

from prism.io import append_jsonl, atomic_write_json, read_jsonl
from prism.judging import Judge, SanityCheck, build_pairwise_judge, check_judge, mismatched_pairs
from prism.judging.verifiers import load_check
from prism.records import GENERAL, AnswerRecord, VerdictRecord, both_orders_label
from prism.stages.context import StageContext

log = logging.getLogger(__name__)


def _judge_check(ctx: StageContext, judge: Judge, answers: list[AnswerRecord]) -> SanityCheck | None:
    path = ctx.run.judge_check
    if path.is_file():
        saved = SanityCheck.from_dict(json.loads(path.read_text()))
        if saved.judge == judge.name:
            judge.bias = saved.position_bias  # a resumed run labels with the same calibration
            return saved
    n = ctx.config.judge.sanity_pairs
    triples = mismatched_pairs([(a.query, a.answer_base, a.persona) for a in answers], n, ctx.config.seed)
    if not triples:
        return None
    bar = ctx.progress(total=2 * len(triples), desc="stage 3/5 judge check")
    check = check_judge(judge, triples, progress=bar)
    bar.close()
    atomic_write_json(path, check.to_dict())
    return check


def warn_if_chance(check: SanityCheck | None, where: str = "stage 3") -> None:
    if check is None or check.passed:
        return
    log.warning(
        "\n%s\n%s: JUDGE IS NO BETTER THAN CHANCE: the %s judge preferred the answer to the query over an "
        "answer to another query in %.0f%% of %d judgments (95%% CI %.2f-%.2f). Its labels are noise; "
        "use another judge (judge.kind / judge.model).\n%s",
        "!" * 78, where, check.judge, 100 * check.accuracy, 2 * check.pairs, *check.ci95, "!" * 78,
    )


def serves(ctx: StageContext, answer: AnswerRecord) -> bool:
    """Is the query one the applied context is for (its own, or its group's)?"""
    if answer.origin == answer.persona:
        return True
    if answer.origin == GENERAL:
        return False
    return ctx.persona_by_name(answer.origin).group == ctx.persona_by_name(answer.persona).group


def _program_verdict(ctx: StageContext, a: AnswerRecord, spec: str) -> dict:
    check, context = load_check(spec), ctx.persona_by_name(a.persona)
    own = serves(ctx, a)
    gain = check(a.answer_persona, a.query, context, own) - check(a.answer_base, a.query, context, own)
    first, second = ("A", "B") if gain > 0 else ("B", "A") if gain < 0 else ("TIE", "TIE")
    return VerdictRecord(query_id=a.query_id, persona=a.persona, judge=f"program:{spec}", persona_first=first,
                         persona_second=second, score_persona_first=round(gain, 5),
                         score_persona_second=round(-gain, 5), label=int(gain > 0), source=a.origin,
                         gain=round(gain, 5)).to_dict()


def run_verdicts(ctx: StageContext) -> dict:
    answers = [AnswerRecord.from_dict(r) for r in read_jsonl(ctx.run.answers)]
    j = ctx.config.judge
    checks = {p.name: p.check or (j.program if j.kind == "program" else None) for p in ctx.personas}
    path = ctx.run.verdicts
    done = {(r["query_id"], r["persona"]) for r in read_jsonl(path)}
    todo = [a for a in answers if (a.query_id, a.persona) not in done]
    append_jsonl(path, [_program_verdict(ctx, a, checks[a.persona]) for a in todo if checks.get(a.persona)])
    judged = [a for a in answers if not checks.get(a.persona)]
    check = None
    if judged:
        judge = build_pairwise_judge(j, ctx.model)
        check = _judge_check(ctx, judge, judged)
        warn_if_chance(check)
        todo = [a for a in todo if not checks.get(a.persona)]
        bar = ctx.progress(total=2 * len(todo), desc="stage 3/5 verdicts")
        chunk = max(1, ctx.model.work_chunk)
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            first = judge.prefer_a([(a.query, a.answer_persona, a.answer_base) for a in part], progress=bar)
            second = judge.prefer_a([(a.query, a.answer_base, a.answer_persona) for a in part], progress=bar)
            rows = []
            for a, s1, s2 in zip(part, first, second):
                v1, v2 = judge.letter(s1), judge.letter(s2)
                label = both_orders_label(v1, v2)
                rows.append(VerdictRecord(
                    query_id=a.query_id, persona=a.persona, judge=judge.name, persona_first=v1, persona_second=v2,
                    score_persona_first=round(s1 - judge.bias, 5), score_persona_second=round(s2 - judge.bias, 5),
                    label=label, source=a.origin, gain=float(label - (v1 == "B" and v2 == "A")),
                ).to_dict())
            append_jsonl(path, rows)
        bar.close()
    return summarise_verdicts([VerdictRecord.from_dict(r) for r in read_jsonl(path)], check)


def summarise_verdicts(rows: list[VerdictRecord], check: SanityCheck | None) -> dict:
    n = len(rows)
    distill = sum(r.label for r in rows)
    per_persona: dict[str, dict[str, int]] = {}
    for r in rows:
        d = per_persona.setdefault(r.persona, {"distill": 0, "retain": 0})
        d["distill" if r.label else "retain"] += 1
    return {
        "count": n,
        "distill": distill,
        "retain": n - distill,
        "distill_share": round(distill / n, 4) if n else None,
        "mean_gain": round(sum(r.value for r in rows) / n, 4) if n else None,
        "position_consistency": round(sum(r.consistent for r in rows) / n, 4) if n else None,
        "per_persona": per_persona,
        "judge_check": check.to_dict() if check else None,
    }
