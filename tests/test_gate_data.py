"""Stage 4's data: the gate's classes, training labels and the utility of each route, from stage 1-3
records (no model needed)."""

from pathlib import Path

import pytest

from prism.config import load_config
from prism.contexts import ContextRegistry
from prism.io import append_jsonl
from prism.records import GENERAL, QueryRecord, VerdictRecord
from prism.run import RunDir
from prism.stages.context import StageContext
from prism.stages.gate import gate_data

FRENCH = Path(__file__).resolve().parents[1] / "examples" / "contexts" / "french.yaml"


def _ctx(tmp_path, adapters="per_context", labels="source"):
    reg = ContextRegistry.load("suite:contexts")
    reg.add_path(FRENCH)
    names = ["memory_maya", "memory_ben", "french"]
    cfg = load_config("quick", overrides={"adapters": adapters, "gate.labels": labels, "personas": names})
    run = RunDir(tmp_path)
    queries = [("maya-1", "memory_maya"), ("ben-1", "memory_ben"), ("fr-1", "french"), ("gen-1", GENERAL)]
    append_jsonl(run.queries, [QueryRecord(q, src, f"question {q}", 5).to_dict() for q, src in queries])
    rows = [("maya-1", "memory_maya", 1.0), ("maya-1", "memory_ben", 1.0),  # ben's memory on maya's question
            ("ben-1", "memory_ben", 0.0), ("fr-1", "french", 1.0), ("gen-1", "french", 1.0),
            ("maya-1", "french", -1.0)]
    append_jsonl(run.verdicts, [VerdictRecord(q, p, "program:x", "A", "B", 1.0, -1.0, int(g > 0), source=src, gain=g)
                                .to_dict() for q, p, g in rows for src in [dict(queries)[q]]])
    return StageContext(cfg, None, reg.select(names), run)


def test_utilities_charge_a_memory_in_full_where_it_does_not_belong(tmp_path):
    queries, labels, u, classes = gate_data(_ctx(tmp_path))
    assert classes == ["base", "memory", "french"]
    ids = [q.id for q in queries]
    row = {q: u[ids.index(q)].tolist() for q in ids}
    # maya's question: her own memory's gain speaks for the class (not ben's, applied to it)
    assert row["maya-1"] == pytest.approx([0.0, 1.0 - 0.05, -1.0 - 0.05])
    assert row["ben-1"] == pytest.approx([0.0, 0.0 - 0.05, 0.0 - 0.05])
    # a general query: a memory (scope own) costs its full price there; French (scope all) helps
    assert row["gen-1"] == pytest.approx([0.0, 0.0 - 1.0, 1.0 - 0.05])
    assert row["fr-1"] == pytest.approx([0.0, -1.0, 0.95])
    assert labels == [1, 1, 2, 0]  # source labels: the class of the context that wrote the query


def test_verdict_labels_pick_the_best_route_where_it_gains(tmp_path):
    queries, labels, _, _ = gate_data(_ctx(tmp_path, labels="verdicts"))
    assert dict(zip([q.id for q in queries], labels)) == {"maya-1": 1, "ben-1": 0, "fr-1": 2, "gen-1": 2}


def test_shared_mode_is_the_papers_binary_gate(tmp_path):
    queries, labels, u, classes = gate_data(_ctx(tmp_path, adapters="shared", labels="verdicts"))
    assert classes == ["base", "adapter"]
    ids = [q.id for q in queries]
    # one adapter for every context: a query's own context speaks for it
    assert u[ids.index("maya-1")].tolist() == pytest.approx([0.0, 0.95])
    assert u[ids.index("ben-1")].tolist() == pytest.approx([0.0, -0.05])
    assert labels == [1, 0, 1, 1]
