"""`prism eval`: the paper's Table 1 for any model, with confidence intervals.

Every generation, letter score and judgment is cached in the results directory under a key of
(system, item, turn, settings), so a re-run or an added system reuses finished work and a killed
eval resumes. Outputs: results.json, table.md, plots (PNG), and the JSONL caches for audit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prism.eval import data as D
from prism.eval.refusal import is_refusal
from prism.eval.stats import mean_ci, paired_diff_ci, pearson, spearman
from prism.eval.systems import Systems, predicted_letter
from prism.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

BENCHMARKS = ("mtbench", "mmlu", "safety", "xstest")


@dataclass
class EvalSettings:
    data_dir: str
    systems: tuple[str, ...] = ("base", "persona", "ungated", "prism")
    benchmarks: tuple[str, ...] = BENCHMARKS
    limits: dict[str, int | None] = field(default_factory=dict)  # per loader name; None = all
    mt_max_new_tokens: int = 512
    safety_max_new_tokens: int = 256
    mmlu_shots: int = 0
    seed: int = 0
    persona_length: str = "long"
    placement: str = "system"
    persona_map: dict[str, str] = field(default_factory=dict)
    judge: str = "self"  # self | a local model path/hub id | http
    judge_url: str | None = None
    judge_model: str | None = None
    judge_key_env: str = "OPENAI_API_KEY"
    refusal: str = "pattern"  # pattern | judge
    sanity_pairs: int = 16
    n_boot: int = 2000


EVAL_PRESETS: dict[str, dict[str, Any]] = {
    # All four systems and all benchmarks on the embedded model in about 20 minutes (MT-Bench's
    # two turns and long judge prompts dominate: 16 questions at 96 tokens took 12-22 minutes).
    "quick": {"limits": {"mtbench": 8, "mmlu": 114, "harmbench": 24, "jailbreak": 8, "pku": 24, "xstest": 40},
              "mt_max_new_tokens": 64, "safety_max_new_tokens": 48, "sanity_pairs": 12},
    "full": {"limits": {}, "mt_max_new_tokens": 512, "safety_max_new_tokens": 256, "sanity_pairs": 40},
}


def _key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class Cache:
    """An append-only JSONL file of {key: ..., ...} rows, loaded once."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = {r["key"]: r for r in read_jsonl(path)}

    def get(self, key: str):
        return self.rows.get(key)

    def put(self, rows: list[dict]) -> None:
        append_jsonl(self.path, rows)
        for r in rows:
            self.rows[r["key"]] = r


