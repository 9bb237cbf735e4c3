"""Stage 4: train the gate (see prism.gate) and choose its decision rule.

Rows are the queries of stage 1. The gate's input is the hidden state after decoder layer 0 for
the query alone, exactly what the routed model computes at inference. Classes: "base", then one
per adapter group (`adapters: shared`: one, "adapter"). Each row's utility for a class is the gain
stage 3 measured for that class's context on the query (0 where none was measured) minus
`gate.switch_cost` (`gate.unserved_cost` for a context of scope `own` on a query it does not
serve); base is 0. Training labels are the verdicts (the class whose context won, else
base) or the source (the class of the context that wrote the query; general queries: base). With
`pooling: auto` every pooling (prism.model.batching.POOLINGS) is tried and the one with the best
cross-validated utility kept.
"""

from __future__ import annotations

import logging

import torch

from prism.gate import BASE, Gate, fit_gate, gate_summary
from prism.io import read_jsonl
from prism.model.batching import POOLINGS
from prism.records import GENERAL, SHARED, QueryRecord, VerdictRecord
from prism.stages.context import StageContext

log = logging.getLogger(__name__)


def route_classes(ctx: StageContext) -> tuple[list[str], dict[str, str]]:
    """The gate's classes and each context's class (its group; everything in `shared` mode)."""
    if ctx.config.adapters == "shared":
        return [BASE, SHARED], {p.name: SHARED for p in ctx.personas}
    groups = list(dict.fromkeys(p.group for p in ctx.personas))
    return [BASE, *groups], {p.name: p.group for p in ctx.personas}


def gate_data(ctx: StageContext) -> tuple[list[QueryRecord], list[int], torch.Tensor, list[str]]:
    """Queries, training labels, the utility matrix (queries x classes) and the class names."""
    classes, class_of = route_classes(ctx)
    queries = [QueryRecord.from_dict(r) for r in read_jsonl(ctx.run.queries)]
    gains: dict[tuple[str, str], list[float]] = {}
    for r in read_jsonl(ctx.run.verdicts):
        v = VerdictRecord.from_dict(r)
        c = class_of.get(v.persona)
        if c is None or (class_of.get(v.origin) == c and v.persona != v.origin):
            continue  # for a query of this class, only the context that wrote it speaks for the class
        gains.setdefault((v.query_id, c), []).append(v.value)
    gcfg = ctx.config.gate
    broad = {c for p in ctx.personas for c in [class_of[p.name]] if p.scope == "all"}
    utility = torch.zeros(len(queries), len(classes))
    for i, q in enumerate(queries):
        for k, c in enumerate(classes[1:], start=1):
            g = gains.get((q.id, c))
            served = class_of.get(q.persona) == c or c in broad
            utility[i, k] = (sum(g) / len(g) if g else 0.0) - (gcfg.switch_cost if served else gcfg.unserved_cost)
    labels = []
    for i, q in enumerate(queries):
        if ctx.config.gate.labels == "source":
            labels.append(classes.index(class_of[q.persona]) if q.persona in class_of else 0)
        else:
            best = int(utility[i].argmax())
            labels.append(best if utility[i, best] > 0 else 0)
    return queries, labels, utility, classes


def run_gate(ctx: StageContext) -> dict:
    cfg = ctx.config.gate
    queries, labels, utility, classes = gate_data(ctx)
    class_of = route_classes(ctx)[1]
    prompts = [ctx.model.user_prompt(q.text) for q in queries]
    poolings = list(POOLINGS) if cfg.pooling == "auto" else [cfg.pooling]
    candidates: dict[str, Gate] = {}
    for pooling in poolings:
        bar = ctx.progress(total=len(prompts), desc=f"stage 4/5 gate features ({pooling})")
        feats = ctx.model.layer1_states(prompts, pooling=pooling, progress=bar)
        bar.close()
        candidates[pooling] = fit_gate(
            feats, labels, utility, classes, hidden=cfg.hidden, dropout=cfg.dropout, pooling=pooling, folds=cfg.folds,
            min_examples=cfg.min_examples, seed=ctx.config.seed, lr=cfg.lr, weight_decay=cfg.weight_decay,
            max_epochs=cfg.max_epochs, patience=cfg.patience, holdout=cfg.holdout, l2=cfg.l2)
    best = max(candidates, key=lambda p: candidates[p].spec.metrics.get("cv_utility", {}).get("gate", -1e9))
    gate = candidates[best]
    gate.spec.members = {c: [p.name for p in ctx.personas if class_of[p.name] == c] if ctx.config.adapters == "per_context"
                         else [SHARED] for c in classes[1:]}
    if len(candidates) > 1:
        gate.spec.metrics["pooling_compared"] = {p: g.spec.metrics.get("cv_utility") for p, g in candidates.items()}
    gate.save(ctx.run.gate_dir)
    log.info("gate (%s pooling): %s", best, gate_summary(gate))
    if gate.spec.constant is not None:
        log.warning("stage 4: the gate did not beat the best constant rule; the run routes every prompt to %r",
                    gate.spec.constant)
    sources = {q.persona for q in queries}
    return {"count": len(queries), "classes": classes, "labels": cfg.labels, "pooling": best,
            "rule": "constant" if gate.spec.constant is not None else "gate", "constant": gate.spec.constant,
            "general_queries": sum(q.persona == GENERAL for q in queries), "sources": len(sources),
            "metrics": gate.spec.metrics}
