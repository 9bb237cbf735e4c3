"""Bootstrapping speed (stages 1-3 and the teacher logits): PRISM against a straightforward version.

    python benchmarks/bootstrap_speed.py [--personas math,writing,coding] [--n 8] [--repeats 3] [--levers]

Both sides run the real pipeline code (`run_pipeline` up to stage 3, quick preset, same personas,
same token budgets: 48-token queries, 96-token answers, 24 judge-check pairs) and then compute the
teacher top-64 logits of every persona answer. They differ only in the primitives:

  naive  HF `generate` in float32, batches of 8 in input order, no prefix reuse; the judge
         generates text and parses A/B/TIE (the authors' judge); teacher logits over the whole
         vocabulary at every position, right-padded batches of 8 in input order.
  prism  ChatModel.generate (batches of 16 sorted by length, the KV cache of a shared persona /
         query prefix computed once per batch), weights cast to bfloat16 for stages 1-3 and the
         teacher (`infer_dtype: bfloat16`), the quick preset's likelihood judge (scores from
         log-probabilities, no generation), teacher logits only at response positions.

Throughput counts the tokens of bootstrap data produced: query and answer tokens generated
(stages 1-2), answer tokens judged (stage 3: both answers of each pair) and response tokens whose
teacher top-k is cached; tokens/s = those tokens / wall time. Runs alternate naive/prism; medians
over --repeats. --levers adds a table of single levers on fixed inputs (one run each).
Writes benchmarks/results/bootstrap_speed.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, finish, header, machine, median, table, timed, write_json  # noqa: E402

from prism.config import load_config  # noqa: E402
from prism.distill import build_example, teacher_topk
from prism.model.batching import pad as _pad  # noqa: E402
from prism.io import read_jsonl  # noqa: E402
from prism.model import ChatModel, Generation, load_model  # noqa: E402
from prism.pipeline import run_pipeline  # noqa: E402

STAGES = ("queries", "answers", "verdicts", "teacher")


class NaiveModel(ChatModel):
    """The straightforward generate: HF generate, fixed batches of 8 in input order, float32."""

    NAIVE_BATCH = 8

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=None, progress=None):
        out = []
        for start in range(0, len(prompts), self.NAIVE_BATCH):
            enc = self._encode(prompts[start : start + self.NAIVE_BATCH])
            if seed is not None:
                torch.manual_seed(seed + start)
            kw = dict(max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id)
            kw.update(dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else
                      dict(do_sample=False, temperature=None, top_p=None, top_k=None))
            new = self.model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:]
            for row in new.tolist():
                n = next((j for j, t in enumerate(row) if t in self.stop_ids), len(row))
                out.append(Generation(self.tokenizer.decode(row[:n], skip_special_tokens=True).strip(), n))
                self.tokens_generated += n
        return out


@torch.inference_mode()
def naive_teacher(model, examples, k, batch_size, pad_id, temperature=2.0):
    """Full-vocabulary logits at every position, right-padded batches in input order."""
    out = {}
    for start in range(0, len(examples), batch_size):
        part = examples[start : start + batch_size]
        ids, mask, _ = _pad([e.teacher_ids for e in part], pad_id, side="right")
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, e in enumerate(part):
            span = logits[row, e.teacher_start : e.teacher_start + e.n_response].float()
            vals, idx = span.topk(k, dim=-1)
            out[f"{e.key}.values"], out[f"{e.key}.indices"] = vals, idx.to(torch.int32)
            out[f"{e.key}.lse"] = torch.logsumexp(span / temperature, dim=-1)
    return out


PRISM_BATCH = 16


def config_for(side: str, personas: list[str], n: int, judge: str | None = None):
    over = {"personas": personas, "queries.n_per_persona": n}
    if side == "naive":
        over.update({"judge.kind": "generate", "infer_dtype": "model", "prefix_cache": False, "batch_size": 8})
    else:
        over.update({"infer_dtype": "bfloat16", "prefix_cache": True, "batch_size": PRISM_BATCH})
    if judge:
        over["judge.kind"] = judge
    return load_config("quick", overrides=over)


def teacher_examples(model, run_dir: Path, config):
    from prism.contexts import ContextRegistry

    reg = ContextRegistry.load(None)
    rows = read_jsonl(run_dir / "answers.jsonl")
    return [build_example(model, r["query_id"], r["query"], r["answer_persona"],
                          reg.get(r["persona"]).text(config.persona_length), config.placement,
                          config.distill.max_seq_len) for r in rows]


def one_run(side: str, model: ChatModel, personas, n, workdir: Path) -> dict:
    config = config_for(side, personas, n)
    out = workdir / f"{side}-{time.time_ns()}"
    model.tokens_generated = 0
    run = run_pipeline(config, out, until="verdicts", quiet=True, model=model)
    stages = run.manifest["stages"]
    answers = read_jsonl(out / "answers.jsonl")
    queries = read_jsonl(out / "queries.jsonl")
    examples = teacher_examples(model, out, config)
    pad = model.tokenizer.pad_token_id
    if side == "naive":
        t_teacher, _ = timed(lambda: naive_teacher(model.model, examples, 64, 8, pad))
    else:
        def fast():
            with model.inference_dtype(config.infer_dtype):
                return teacher_topk(model.model, examples, 64, config.batch_size, pad)
        t_teacher, _ = timed(fast)
    tokens = {"queries": stages["queries"]["tokens_generated"], "answers": stages["answers"]["tokens_generated"],
              "verdicts": sum(a["tokens_base"] + a["tokens_persona"] for a in answers),
              "teacher": sum(e.n_response for e in examples)}
    seconds = {"queries": stages["queries"]["seconds"], "answers": stages["answers"]["seconds"],
               "verdicts": stages["verdicts"]["seconds"], "teacher": round(t_teacher, 2)}
    check = stages["verdicts"].get("judge_check") or {}
    result = {"side": side, "seconds": seconds, "tokens": tokens, "queries": len(queries), "pairs": len(answers),
              "distill_share": stages["verdicts"].get("distill_share"),
              "judge_check_accuracy": check.get("accuracy"), "judge": config.judge.kind}
    shutil.rmtree(out, ignore_errors=True)
    return result


def levers(personas, n, workdir: Path) -> list[dict]:
    """Single levers on fixed inputs: one finished prism run's queries and answers."""
    model = load_model(batch_size=16)
    config = config_for("prism", personas, n)
    out = workdir / "levers"
    run_pipeline(config, out, until="verdicts", quiet=True, model=model)
    answers = read_jsonl(out / "answers.jsonl")
    from prism.contexts import ContextRegistry

    reg = ContextRegistry.load(None)
    persona_prompts = [model.user_prompt(a["query"], reg.get(a["persona"]).text("long")) for a in answers]
    prompts = [model.user_prompt(a["query"]) for a in answers] + persona_prompts
    rows = []

    def gen_case(name, batch, sort, prefix, dtype):
        model.batch_size, model.prefix_cache = batch, prefix
        if not sort:
            model.__class__ = NaiveModel
            NaiveModel.NAIVE_BATCH = batch
        try:
            with model.inference_dtype(dtype):
                model.generate(prompts[:2], 4)  # warm-up
                t, gens = timed(lambda: model.generate(prompts, 96, temperature=0.0))
        finally:
            model.__class__ = ChatModel
        toks = sum(g.n_tokens for g in gens)
        rows.append({"stage": "answers (greedy, fixed prompts)", "variant": name, "seconds": round(t, 2),
                     "tokens": toks, "tokens_per_s": round(toks / t, 1)})

    gen_case("fp32, batch 8, input order", 8, False, False, "model")
    gen_case("fp32, batch 16, input order", 16, False, False, "model")
    gen_case("fp32, batch 16, sorted by length", 16, True, False, "model")
    gen_case("fp32, batch 16, sorted, prefix KV reuse", 16, True, True, "model")
    gen_case("bf16, batch 16, sorted, prefix KV reuse", 16, True, True, "bfloat16")
    gen_case("bf16, batch 32, sorted, prefix KV reuse", 32, True, True, "bfloat16")
    gen_case("bf16, batch 48, sorted, prefix KV reuse", 48, True, True, "bfloat16")

    from prism.judging.pairwise import make_pairwise_judge as make_judge

    triples = [(a["query"], a["answer_persona"], a["answer_base"]) for a in answers]
    model.batch_size, model.prefix_cache = 16, True
    for kind, dtype in (("generate", "model"), ("prompted", "model"), ("likelihood", "model"),
                        ("prompted", "bfloat16"), ("likelihood", "bfloat16")):
        judge = make_judge(kind, model)
        with model.inference_dtype(dtype):
            t, _ = timed(lambda: (judge.prefer_a(triples), judge.prefer_a([(q, b, a) for q, a, b in triples])))
        toks = sum(a["tokens_base"] + a["tokens_persona"] for a in answers)
        rows.append({"stage": "verdicts (both orders)", "variant": f"{kind} judge, {dtype}", "seconds": round(t, 2),
                     "tokens": toks, "tokens_per_s": round(toks / t, 1)})
    examples = teacher_examples(model, out, config)
    pad = model.tokenizer.pad_token_id
    toks = sum(e.n_response for e in examples)
    for name, fn in (("full logits, batch 8, input order, fp32", lambda: naive_teacher(model.model, examples, 64, 8, pad)),
                     ("response logits only, sorted, batch 16, fp32", lambda: teacher_topk(model.model, examples, 64, 16, pad))):
        t, _ = timed(fn)
        rows.append({"stage": "teacher top-64", "variant": name, "seconds": round(t, 2), "tokens": toks,
                     "tokens_per_s": round(toks / t, 1)})
    with model.inference_dtype("bfloat16"):
        t, _ = timed(lambda: teacher_topk(model.model, examples, 64, 16, pad))
    rows.append({"stage": "teacher top-64", "variant": "response logits only, sorted, batch 16, bf16",
                 "seconds": round(t, 2), "tokens": toks, "tokens_per_s": round(toks / t, 1)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--personas", default="math,writing,coding")
    ap.add_argument("--n", type=int, default=8, help="queries per persona")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--levers", action="store_true", help="also measure each lever alone on fixed inputs")
    ap.add_argument("--levers-only", action="store_true", help="only the single-lever table")
    ap.add_argument("--batch-size", type=int, default=16, help="prism side's batch_size (a speed-only setting)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/bootstrap_speed.json)")
    args = ap.parse_args()
    global PRISM_BATCH
    PRISM_BATCH = args.batch_size
    personas = [p.strip() for p in args.personas.split(",") if p.strip()]
    if args.levers_only:
        data = {"machine": machine(), "command": command(), "personas": personas, "n_per_persona": args.n}
        with tempfile.TemporaryDirectory(prefix="prism-bootstrap-") as tmp:
            data["levers"] = levers(personas, args.n, Path(tmp))
        data["machine_after"] = {k: machine()[k] for k in ("load_average", "other_busy_processes")}
        data["table"] = table(["stage", "variant", "s", "tokens", "tok/s"],
                              [[r["stage"], r["variant"], r["seconds"], r["tokens"], r["tokens_per_s"]]
                               for r in data["levers"]], title="Single levers on fixed inputs (one run each)")
        path = write_json("bootstrap_levers", data, args.out)
        print(header(data) + "\n\n" + data["table"] + f"\n\nwritten: {path}")
        return 0
    data = {"machine": machine(), "command": command(), "personas": personas, "n_per_persona": args.n,
            "prism_batch_size": args.batch_size, "runs": []}
    naive_model = load_model(batch_size=8)
    naive_model.__class__ = NaiveModel
    prism_model = load_model(batch_size=args.batch_size)
    for m in (naive_model, prism_model):  # warm-up: first calls allocate
        m.generate([m.user_prompt("Hello")] * 2, 4)
    with tempfile.TemporaryDirectory(prefix="prism-bootstrap-") as tmp:
        for rep in range(args.repeats):
            for side, model in (("naive", naive_model), ("prism", prism_model)):
                r = one_run(side, model, personas, args.n, Path(tmp))
                r["repeat"] = rep
                data["runs"].append(r)
                print(f"repeat {rep} {side}: {r['seconds']} tokens {r['tokens']}", file=sys.stderr, flush=True)
        if args.levers:
            data["levers"] = levers(personas, args.n, Path(tmp))
    data["machine_after"] = {k: machine()[k] for k in ("load_average", "other_busy_processes")}

    summary = {}
    for side in ("naive", "prism"):
        runs = [r for r in data["runs"] if r["side"] == side]
        s = {st: {"seconds": median([r["seconds"][st] for r in runs]),
                  "tokens_per_s": median([r["tokens"][st] / max(r["seconds"][st], 1e-9) for r in runs])}
             for st in STAGES}
        s["total"] = {"seconds": median([sum(r["seconds"].values()) for r in runs]),
                      "tokens_per_s": median([sum(r["tokens"].values()) / sum(r["seconds"].values()) for r in runs])}
        summary[side] = s
    # Ratios from the same repeat (naive and prism measured back to back), then the median.
    ratios = {}
    for st in (*STAGES, "total"):
        wall, tps = [], []
        for rep in range(args.repeats):
            a = next(r for r in data["runs"] if r["side"] == "naive" and r["repeat"] == rep)
            b = next(r for r in data["runs"] if r["side"] == "prism" and r["repeat"] == rep)
            sa = sum(a["seconds"].values()) if st == "total" else a["seconds"][st]
            sb = sum(b["seconds"].values()) if st == "total" else b["seconds"][st]
            ta = sum(a["tokens"].values()) if st == "total" else a["tokens"][st]
            tb = sum(b["tokens"].values()) if st == "total" else b["tokens"][st]
            wall.append(sa / sb)
            tps.append((tb / sb) / (ta / sa))
        ratios[st] = {"wall_time_ratio": round(median(wall), 2), "tokens_per_s_ratio": round(median(tps), 2)}
    data["summary"], data["ratios"] = summary, ratios
    rows = [[st, summary["naive"][st]["seconds"], summary["prism"][st]["seconds"], ratios[st]["wall_time_ratio"],
             summary["naive"][st]["tokens_per_s"], summary["prism"][st]["tokens_per_s"],
             ratios[st]["tokens_per_s_ratio"]] for st in (*STAGES, "total")]
    text = table(["stage", "naive s", "prism s", "wall x", "naive tok/s", "prism tok/s", "tok/s x"], rows,
                 title=f"Bootstrapping, {len(personas)} personas x {args.n} queries, median of {args.repeats} runs")
    checks = [[r["side"], r["repeat"], r["judge"], r["judge_check_accuracy"], r["distill_share"]] for r in data["runs"]]
    text += "\n\n" + table(["side", "repeat", "judge", "judge check accuracy", "distill share"], checks)
    if args.levers:
        text += "\n\n" + table(["stage", "variant", "s", "tokens", "tok/s"],
                               [[r["stage"], r["variant"], r["seconds"], r["tokens"], r["tokens_per_s"]]
                                for r in data["levers"]], title="Single levers on fixed inputs (one run each)")
    return finish("bootstrap_speed", data, text, args.out)


if __name__ == "__main__":
    sys.exit(main())
