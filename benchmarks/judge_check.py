"""Compare the self-judges on one run's answers: how often does each prefer the answer to the
query over an answer to a different query (both orders), and how position-consistent is it?

    python benchmarks/judge_check.py RUN_DIR [--pairs 48] [--kinds prompted,generate,likelihood]
"""

import argparse
import json
import time

from prism.io import read_jsonl
from prism.judging import check_judge, mismatched_pairs
from prism.judging.pairwise import make_pairwise_judge as make_judge
from prism.model import load_model_for as model_from_config
from prism.run import RunDir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--kinds", default="prompted,generate,likelihood")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    run = RunDir(args.run_dir)
    model = model_from_config(run.config())
    answers = read_jsonl(run.answers)
    triples = mismatched_pairs([(a["query"], a["answer_base"], a["persona"]) for a in answers], args.pairs, args.seed)
    print(f"{len(triples)} pairs x 2 orders from {args.run_dir} on {model.name}")
    print(f"{'judge':<12} {'accuracy':>8} {'95% CI':>13} {'consistency':>11} {'bias':>8} {'seconds':>8}")
    results = {}
    for kind in args.kinds.split(","):
        judge = make_judge(kind, model)
        t0 = time.perf_counter()
        c = check_judge(judge, triples)
        dt = time.perf_counter() - t0
        results[kind] = {**c.to_dict(), "seconds": round(dt, 1)}
        print(f"{kind:<12} {c.accuracy:>8.3f} {c.ci95[0]:>6.2f}-{c.ci95[1]:<6.2f} {c.consistency:>11.3f} "
              f"{c.position_bias:>8.3f} {dt:>8.1f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
