"""Scoring (stage 3's likelihood judge) on torch and on vLLM, the same pieces each time.

    python benchmarks/scoring_engines.py [--repeats 3]

The pieces are the likelihood judge's: each MT-Bench question turn with its reference answer, and
each answer after an empty user turn (60 + 60 pieces, ../shared/benchmarks). Timed: torch
`ChatModel.score_tokens` in float32 and bfloat16 (batch 16) and the vllm engine's `score_tokens`
(vLLM's prompt log-probabilities, bfloat16, all requests in flight; its start-up reported apart).
Median of the repeats, ratios against torch float32 in the same process. Needs PRISM_VLLM_PYTHON
for the vllm row. Writes benchmarks/results/scoring_engines.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, finish, machine, median, table  # noqa: E402


def pieces_of(model, folder: Path) -> list[tuple[list[int], list[int]]]:
    questions = {r["question_id"]: r["turns"] for r in map(json.loads, (folder / "mt_bench_questions.jsonl").open())}
    out = []
    for row in map(json.loads, (folder / "mt_bench_reference_answers_gpt4.jsonl").open()):
        for q, a in zip(questions[row["question_id"]], row["choices"][0]["turns"]):
            answer = model.token_ids(a)[:512]
            out += [(model.token_ids(model.user_prompt(q)), answer), (model.token_ids(model.user_prompt("")), answer)]
    return out


def main() -> int:
    from prism.bench.data import default_dir
    from prism.model import load_model
    from prism.model.vllm import VllmEngine, unavailable

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="JSON results (default benchmarks/results/scoring_engines.json)")
    args = ap.parse_args()
    model = load_model("embedded", batch_size=16)
    pieces = pieces_of(model, default_dir())
    data = {"machine": machine(), "command": command(), "pieces": len(pieces),
            "tokens": sum(len(c) + len(t) for c, t in pieces), "scored_tokens": sum(len(t) for _, t in pieces),
            "seconds": {}}

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(median(times), 2)

    reference = model.score_tokens(pieces)
    for dtype in ("float32", "bfloat16"):
        with model.inference_dtype(dtype):
            data["seconds"][f"torch {dtype}"] = timed(lambda: model.score_tokens(pieces))
    if problem := unavailable():
        data["vllm_error"] = problem
    else:
        t0 = time.perf_counter()
        engine = VllmEngine.for_model("embedded", args=["--enforce-eager"])
        data["vllm_startup_s"] = round(time.perf_counter() - t0, 1)
        try:
            engine.score_tokens(pieces[:4])  # first requests pay one-off costs
            data["seconds"]["vllm bfloat16"] = timed(lambda: engine.score_tokens(pieces))
            got = engine.score_tokens(pieces)
        finally:
            engine.close()
        gaps = [abs(a - b) for g, w in zip(got, reference) for a, b in zip(g.logprobs, w.logprobs)]
        data["vllm_mean_logprob_gap"] = round(sum(gaps) / len(gaps), 4)
    base = data["seconds"]["torch float32"]
    rows = [[name, s, round(data["scored_tokens"] / s), round(s / base, 2)] for name, s in data["seconds"].items()]
    text = table(["scorer", "seconds", "scored tok/s", "/ torch float32"], rows,
                 title=f"scoring {len(pieces)} pieces ({data['tokens']} tokens, {data['scored_tokens']} scored)")
    if "vllm_startup_s" in data:
        text += (f"\n\nvLLM start-up {data['vllm_startup_s']} s (--enforce-eager); mean |log p| gap to torch float32 "
                 f"{data['vllm_mean_logprob_gap']}")
    return finish("scoring_engines", data, text, args.out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