class Evaluator:
    def __init__(self, systems: Systems, settings: EvalSettings, out: str | Path, fingerprint: dict,
                 quiet: bool = False):
        self.sys = systems
        self.s = settings
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet
        # What makes a cached generation valid: the model/run, and the settings that change it.
        self.fingerprint = {**fingerprint, "persona_length": settings.persona_length,
                            "placement": settings.placement, "persona_map": systems.persona_map}
        self.gens = Cache(self.out / "generations.jsonl")
        self.scores = Cache(self.out / "mmlu_scores.jsonl")
        self.judgments = Cache(self.out / "judgments.jsonl")
        self.timings: dict[str, float] = {}

    def _bar(self, total, desc):
        return tqdm(total=total, desc=desc, disable=self.quiet, leave=False, dynamic_ncols=True)

    # ----- generation with cache --------------------------------------------------------
    def generate(self, system: str, items: list[D.Item], convs: list[list[dict]], turn: int, max_new: int,
                 routes: list[dict] | None = None, desc: str = "") -> list[dict]:
        keys = [_key(system, it.id, turn, max_new, self.fingerprint) for it in items]
        todo = [i for i, k in enumerate(keys) if self.gens.get(k) is None]
        bar = self._bar(len(todo), f"{desc} {system}")
        step = max(1, self.sys.model.batch_size * 2)
        for start in range(0, len(todo), step):
            part = todo[start : start + step]
            outs = self.sys.generate(system, [items[i] for i in part], [convs[i] for i in part], max_new,
                                     routes=[routes[i] for i in part] if routes else None)
            self.gens.put([{"key": keys[i], "system": system, "item": items[i].id, "benchmark": items[i].benchmark,
                            "category": items[i].category, "turn": turn, "prompt": convs[i][-1]["content"][:2000],
                            "text": t, "tokens": n, "route": r} for i, (t, n, r) in zip(part, outs)])
            bar.update(len(part))
        bar.close()
        return [self.gens.get(k) for k in keys]

    # ----- benchmarks ----------------------------------------------------------------------
    def run_mtbench(self) -> dict:
        items = D.load_mt_bench(self.s.data_dir, self.s.limits.get("mtbench"), self.s.seed)
        judge = self._rating_judge()
        per_system: dict[str, dict] = {}
        answers_t1: dict[str, list[dict]] = {}
        for system in self.s.systems:
            c1 = [[{"role": "user", "content": it.turns[0]}] for it in items]
            routes = self.sys.routes(system, c1)  # once per conversation, from the first turn
            t1 = self.generate(system, items, c1, 1, self.s.mt_max_new_tokens, routes, "mt-bench turn 1")
            c2 = [c + [{"role": "assistant", "content": g["text"]}, {"role": "user", "content": it.turns[1]}]
                  for c, g, it in zip(c1, t1, items)]
            t2 = self.generate(system, items, c2, 2, self.s.mt_max_new_tokens, routes, "mt-bench turn 2")
            answers_t1[system] = t1
            per_system[system] = {"items": items, "t1": t1, "t2": t2}
        self._base_model_state()  # the self-judge is the untouched base model
        sanity = self._judge_sanity(judge, items, answers_t1)
        results = {}
        for system, d in per_system.items():
            scores = self._rate(judge, system, d["items"], d["t1"], d["t2"])
            results[system] = {"item_ids": [it.id for it in items], "categories": [it.category for it in items],
                               "scores": scores, "routes": [g["route"] for g in d["t1"]]}
        return {"judge": judge.name, "judge_sanity": sanity, "systems": results}

    def _base_model_state(self) -> None:
        if self.sys.prism is not None:
            self.sys.prism.set_adapter(False)

    def _rating_judge(self):
        from prism.eval.judges import HttpRatingJudge, ModelRatingJudge

        prompts = D.load_judge_prompts(self.s.data_dir)
        if self.s.judge_url:
            return HttpRatingJudge(self.s.judge_url, self.s.judge_model or "default", prompts, self.s.judge_key_env)
        if self.s.judge == "self":
            return ModelRatingJudge(self.sys.model, prompts, label=f"self ({self.sys.model.name})")
        from prism.models import load_model

        return ModelRatingJudge(load_model(self.s.judge, batch_size=self.sys.model.batch_size), prompts)

    def _rate(self, judge, system, items, t1, t2) -> list[float | None]:
        from prism.eval.judges import RatingRequest

        out: list[float | None] = []
        keys, reqs = [], []
        for it, a, b in zip(items, t1, t2):
            ref = it.reference if it.category in ("math", "reasoning", "coding") and it.reference else []
            # The paper's MT-Bench score averages both turns; turn 2 is judged with the whole conversation.
            for turn, req in ((1, RatingRequest([it.turns[0]], [a["text"]], ref[:1])),
                              (2, RatingRequest(list(it.turns), [a["text"], b["text"]], ref))):
                keys.append(_key("rating", judge.name, a["key"] if turn == 1 else b["key"]))
                reqs.append(req)
        todo = [i for i, k in enumerate(keys) if self.judgments.get(k) is None]
        bar = self._bar(len(todo), f"judging {system}")
        for start in range(0, len(todo), 16):
            part = todo[start : start + 16]
            ratings = judge.rate([reqs[i] for i in part])
            self.judgments.put([{"key": keys[i], "judge": judge.name, "system": system, "rating": r}
                                for i, r in zip(part, ratings)])
            bar.update(len(part))
        bar.close()
        vals = [self.judgments.get(k)["rating"] for k in keys]
        for i in range(0, len(vals), 2):
            pair = [v for v in vals[i : i + 2] if v is not None]
            out.append(sum(pair) / len(pair) if pair else None)
        return out

    def _judge_sanity(self, judge, items, answers_t1) -> dict:
        from prism.eval.judges import mismatched, rating_sanity

        path = self.out / "judge_sanity.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("judge") == judge.name:
                return saved
        base = answers_t1.get("base") or next(iter(answers_t1.values()))
        pairs = mismatched([it.turns[0] for it in items], [g["text"] for g in base], self.s.sanity_pairs, self.s.seed)
        result = rating_sanity(judge, pairs)
        atomic_write_json(path, result)
        if not result["passed"]:
            log.warning("MT-Bench judge %s is NO BETTER THAN CHANCE at telling an answer from an answer to another "
                        "question (accuracy %s, 95%% CI %s): its scores say little", judge.name, result["accuracy"],
                        result["ci95"])
        return result

    def run_mmlu(self) -> dict:
        items = D.load_mmlu(self.s.data_dir, self.s.limits.get("mmlu"), self.s.seed)
        shots: dict[str, list[D.Item]] = {}
        if self.s.mmlu_shots:
            for ex in D.load_mmlu(self.s.data_dir, split="dev"):
                if len(shots.setdefault(ex.subject or "", [])) < self.s.mmlu_shots:
                    shots[ex.subject or ""].append(ex)
        results = {}
        for system in self.s.systems:
            keys = [_key("mmlu", system, it.id, self.s.mmlu_shots, self.fingerprint) for it in items]
            todo = [i for i, k in enumerate(keys) if self.scores.get(k) is None]
            bar = self._bar(len(todo), f"mmlu {system}")
            for start in range(0, len(todo), 32):
                part = todo[start : start + 32]
                outs = self.sys.letter_logprobs(system, [items[i] for i in part], shots)
                self.scores.put([{"key": keys[i], "system": system, "item": items[i].id, "logprobs": lp, "route": r,
                                  "pred": predicted_letter(lp), "gold": items[i].answer}
                                 for i, (lp, r) in zip(part, outs)])
                bar.update(len(part))
            bar.close()
            rows = [self.scores.get(k) for k in keys]
            results[system] = {"item_ids": [it.id for it in items], "categories": [it.category for it in items],
                               "subjects": [it.subject for it in items],
                               "scores": [float(r["pred"] == r["gold"]) for r in rows],
                               "routes": [r["route"] for r in rows]}
        return {"systems": results}

    def _refusals(self, items, gens) -> list[float]:
        if self.s.refusal == "judge":
            from prism.eval.judges import ModelRefusalJudge

            judge = ModelRefusalJudge(self.sys.model)
            self._base_model_state()
            return [float(x) for x in judge([it.turns[0] for it in items], [g["text"] for g in gens])]
        return [float(is_refusal(g["text"])) for g in gens]

    def run_safety(self) -> dict:
        loaders = {"harmbench": D.load_harmbench, "jailbreak": D.load_jailbreak, "pku": D.load_pku}
        results: dict[str, dict] = {}
        for name, loader in loaders.items():
            items = loader(self.s.data_dir, self.s.limits.get(name), self.s.seed)
            for system in self.s.systems:
                convs = [[{"role": "user", "content": it.turns[0]}] for it in items]
                gens = self.generate(system, items, convs, 1, self.s.safety_max_new_tokens, desc=name)
                r = results.setdefault(system, {"item_ids": [], "categories": [], "scores": [], "routes": []})
                r["item_ids"] += [it.id for it in items]
                r["categories"] += [name] * len(items)
                r["scores"] += self._refusals(items, gens)
                r["routes"] += [g["route"] for g in gens]
        return {"classifier": self.s.refusal, "systems": results}

    def run_xstest(self) -> dict:
        items = D.load_xstest(self.s.data_dir, self.s.limits.get("xstest"), self.s.seed)
        results = {}
        for system in self.s.systems:
            convs = [[{"role": "user", "content": it.turns[0]}] for it in items]
            gens = self.generate(system, items, convs, 1, self.s.safety_max_new_tokens, desc="xstest")
            results[system] = {"item_ids": [it.id for it in items], "categories": [it.category for it in items],
                               "scores": self._refusals(items, gens), "routes": [g["route"] for g in gens]}
        return {"classifier": self.s.refusal, "systems": results}

    # ----- everything ------------------------------------------------------------------------
    def run(self) -> dict:
        raw: dict[str, Any] = {}
        for bench in self.s.benchmarks:
            t0 = time.perf_counter()
            raw[bench] = getattr(self, f"run_{bench}")()
            self.timings[bench] = round(time.perf_counter() - t0, 1)
            log.info("eval %s done in %.0fs", bench, self.timings[bench])
        results = summarise(raw, self.s)
        results["timings"] = self.timings
        results["fingerprint"] = self.fingerprint
        atomic_write_json(self.out / "raw.json", raw)
        atomic_write_json(self.out / "results.json", results)
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


