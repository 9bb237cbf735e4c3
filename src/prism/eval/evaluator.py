"""`prism eval`: the paper's Table 1 for any model, with confidence intervals. Each system's cells
(prism.eval.systems) are scored by the shared cached scorer (prism.bench.scoring); the per-item
scores become sub-scores, Overall and paired differences in results.json, table.md and plots."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from prism.bench import data as D
from prism.bench.scoring import Cell, Scorer, mmlu_conversation, user
from prism.bench.stats import mean_ci, paired_diff_ci, pearson, pooled_mean_ci, spearman
from prism.config import EvalConfig
from prism.eval.systems import Systems
from prism.io import atomic_write_json, atomic_write_text
from prism.judging import build_rating_judge

log = logging.getLogger(__name__)

BENCHMARKS = ("mtbench", "mmlu", "safety", "xstest")


class Evaluator:
    def __init__(self, systems: Systems, settings: EvalConfig, data_dir: str, out: str | Path, quiet: bool = False,
                 engine=None):
        self.sys = systems
        self.s = settings
        self.data_dir = data_dir
        self.out = Path(out)
        model = systems.model
        key = json.dumps({**model.source, "dtype": model.dtype_name}, sort_keys=True, default=str)
        self.scorer = Scorer(model, self.out, key, quiet, systems.prism, systems.adapter_variant, engine)
        self.timings: dict[str, float] = {}

    @staticmethod
    def _result(cells: list[Cell], scores: list, rows: list[dict] | None = None) -> dict:
        out = {"item_ids": [c.item.id for c in cells], "categories": [c.item.category for c in cells],
               "scores": scores, "routes": [c.route for c in cells]}
        if rows is not None:
            out["texts"] = [r["text"] for r in rows]
        return out

    # ----- benchmarks ----------------------------------------------------------------------
    def run_mtbench(self) -> dict:
        items = D.load_mt_bench(self.data_dir, self.s.limits.get("mtbench"), self.s.seed)
        judge = build_rating_judge(self.s.judge, self.sys.model, D.load_judge_prompts(self.data_dir))
        results, first_turns = {}, {}
        for system in self.s.systems:  # routed once per conversation, from the first turn
            cells = self.sys.cells(system, items, [user(it.turns[0]) for it in items])
            scores, first_turns[system] = self.scorer.score_mtbench(cells, judge, 2, self.s.mt_max_new_tokens)
            results[system] = self._result(cells, scores, first_turns[system])
        base = first_turns.get("base", next(iter(first_turns.values())))
        sanity = self.scorer.judge_sanity(judge, [it.turns[0] for it in items], [g["text"] for g in base],
                                          self.s.sanity_pairs, self.s.seed)
        return {"judge": judge.name, "judge_sanity": sanity.to_dict(), "systems": results}

    def run_mmlu(self) -> dict:
        items = D.load_mmlu(self.data_dir, self.s.limits.get("mmlu"), self.s.seed)
        shots: dict[str, list[D.Item]] = {}
        if self.s.mmlu_shots:
            for ex in D.load_mmlu(self.data_dir, split="dev"):
                if len(shots.setdefault(ex.subject or "", [])) < self.s.mmlu_shots:
                    shots[ex.subject or ""].append(ex)
        results = {}
        for system in self.s.systems:  # routed on the question itself; the shots only precede it
            cells = self.sys.cells(system, items, [mmlu_conversation(it) for it in items])
            results[system] = {**self._result(cells, self.scorer.score_mmlu(cells, shots)),
                               "subjects": [it.subject for it in items]}
        return {"systems": results}

    def _refusal_results(self, items: list[D.Item], desc: str) -> dict:
        out = {}
        for system in self.s.systems:
            cells = self.sys.cells(system, items, [user(it.turns[0]) for it in items])
            out[system] = self._result(cells, *self.scorer.score_refusal(cells, self.s.refusal,
                                                                         self.s.safety_max_new_tokens, desc))
        return out

    def run_safety(self) -> dict:
        results: dict[str, dict] = {}
        for name, loader in D.SAFETY_LOADERS.items():
            items = loader(self.data_dir, self.s.limits.get(name), self.s.seed)
            for system, r in (self._refusal_results(items, name) if items else {}).items():
                merged = results.setdefault(system, {k: [] for k in r})
                for key in r:
                    merged[key] += r[key]
        return {"classifier": self.s.refusal, "systems": results}

    def run_xstest(self) -> dict:
        items = D.load_xstest(self.data_dir, self.s.limits.get("xstest"), self.s.seed)
        return {"classifier": self.s.refusal, "systems": self._refusal_results(items, "xstest")}

    # ----- everything ------------------------------------------------------------------------
    def run(self, fingerprint: dict) -> dict:
        raw: dict[str, Any] = {}
        for bench in self.s.benchmarks:
            t0 = time.perf_counter()
            raw[bench] = getattr(self, f"run_{bench}")()
            self.timings[bench] = round(time.perf_counter() - t0, 1)
            log.info("eval %s done in %.0fs", bench, self.timings[bench])
        results = summarise(raw, self.s)
        results["timings"] = self.timings
        results["fingerprint"] = fingerprint
        results["out"] = str(self.out)
        atomic_write_json(self.out / "raw.json", raw)
        from prism.eval.report import markdown_table, plots

        atomic_write_text(self.out / "table.md", markdown_table(results))
        results["plots"] = plots(results, self.out)
        atomic_write_json(self.out / "results.json", results)
        return results


# ----- statistics over the raw per-item scores -------------------------------------------------
def _subscore_items(raw: dict) -> dict[str, dict[str, list]]:
    """system -> sub-score name -> list of (item_id, value on 0-100)."""
    out: dict[str, dict[str, list]] = {}

    def add(system, name, item_id, value):
        out.setdefault(system, {}).setdefault(name, []).append((item_id, value))

    for bench, scale in (("mtbench", 10.0), ("mmlu", 100.0), ("safety", 100.0)):
        for system, r in raw.get(bench, {}).get("systems", {}).items():
            for iid, cat, v in zip(r["item_ids"], r["categories"], r["scores"]):
                add(system, f"{bench}/{cat}", iid, None if v is None else v * scale)
    for system, r in raw.get("xstest", {}).get("systems", {}).items():
        for iid, cat, v in zip(r["item_ids"], r["categories"], r["scores"]):
            add(system, f"xstest/{cat}", iid, v * 100.0)
    return out


OVERALL_PARTS = ("mtbench", "mmlu", "safety")  # the paper's 15 sub-scores: 8 + 4 + 3


def summarise(raw: dict, s: EvalConfig) -> dict:
    items = _subscore_items(raw)
    systems = list(items)
    out: dict[str, Any] = {"systems": {}, "settings": s.model_dump(mode="json")}
    for system in systems:
        subs = {name: mean_ci([v for _, v in vals], s.n_boot, s.seed) for name, vals in sorted(items[system].items())}
        bench = {}
        for b in ("mtbench", "mmlu", "safety"):
            vals = [v for name, lst in items[system].items() if name.startswith(b + "/") for _, v in lst]
            if vals:
                bench[b] = mean_ci(vals, s.n_boot, s.seed)
        out["systems"][system] = {"subscores": subs, "benchmarks": bench,
                                  "overall": _overall_ci(items[system], s.n_boot, s.seed)}
    if "base" in items:
        for system in systems:
            if system == "base":
                continue
            diffs = {}
            for name, vals in items[system].items():
                base = dict(items["base"].get(name, []))
                pairs = [(v, base[i]) for i, v in vals if i in base]
                diffs[name] = paired_diff_ci([a for a, _ in pairs], [b for _, b in pairs], s.n_boot, s.seed)
            for b in ("mtbench", "mmlu", "safety"):
                pa = [(v, dict(items["base"].get(n, [])).get(i)) for n, lst in items[system].items()
                      if n.startswith(b + "/") for i, v in lst]
                if pa:
                    diffs[b] = paired_diff_ci([a for a, _ in pa], [c for _, c in pa], s.n_boot, s.seed)
            diffs["overall"] = _overall_diff(items[system], items["base"], s.n_boot, s.seed)
            out["systems"][system]["vs_base"] = diffs
    if "mtbench" in raw:
        out["mtbench_judge"] = {"judge": raw["mtbench"]["judge"], "sanity": raw["mtbench"]["judge_sanity"]}
    out["routing"] = _routing(raw, out)
    return out


def _overall_ci(sub: dict[str, list], n_boot: int, seed: int) -> dict:
    """Mean of the sub-scores (the paper's Overall), CI by resampling items within each."""
    return pooled_mean_ci([[v for _, v in vals if v is not None] for name, vals in sorted(sub.items())
                           if name.split("/")[0] in OVERALL_PARTS], n_boot, seed)


def _overall_diff(sub: dict[str, list], base: dict[str, list], n_boot: int, seed: int) -> dict:
    diffs = []
    for name, vals in sorted(sub.items()):
        if name.split("/")[0] in OVERALL_PARTS:
            b = dict(base.get(name, []))
            diffs.append([v - b[i] for i, v in vals if i in b and v is not None and b[i] is not None])
    return pooled_mean_ci(diffs, n_boot, seed, paired=True)


def _routing(raw: dict, summary: dict) -> dict | None:
    """Share of items the gate sends to the adapter per category, and its correlation with the
    persona's effect (persona minus base) across categories (the paper's Figure 4)."""
    shares: dict[str, float] = {}
    for bench in BENCHMARKS:
        r = raw.get(bench, {}).get("systems", {}).get("prism")
        if not r:
            continue
        by_cat: dict[str, list[int]] = {}
        for cat, route in zip(r["categories"], r["routes"]):
            by_cat.setdefault(f"{bench}/{cat}", []).append(int(route["adapter"] is not None))
        shares.update({k: sum(v) / len(v) for k, v in by_cat.items()})
    if not shares:
        return None
    effect = {}
    persona = summary["systems"].get("persona", {}).get("vs_base", {})
    for name in shares:
        if name in persona and persona[name]["diff"] is not None:
            effect[name] = persona[name]["diff"]
    common = sorted(set(shares) & set(effect))
    xs, ys = [shares[n] for n in common], [effect[n] for n in common]
    return {"share_routed": shares, "persona_effect": effect, "pearson": pearson(xs, ys),
            "spearman": spearman(xs, ys), "n_categories": len(common)}
