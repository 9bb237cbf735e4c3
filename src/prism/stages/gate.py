"""Stage 4: train the gate on the verdict labels (1 = the persona helped this query).

The gate's input is the hidden state after decoder layer 0 for the query WITHOUT the persona,
exactly what the routed model computes at inference. With `pooling: auto` both poolings are
trained and the one with the better held-out balanced accuracy is kept.
"""

from __future__ import annotations

import logging

from prism.gate import Gate, train_gate
from prism.io import read_jsonl
from prism.records import AnswerRecord, VerdictRecord
from prism.stages.context import StageContext

log = logging.getLogger(__name__)


def run_gate(ctx: StageContext) -> dict:
    cfg = ctx.config.gate
    verdicts = {r["query_id"]: VerdictRecord.from_dict(r) for r in read_jsonl(ctx.run.verdicts)}
    answers = [AnswerRecord.from_dict(r) for r in read_jsonl(ctx.run.answers)]
    rows = [(a.query, verdicts[a.query_id].label) for a in answers if a.query_id in verdicts]
    prompts = [ctx.model.user_prompt(q) for q, _ in rows]
    labels = [y for _, y in rows]
    poolings = ["mean", "last"] if cfg.pooling == "auto" else [cfg.pooling]
    candidates: dict[str, Gate] = {}
    for pooling in poolings:
        bar = ctx.progress(total=len(prompts), desc=f"stage 4/5 gate features ({pooling})")
        feats = ctx.model.layer1_states(prompts, pooling=pooling, progress=bar)
        bar.close()
        candidates[pooling] = train_gate(
            feats, labels, hidden=cfg.hidden, dropout=cfg.dropout, lr=cfg.lr, weight_decay=cfg.weight_decay,
            max_epochs=cfg.max_epochs, patience=cfg.patience, holdout=cfg.holdout, min_examples=cfg.min_examples,
            pooling=pooling, seed=ctx.config.seed,
        )
    best = max(candidates, key=lambda p: candidates[p].spec.metrics.get("holdout_balanced_accuracy", 0.0))
    gate = candidates[best]
    if len(candidates) > 1:
        gate.spec.metrics["pooling_compared"] = {
            p: g.spec.metrics.get("holdout_balanced_accuracy") for p, g in candidates.items()
        }
    gate.save(ctx.run.gate_dir)
    m = gate.spec.metrics
    if not m.get("constant"):
        log.info("gate (%s pooling): held-out accuracy %.2f (balanced %.2f, majority baseline %.2f), threshold %.3f",
                 best, m["holdout_accuracy"], m["holdout_balanced_accuracy"], m["majority_baseline"],
                 gate.spec.threshold)
    return {"count": len(rows), "pooling": best, "threshold": gate.spec.threshold, "metrics": m}
