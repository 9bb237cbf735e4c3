"""Routed inference cost: PRISM's adapter and gate against the base model and the persona prompt.

    python benchmarks/routing_overhead.py [--run-dir runs/quick] [--repeats 5] [--tokens 128]

One process, the embedded model, batch 1, greedy. The end-of-turn token is disabled while timing
so that every reply is exactly --tokens tokens long (same work for every system).

  base              the plain model (no PEFT wrapper), ChatModel.generate
  adapter on, swap  PrismModel (default adapter_mode="swap": merged weights swapped in), forced on
  adapter on, lora  PrismModel(adapter_mode="lora"): PEFT's unmerged LoRA path, forced on
  routed            PrismModel.chat: a layer-0 pass for the gate, then the reply on the chosen route

Gate cost: the layer-0 pass (route_prompts: embeddings, layer 0, pooling, MLP) as a share of the
whole routed request.
Context prompt vs PRISM: prompt tokens and time to first token (a 1-token reply, prefill included)
for each persona length (long, short, minimal; several personas and queries), the persona sent in
the system prompt to the base model, against PRISM's routed request without persona tokens.
Medians over --repeats. Writes benchmarks/results/routing_overhead.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, command, finish, machine, median, table  # noqa: E402

QUERIES = ["Write a long story about a dragon who learns to cook.", "Explain how a refrigerator works.",
           "What is the integral of x times sin x?", "Give me advice for my first job interview.",
           "Summarise the causes of the First World War.", "How do I merge two sorted lists in Python?"]
PERSONAS = ["math", "writing", "coding", "safety_monitor"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "quick"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out")
    args = ap.parse_args()

    from prism.model import load_model
    from prism.contexts import ContextRegistry
    from prism.routed import PrismModel

    data = {"machine": machine(), "command": command(), "run_dir": args.run_dir, "tokens": args.tokens}
    base = load_model()
    swap = PrismModel.load(args.run_dir, model=load_model())
    lora = PrismModel.load(args.run_dir, model=load_model(), adapter_mode="lora")
    never = len(base.tokenizer) - 1  # a stop id that is never generated: replies run to --tokens
    for m in (base, swap.model, lora.model):
        m.stop_ids = [never]
    query = QUERIES[0]
    msgs = [{"role": "user", "content": query}]
    prompt = base.user_prompt(query)

    def t_base():
        return base.generate([prompt], args.tokens)[0].n_tokens

    def t_forced(pm):
        return lambda: pm.chat(msgs, max_new_tokens=args.tokens, adapter=True).completion_tokens

    routed_reply = {}

    def t_routed():
        reply = swap.chat(msgs, max_new_tokens=args.tokens)
        routed_reply["route"] = reply.route.to_dict()
        return reply.completion_tokens

    cases = [("base", t_base), ("adapter on, swap", t_forced(swap)), ("adapter on, lora", t_forced(lora)),
             ("routed", t_routed)]
    times = {name: [] for name, _ in cases}
    tokens = {}
    for _, fn in cases:
        fn()  # warm-up
    for _ in range(args.repeats):  # interleaved, so drift hits every case alike
        for name, fn in cases:
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)
    request_routed = median(times["routed"])
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        swap.route_prompts([prompt])
    gate_separate = (time.perf_counter() - t0) / args.repeats
    b = median(times["base"])
    e2e = [{"system": name, "seconds": round(median(v), 3), "tokens": tokens[name],
            "ms_per_token": round(1000 * median(v) / max(1, tokens[name]), 1), "vs_base": round(median(v) / b, 3)}
           for name, v in times.items()]
    data["end_to_end"] = e2e
    data["route_of_routed_request"] = routed_reply.get("route")
    data["gate"] = {"layer0_pass_ms": round(1000 * gate_separate, 2),
                    "share_of_request": round(gate_separate / request_routed, 5)}

    # Context prompt vs PRISM: prompt tokens and time to first token.
    reg = ContextRegistry.load(None)
    for m in (base, swap.model):
        m.stop_ids = [never]
    ttft_rows = []
    plain_tokens = median([len(base.token_ids(base.user_prompt(q))) for q in QUERIES])
    prism_ttft = []
    for _ in range(args.repeats):
        for q in QUERIES:
            t0 = time.perf_counter()
            swap.chat([{"role": "user", "content": q}], max_new_tokens=1)
            prism_ttft.append(time.perf_counter() - t0)
    for length in ("long", "short", "minimal"):
        tt, ntok = [], []
        for _ in range(args.repeats):
            for i, q in enumerate(QUERIES):
                p = base.user_prompt(q, reg.get(PERSONAS[i % len(PERSONAS)]).text(length))
                ntok.append(len(base.token_ids(p)))
                t0 = time.perf_counter()
                base.generate([p], 1)
                tt.append(time.perf_counter() - t0)
        ttft_rows.append({"persona_length": length, "persona_prompt_tokens": median(ntok),
                          "prism_prompt_tokens": plain_tokens, "tokens_saved": median(ntok) - plain_tokens,
                          "persona_ttft_ms": round(1000 * median(tt), 1),
                          "prism_ttft_ms": round(1000 * median(prism_ttft), 1),
                          "ttft_ratio_persona_over_prism": round(median(tt) / median(prism_ttft), 2)})
    data["ttft"] = ttft_rows
    data["machine_after"] = {k: machine()[k] for k in ("load_average", "other_busy_processes")}

    text = table(["system", "s / reply", "tokens", "ms/token", "x base"],
                 [[r["system"], r["seconds"], r["tokens"], r["ms_per_token"], r["vs_base"]] for r in e2e],
                 title=f"{args.tokens}-token greedy reply, batch 1, median of {args.repeats}")
    g = data["gate"]
    text += (f"\n\ngate (a layer-0 pass): {g['layer0_pass_ms']} ms = {100 * g['share_of_request']:.3f}% of the "
             "routed request")
    text += "\n\n" + table(["persona length", "persona prompt tok", "PRISM prompt tok", "tokens saved",
                            "persona TTFT ms", "PRISM TTFT ms", "TTFT persona/PRISM"],
                           [[r["persona_length"], r["persona_prompt_tokens"], r["prism_prompt_tokens"],
                             r["tokens_saved"], r["persona_ttft_ms"], r["prism_ttft_ms"],
                             r["ttft_ratio_persona_over_prism"]] for r in ttft_rows],
                           title="Context prompt vs PRISM (no persona tokens), time to first token, batch 1")
    return finish("routing_overhead", data, text, args.out)


if __name__ == "__main__":
    sys.exit(main())
