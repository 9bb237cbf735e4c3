"""Does self-distillation transfer a context's behaviour into the adapter? Measured by a program.

The context "Always answer in French" is followed by the embedded model about half the time
when prompted. We run the whole PRISM pipeline with it (its program check `is_french` labels the
pairs; general queries are answered with the context too, so the gate's decision rule sees that
the context helps everywhere), then on held-out questions (MT-Bench first turns, never seen in
training) count how often each system answers in French:

  base            the model, no context
  base+context    the model prompted with the context (the teacher)
  adapter         base + distilled LoRA, no context (ungated: adapter always on)
  prism           gated: the gate decides per question (a context that helps everywhere should get
                  the constant rule "always on": never worse than route-all or route-none)

    python benchmarks/french_transfer.py --out runs/french [--n 48] [--heldout 40]

Results go to OUT/french_transfer.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from prism.bench.data import load_mt_bench
from prism.bench.stats import paired_diff_ci
from prism.config import load_config
from prism.io import atomic_write_json
from prism.model import load_model
from prism.contexts import ContextRegistry
from prism.pipeline import run_pipeline
from prism.routed import PrismModel
from prism.judging.sanity import wilson
from prism.judging.verifiers import is_french

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = ROOT / "examples" / "contexts" / "french.yaml"
BENCHMARKS = ROOT.parent / "shared" / "benchmarks"


def heldout_questions(path: Path, limit: int) -> list[str]:
    """First turns of MT-Bench questions (the project's checked loader; a category-stratified sample
    when `limit` is below 80)."""
    return [it.turns[0] for it in load_mt_bench(path, limit)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/french")
    ap.add_argument("--n", type=int, default=96, help="self-generated training queries")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--heldout", type=int, default=80, help="MT-Bench questions to evaluate on")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--benchmarks", default=str(BENCHMARKS))
    args = ap.parse_args()

    t0 = time.perf_counter()
    cfg = load_config("quick", overrides={
        "persona_dir": str(CONTEXT), "personas": ["french"], "queries.n_per_persona": args.n,
        "queries.n_general": args.n // 2, "answers.cross": True, "answers.max_new_tokens": 64,
        "distill.epochs": args.epochs, "distill.lr": args.lr, "queries.persona_in_context": False,
    })
    base = load_model(batch_size=cfg.batch_size)
    run = run_pipeline(cfg, args.out, model=base)
    pipeline_s = time.perf_counter() - t0

    context = ContextRegistry.load(CONTEXT).get("french").text()
    questions = heldout_questions(Path(args.benchmarks), args.heldout)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=0.0)
    routed = PrismModel.load(args.out)  # its own model copy: the adapter is injected into it
    convs = [[{"role": "user", "content": q}] for q in questions]
    outputs = {
        "base": [g.text for g in base.generate([base.user_prompt(q) for q in questions], **gen)],
        "base+context": [g.text for g in base.generate([base.user_prompt(q, context) for q in questions], **gen)],
        "adapter": [r.text for r in routed.chat_batch(convs, adapter=True, **gen)],
    }
    prism_replies = routed.chat_batch(convs, **gen)
    outputs["prism"] = [r.text for r in prism_replies]
    n = len(questions)
    rates = {}
    for name, texts in outputs.items():
        k = sum(is_french(t) for t in texts)
        rates[name] = {"french": k, "n": n, "rate": round(k / n, 3), "ci95": [round(x, 3) for x in wilson(k, n)]}
    prompted = rates["base+context"]["rate"]
    french = {name: [float(is_french(t)) for t in texts] for name, texts in outputs.items()}
    # Never worse than the better constant rule: paired differences on the same questions.
    vs = {other: paired_diff_ci(french["prism"], french[other], 2000, 0) for other in ("adapter", "base")}
    result = {
        "rates": rates,
        "prism_minus": {k: {x: (round(v[x], 4) if isinstance(v[x], float) else v[x]) for x in v} for k, v in vs.items()},
        "adapter_over_prompted": round(rates["adapter"]["rate"] / prompted, 3) if prompted else None,
        "prism_routed_on": sum(r.route.adapter is not None for r in prism_replies),
        "distill": run.manifest["stages"]["distill"],
        "gate": run.manifest["stages"]["gate"]["metrics"],
        "gate_rule": run.manifest["stages"]["gate"].get("rule"), "gate_constant": run.manifest["stages"]["gate"].get("constant"),
        "labels": {k: run.manifest["stages"]["verdicts"][k] for k in ("distill", "retain")},
        "seconds": {"pipeline": round(pipeline_s, 1), "total": round(time.perf_counter() - t0, 1)},
        "samples": {name: texts[:3] for name, texts in outputs.items()},
    }
    atomic_write_json(Path(args.out) / "french_transfer.json", result)
    print(f"held-out MT-Bench questions: {n}")
    print(f"{'system':<14} {'French':>7} {'rate':>6}  95% CI")
    for name, r in rates.items():
        print(f"{name:<14} {r['french']:>7} {r['rate']:>6.2f}  {r['ci95'][0]:.2f}-{r['ci95'][1]:.2f}")
    print(f"adapter / prompted = {result['adapter_over_prompted']}; prism routed {result['prism_routed_on']}/{n} "
          f"to the adapter; distill set {result['labels']}; KL {run.manifest['stages']['distill'].get('kl_initial')}"
          f" -> {run.manifest['stages']['distill'].get('kl_final')}; wall {result['seconds']}")
    print(f"gate rule: {result['gate_rule']} {result['gate_constant'] or ''}; prism - adapter (route-all): "
          f"{vs['adapter']['diff']:+.3f} [{vs['adapter']['lo']:+.3f}, {vs['adapter']['hi']:+.3f}]; prism - base "
          f"(route-none): {vs['base']['diff']:+.3f} [{vs['base']['lo']:+.3f}, {vs['base']['hi']:+.3f}]")


if __name__ == "__main__":
    main()
