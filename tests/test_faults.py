"""`prism run` killed with SIGKILL at 20+ random moments over all five stages, resumed after each
kill: the finished run must be the one an unkilled run writes.

Two chains of kills, each on one run directory; every invocation arms one fault
(tests/fault_child.py) and the next invocation resumes the run:
- the identity chain: kills at random times in every stage (and during start-up), during the
  manifest's atomic replace, other files' replaces (gate, teacher cache, checkpoint), a checkpoint
  swap (between its two renames) and the adapter's, and a torn line in the distillation losses.
  The finished run must equal the shared unkilled run (`micro_run`, the same settings and seed)
  row for row and tensor for tensor; only times and the count of tokens generated (work redone
  after a kill counts again) may differ.
- the torn chain (stages 1-3, two queries per persona): a crash in the middle of a JSONL append
  leaves half a line. The rows of a batch that did reach the disk are kept and the rest is
  sampled anew, so these rows cannot equal an unkilled run's; the finished run must have no torn,
  duplicate or missing row.

The random moments come from PRISM_FAULT_SEED (random when unset; printed on failure).
"""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import MICRO_BATCH
from prism.io import read_jsonl

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fault harness reads /proc")]
HARNESS = str(Path(__file__).with_name("fault_child.py"))
SEED = int(os.environ.get("PRISM_FAULT_SEED") or random.SystemRandom().randrange(10**6))
ARGS = ["run", "--preset", "micro", "--batch-size", str(MICRO_BATCH), "--quiet"]
TIMES = ("seconds", "started", "finished", "tokens_generated")  # may differ after a kill


def identity_plan(rng: random.Random, seconds: dict) -> list[dict]:
    """Faults in stage order; each is reachable whatever the kills before it left done."""
    def at(stage, kind, n=1):
        return {"stage": stage, "at": kind, "n": n}

    def timed(stage):  # a random moment inside the stage, as long as the unkilled run took for it
        return {"stage": stage, "after": round(rng.uniform(0.15, 0.9) * max(seconds[stage], 0.5), 2)}

    plan = [{"stage": "start", "after": round(rng.uniform(1.0, 4.0), 2)}]
    plan += rng.sample([at("queries", "manifest"), timed("queries")], 2)
    plan += rng.sample([at("answers", "manifest", rng.choice([1, 2])), timed("answers")], 2)
    plan += rng.sample([at("verdicts", "manifest", rng.choice([1, 2])), timed("verdicts")], 2)
    plan += rng.sample([at("gate", "replace", rng.choice([1, 2])), at("gate", "manifest", rng.choice([1, 2, 3]))], 2)
    # Stage 5 from scratch first: its 2nd swap is the epoch-2 checkpoint, after epoch 1's exists.
    # Each of the next three leaves epoch 2 to do again (the losses row, a checkpoint file, the
    # checkpoint swap), so all are reached in any order; a random moment may end epoch 2, so it
    # comes after them; the stage's first manifest write is reached whatever is left.
    plan += [at("distill", "swap", 2)]
    plan += rng.sample([at("distill", "torn"), at("distill", "replace"), at("distill", "swap")], 3)
    plan += [timed("distill"), at("distill", "manifest")]
    return plan


def torn_plan(rng: random.Random, seconds: dict) -> list[dict]:
    plan = []
    for stage in ("queries", "answers", "verdicts"):
        plan += [{"stage": stage, "at": "torn", "n": 1},
                 {"stage": stage, "after": round(rng.uniform(0.15, 0.9) * seconds[stage], 2)}]
    return plan


def state(out: Path) -> str:
    """Where a kill left the run: the stage then running (or the first not done)."""
    try:
        stages = json.loads((out / "manifest.json").read_text())["stages"]
    except FileNotFoundError:
        return "no manifest yet"
    return next((s for s, info in stages.items() if info["status"] != "done"), "all done")


