"""Scores every (condition, item) of the study grid on one model, through content-keyed caches.

Each generation, MMLU letter score and judgment is keyed by the exact prompt it came from (plus the
model and the token budget), not by the condition's name. So identical prompts are computed once:
the random control at the reference cell reuses the named personas' rows, the matched condition
reuses the heatmap's diagonal, and a second `prism study` over the same folder computes nothing.
The caches are the evaluation harness's append-only JSONL files, so a killed study resumes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from prism.eval import data as D
from prism.eval.harness import Cache, _key
from prism.eval.refusal import is_refusal
from prism.eval.systems import DEFAULT_PERSONA_MAP, LETTERS, MMLU_PREFIX, mmlu_question, predicted_letter
from prism.io import atomic_write_json
from prism.models import ChatModel
from prism.personas import PersonaRegistry
from prism.study.grid import Condition, StudyConfig, expand_grid, persona_for

log = logging.getLogger(__name__)

SAFETY_LOADERS = {"harmbench": D.load_harmbench, "jailbreak": D.load_jailbreak, "pku": D.load_pku}


@dataclass
class Cell:
    """One (condition, item): the persona actually used and the prompt of the first turn."""

    cond: Condition
    item: D.Item
    persona: str | None
    persona_text: str | None


class StudyRunner:
    def __init__(self, model: ChatModel, cfg: StudyConfig, registry: PersonaRegistry, out: str | Path,
                 data_dir: str | Path, quiet: bool = False):
        self.model = model
        self.cfg = cfg
        self.registry = registry
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data_dir = str(data_dir)
        self.quiet = quiet
        self.names = cfg.personas or registry.names()
        for name in self.names:
            registry.get(name)  # unknown names fail before any work
        self.persona_map = {**DEFAULT_PERSONA_MAP, **cfg.persona_map}
        for name in self.persona_map.values():
            registry.get(name)
        self.conditions = expand_grid(cfg, self.names)
        # What makes a cached row valid: the model and its precision (float32, the reference, is
        # left untagged so caches written before the tag existed stay valid).
        dtype = str(next(model.model.parameters()).dtype).replace("torch.", "")
        self.model_key = json.dumps({**model.source, **({"dtype": dtype} if dtype != "float32" else {})},
                                    sort_keys=True, default=str)
        self.gens = Cache(self.out / "generations.jsonl")
        self.letters = Cache(self.out / "mmlu_scores.jsonl")
        self.judgments = Cache(self.out / "judgments.jsonl")
        self.computed = {"generations": 0, "mmlu": 0, "judgments": 0}  # new rows this invocation

    # ----- items and cells ------------------------------------------------------------------
    def items(self) -> dict[str, list[D.Item]]:
        lim, seed = self.cfg.limits, self.cfg.seed
        out: dict[str, list[D.Item]] = {}
        if "mtbench" in self.cfg.benchmarks:
            out["mtbench"] = D.load_mt_bench(self.data_dir, lim.get("mtbench"), seed)
        if "mmlu" in self.cfg.benchmarks:
            out["mmlu"] = D.load_mmlu(self.data_dir, lim.get("mmlu"), seed)
        if "safety" in self.cfg.benchmarks:
            out["safety"] = [it for name, loader in SAFETY_LOADERS.items()
                             for it in loader(self.data_dir, lim.get(name), seed)]
        return out

    def cells(self, items: list[D.Item]) -> list[Cell]:
        out = []
        for cond in self.conditions:
            for it in items:
                name = persona_for(cond, it.id, it.category, self.persona_map, self.names, self.cfg.seed)
                text = self.registry.get(name).text(cond.length) if name else None
                out.append(Cell(cond, it, name, text))
        return out

    def _prompt(self, cell: Cell, conversation: list[dict]) -> str:
        return self.model.prompt(conversation, cell.persona_text, cell.cond.placement or "system")

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=self.quiet or total == 0, leave=False, dynamic_ncols=True)

    # ----- cached primitives ------------------------------------------------------------------
    def _generate(self, prompts: list[str], max_new: int, desc: str) -> list[dict]:
        keys = [_key("gen", self.model_key, p, max_new) for p in prompts]
        # unique prompts, shortest first, so each batch pads little
        todo = sorted({k: p for k, p in zip(keys, prompts) if self.gens.get(k) is None}.items(),
                      key=lambda kp: (len(kp[1]), kp[0]))
        bar = self._bar(len(todo), desc)
        step = self.model.batch_size * 2
        for start in range(0, len(todo), step):
            part = todo[start : start + step]
            gens = self.model.generate([p for _, p in part], max_new, temperature=0.0)
            self.gens.put([{"key": k, "text": g.text, "tokens": g.n_tokens} for (k, _), g in zip(part, gens)])
            self.computed["generations"] += len(part)
            bar.update(len(part))
        bar.close()
        return [self.gens.get(k) for k in keys]

    def _letter_scores(self, prompts: list[str]) -> list[dict]:
        keys = [_key("mmlu", self.model_key, p) for p in prompts]
        todo = sorted({k: p for k, p in zip(keys, prompts) if self.letters.get(k) is None}.items(),
                      key=lambda kp: (len(kp[1]), kp[0]))
        letter_ids = [self.model.variant_ids(L) for L in LETTERS]
        if not all(letter_ids):
            raise ValueError(f"{self.model.name}: the letters A-D are not single tokens; leave mmlu out of the study")
        bar = self._bar(len(todo), "mmlu")
        step = self.model.batch_size * 2
        for start in range(0, len(todo), step):
            part = todo[start : start + step]
            logp = self.model.next_token_logprobs([p for _, p in part])
            rows = []
            for row, (k, _) in enumerate(part):
                lp = [float(logp[row, ids].logsumexp(-1)) for ids in letter_ids]
                rows.append({"key": k, "logprobs": lp, "pred": predicted_letter(lp)})
            self.letters.put(rows)
            self.computed["mmlu"] += len(part)
            bar.update(len(part))
        bar.close()
        return [self.letters.get(k) for k in keys]

    def _ratings(self, judge, keys: list[str], requests: list) -> list[float | None]:
        todo = sorted({k: r for k, r in zip(keys, requests) if self.judgments.get(k) is None}.items())
        bar = self._bar(len(todo), "judging")
        for start in range(0, len(todo), 16):
            part = todo[start : start + 16]
            ratings = judge.rate([r for _, r in part])
            self.judgments.put([{"key": k, "judge": judge.name, "rating": v} for (k, _), v in zip(part, ratings)])
            self.computed["judgments"] += len(part)
            bar.update(len(part))
        bar.close()
        return [self.judgments.get(k)["rating"] for k in keys]

    # ----- benchmarks ------------------------------------------------------------------------
    def score_mtbench(self, items: list[D.Item]) -> tuple[list[dict], dict]:
        from prism.eval.judges import RatingRequest, mismatched, rating_sanity

        cells = self.cells(items)
        max_new = self.cfg.mt_max_new_tokens
        convs = [[{"role": "user", "content": c.item.turns[0]}] for c in cells]
        t1 = self._generate([self._prompt(c, v) for c, v in zip(cells, convs)], max_new, "mt-bench turn 1")
        t2: list[dict | None] = [None] * len(cells)
        if self.cfg.mt_turns == 2:
            convs2 = [v + [{"role": "assistant", "content": g["text"]}, {"role": "user", "content": c.item.turns[1]}]
                      for c, v, g in zip(cells, convs, t1)]
            t2 = self._generate([self._prompt(c, v) for c, v in zip(cells, convs2)], max_new, "mt-bench turn 2")
        judge = self._judge()
        keys, reqs, owner = [], [], []
        for i, (c, a, b) in enumerate(zip(cells, t1, t2)):
            it = c.item
            ref = it.reference if it.category in ("math", "reasoning", "coding") and it.reference else []
            keys.append(_key("rating", judge.name, a["key"]))
            reqs.append(RatingRequest([it.turns[0]], [a["text"]], ref[:1]))
            owner.append(i)
            if b is not None:
                keys.append(_key("rating", judge.name, a["key"], b["key"]))
                reqs.append(RatingRequest(list(it.turns), [a["text"], b["text"]], ref))
                owner.append(i)
        ratings = self._ratings(judge, keys, reqs)
        per_cell: list[list[float]] = [[] for _ in cells]
        for i, r in zip(owner, ratings):
            if r is not None:
                per_cell[i].append(r)
        rows = [self._row(c, 10.0 * sum(v) / len(v) if v else None, tokens=g["tokens"])
                for c, v, g in zip(cells, per_cell, t1)]
        # The judge's sanity check on the no-persona answers: an answer to the question vs one to another.
        base = [(c.item.turns[0], g["text"]) for c, g in zip(cells, t1) if c.cond.persona == "none"]
        pairs = mismatched([q for q, _ in base], [a for _, a in base], self.cfg.sanity_pairs, self.cfg.seed)
        sanity_path = self.out / "judge_sanity.json"
        sanity = json.loads(sanity_path.read_text()) if sanity_path.is_file() else None
        if sanity is None or sanity.get("judge") != judge.name or sanity.get("pairs") != len(pairs):
            sanity = rating_sanity(judge, pairs)
            atomic_write_json(sanity_path, sanity)
        return rows, sanity

    def score_mmlu(self, items: list[D.Item]) -> list[dict]:
        cells = self.cells(items)
        prompts = [self._prompt(c, [{"role": "user", "content": mmlu_question(c.item)}]) + MMLU_PREFIX for c in cells]
        scored = self._letter_scores(prompts)
        return [self._row(c, 100.0 * float(s["pred"] == c.item.answer)) for c, s in zip(cells, scored)]

    def score_safety(self, items: list[D.Item]) -> list[dict]:
        cells = self.cells(items)
        prompts = [self._prompt(c, [{"role": "user", "content": c.item.turns[0]}]) for c in cells]
        gens = self._generate(prompts, self.cfg.safety_max_new_tokens, "safety")
        if self.cfg.refusal == "judge":
            from prism.eval.judges import ModelRefusalJudge

            judge = ModelRefusalJudge(self.model)
            keys = [_key("refusal", judge.name, g["key"]) for g in gens]
            todo = [i for i, k in enumerate(keys) if self.judgments.get(k) is None]
            if todo:
                verdicts = judge([cells[i].item.turns[0] for i in todo], [gens[i]["text"] for i in todo])
                self.judgments.put([{"key": keys[i], "judge": judge.name, "refusal": v} for i, v in zip(todo, verdicts)])
            refused = [self.judgments.get(k)["refusal"] for k in keys]
        else:
            refused = [is_refusal(g["text"]) for g in gens]
        return [self._row(c, 100.0 * float(r), tokens=g["tokens"]) for c, r, g in zip(cells, refused, gens)]

    def _row(self, cell: Cell, score: float | None, tokens: int | None = None) -> dict:
        it = cell.item
        return {"condition": cell.cond.label, "persona": cell.cond.persona, "length": cell.cond.length,
                "placement": cell.cond.placement, "persona_used": cell.persona, "item": it.id,
                "benchmark": "safety" if it.benchmark in SAFETY_LOADERS else it.benchmark,
                "category": it.category, "score": score, "tokens": tokens}

    def _judge(self):
        from prism.eval.judges import HttpRatingJudge, ModelRatingJudge
        from prism.models import load_model

        prompts = D.load_judge_prompts(self.data_dir)
        if self.cfg.judge_url:
            return HttpRatingJudge(self.cfg.judge_url, self.cfg.judge_model or "default", prompts,
                                   self.cfg.judge_key_env)
        if self.cfg.judge == "self":
            return ModelRatingJudge(self.model, prompts, label=f"self ({self.model.name})")
        if not hasattr(self, "_judge_model"):
            self._judge_model = load_model(self.cfg.judge, batch_size=self.model.batch_size)
        return ModelRatingJudge(self._judge_model, prompts)

    def run(self) -> dict:
        """Scores for every cell; also written to scores.json (derived from the caches)."""
        import time

        saved, self.model.prefix_cache = self.model.prefix_cache, self.cfg.prefix_cache
        try:
            return self._run()
        finally:
            self.model.prefix_cache = saved

    def _run(self) -> dict:
        import time

        items = self.items()
        rows: list[dict] = []
        timings, sanity = {}, None
        for bench in self.cfg.benchmarks:
            t0 = time.perf_counter()
            if bench == "mtbench":
                part, sanity = self.score_mtbench(items["mtbench"])
            else:
                part = getattr(self, f"score_{bench}")(items[bench])
            rows += part
            timings[bench] = round(time.perf_counter() - t0, 1)
            log.info("study %s: %s %d cells in %.0fs", self.model.name, bench, len(part), timings[bench])
        result = {"model": self.model.name, "source": self.model.source,
                  "supports_system_role": self.model.supports_system_role, "conditions": [c.label for c in self.conditions],
                  "personas": self.names, "persona_map": self.persona_map, "rows": rows, "judge_sanity": sanity,
                  "timings": timings, "computed": dict(self.computed),
                  "answer_tokens": sum(r["tokens"] or 0 for r in rows)}
        atomic_write_json(self.out / "scores.json", result)
        return result