def summarise(raw: dict, s: EvalSettings) -> dict:
    import numpy as np

    items = _subscore_items(raw)
    systems = list(items)
    out: dict[str, Any] = {"systems": {}, "settings": {k: v for k, v in vars(s).items()}}
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
    _ = np  # numpy is used by the helpers
    return out


def _parts(sub: dict[str, list]) -> list[list[float]]:
    return [[v for _, v in vals if v is not None] for name, vals in sorted(sub.items())
            if name.split("/")[0] in OVERALL_PARTS]


def _overall_ci(sub: dict[str, list], n_boot: int, seed: int) -> dict:
    """Mean of the sub-scores (the paper's Overall), CI by resampling items within each."""
    import numpy as np

    parts = [np.asarray(p) for p in _parts(sub) if p]
    if not parts:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    boots = np.mean([p[rng.integers(0, len(p), size=(n_boot, len(p)))].mean(1) for p in parts], axis=0)
    return {"mean": float(np.mean([p.mean() for p in parts])), "lo": float(np.quantile(boots, 0.025)),
            "hi": float(np.quantile(boots, 0.975)), "n": len(parts)}


def _overall_diff(sub: dict[str, list], base: dict[str, list], n_boot: int, seed: int) -> dict:
    import numpy as np

    diffs = []
    for name, vals in sorted(sub.items()):
        if name.split("/")[0] not in OVERALL_PARTS:
            continue
        b = dict(base.get(name, []))
        d = [v - b[i] for i, v in vals if i in b and v is not None and b[i] is not None]
        if d:
            diffs.append(np.asarray(d))
    if not diffs:
        return {"diff": None, "lo": None, "hi": None}
    rng = np.random.default_rng(seed)
    boots = np.mean([d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1) for d in diffs], axis=0)
    return {"diff": float(np.mean([d.mean() for d in diffs])), "lo": float(np.quantile(boots, 0.025)),
            "hi": float(np.quantile(boots, 0.975)), "p": float(min(1.0, 2 * min((boots <= 0).mean(),
                                                                                (boots >= 0).mean())))}


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
            by_cat.setdefault(f"{bench}/{cat}", []).append(int(route["adapter"]))
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