def run_chain(out: Path, plan: list[dict], until: list[str]) -> list[dict]:
    """One invocation per fault, then one to finish; returns the kills that happened."""
    kills = []
    for spec in plan:
        proc = subprocess.run([sys.executable, HARNESS, json.dumps(spec), *ARGS, *until, "--out", str(out)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode == -signal.SIGKILL:
            kills.append({**spec, "left": state(out)})
            continue
        assert proc.returncode == 0, f"seed {SEED}, fault {spec}: {proc.stderr[-3000:]}"
        break  # the run finished before this fault's moment came
    proc = subprocess.run([sys.executable, "-m", "prism.cli", *ARGS, *until, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"seed {SEED}, after kills {kills}: {proc.stderr[-3000:]}"
    return kills


def stage_facts(run: Path) -> dict:
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    return {name: {k: v for k, v in info.items() if k not in TIMES} for name, info in stages.items()}


def assert_same_run(run: Path, ref: Path) -> None:
    for name in ("queries.jsonl", "answers.jsonl", "verdicts.jsonl"):
        assert read_jsonl(run / name, repair=False) == read_jsonl(ref / name, repair=False), name
    for name in ("judge_check.json", "gate/gate_config.json", "adapter/adapter_config.json", "distill/summary.json"):
        assert json.loads((run / name).read_text()) == json.loads((ref / name).read_text()), name
    for name in ("gate/gate.safetensors", "adapter/adapter_model.safetensors", "distill/teacher_topk.safetensors"):
        a, b = load_file(str(run / name)), load_file(str(ref / name))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    losses = [[{k: v for k, v in row.items() if k != "seconds"} for row in read_jsonl(r / "distill" / "losses.jsonl",
                                                                                      repair=False)]
              for r in (run, ref)]
    assert losses[0] == losses[1] and [row["epoch"] for row in losses[0]] == [1, 2]
    assert stage_facts(run) == stage_facts(ref)


def assert_whole(run: Path, n_queries: int) -> None:
    """No torn, duplicate or missing row; `n_queries` queries, each answered and judged; the
    manifest agrees."""
    for name in ("queries.jsonl", "answers.jsonl", "verdicts.jsonl"):
        data = (run / name).read_bytes()
        assert data.endswith(b"\n") and all(json.loads(line) for line in data.splitlines()), name
    queries, answers, verdicts = (read_jsonl(run / n) for n in ("queries.jsonl", "answers.jsonl", "verdicts.jsonl"))
    ids = [q["id"] for q in queries]
    assert len(ids) == len(set(ids)) == n_queries
    assert len({q["text"].lower() for q in queries}) == len(ids)
    for rows in (answers, verdicts):
        keys = [(r["query_id"], r["persona"]) for r in rows]
        assert len(keys) == len(set(keys)) and {k for k, _ in keys} == set(ids)
    facts = stage_facts(run)
    assert all(facts[s]["status"] == "done" for s in ("queries", "answers", "verdicts"))
    assert facts["queries"]["count"] == len(ids) and facts["verdicts"]["count"] == len(verdicts)


def test_sigkill_at_random_moments_then_resume(tmp_path, micro_run):
    rng = random.Random(SEED)
    seconds = {s: info["seconds"] for s, info in json.loads((micro_run / "manifest.json").read_text())["stages"].items()}

    identity = run_chain(tmp_path / "identity", identity_plan(rng, seconds), [])
    assert_same_run(tmp_path / "identity", micro_run)

    # Two queries per persona (not micro's three): this chain is compared with no other run.
    torn = run_chain(tmp_path / "torn", torn_plan(rng, seconds), ["--until", "verdicts", "--n", "2"])
    assert_whole(tmp_path / "torn", 2 * len(json.loads((micro_run / "manifest.json").read_text())["personas"]))

    kills = identity + torn
    where = {k["left"] for k in kills}
    print(f"seed {SEED}: {len(kills)} kills, left in {sorted(where)}")
    assert len(kills) >= 20, (SEED, kills)
    assert {"queries", "answers", "verdicts", "gate", "distill"} <= where, (SEED, kills)
    assert any(k.get("at") == "manifest" for k in kills) and any(k.get("at") == "swap" and k["n"] == 2 for k in kills)
    assert any(k.get("at") == "torn" for k in kills)
