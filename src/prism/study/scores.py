"""Scores every (condition, item) of the study grid on one model with the shared cached scorer.
Its caches are keyed by prompt, not by condition, so identical prompts are computed once (the
random control at the reference cell reuses the named personas' rows) and a re-run computes nothing."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from prism.bench import data as D
from prism.bench.scoring import Cell, Scorer
from prism.config import StudyConfig
from prism.io import atomic_write_json
from prism.judging import build_rating_judge
from prism.model import ChatModel
from prism.contexts import ContextRegistry
from prism.study.grid import expand_grid, persona_for

log = logging.getLogger(__name__)


class GridScorer:
    def __init__(self, model: ChatModel, cfg: StudyConfig, registry: ContextRegistry, out: str | Path,
                 data_dir: str | Path, quiet: bool = False):
        self.model = model
        self.cfg = cfg
        self.registry = registry
        self.out = Path(out)
        self.data_dir = str(data_dir)
        self.names = list(cfg.personas or registry.names())
        for name in self.names:
            registry.get(name)  # unknown names fail before any work
        self.persona_map = {**D.DEFAULT_PERSONA_MAP, **cfg.persona_map}
        for name in self.persona_map.values():
            registry.get(name)
        self.conditions = expand_grid(cfg, self.names)
        # What makes a cached row valid: the model and its precision (float32, the reference, is
        # left untagged so caches written before the tag existed stay valid).
        dtype = model.dtype_name
        model_key = json.dumps({**model.source, **({"dtype": dtype} if dtype != "float32" else {})},
                               sort_keys=True, default=str)
        self.scorer = Scorer(model, self.out, model_key, quiet=quiet)

    # ----- items and cells ------------------------------------------------------------------
    def items(self) -> dict[str, list[D.Item]]:
        lim, seed = self.cfg.limits, self.cfg.seed
        out: dict[str, list[D.Item]] = {}
        if "mtbench" in self.cfg.benchmarks:
            out["mtbench"] = D.load_mt_bench(self.data_dir, lim.get("mtbench"), seed)
        if "mmlu" in self.cfg.benchmarks:
            out["mmlu"] = D.load_mmlu(self.data_dir, lim.get("mmlu"), seed)
        if "safety" in self.cfg.benchmarks:
            out["safety"] = D.load_safety(self.data_dir, lim, seed)
        return out

    def cells(self, items: list[D.Item]) -> list[Cell]:
        """Every (condition, item): the persona the condition puts in front of the item, and where."""
        out = []
        for cond in self.conditions:
            for it in items:
                name = persona_for(cond, it.id, it.category, self.persona_map, self.names, self.cfg.seed)
                text = self.registry.get(name).text(cond.length) if name else None
                out.append(Cell(it, text, cond.placement or "system", condition=cond, persona_name=name))
        return out

    # ----- benchmarks ------------------------------------------------------------------------
    def score_mtbench(self, items: list[D.Item]) -> tuple[list[dict], dict]:
        cells = self.cells(items)
        judge = build_rating_judge(self.cfg.judge, self.model, D.load_judge_prompts(self.data_dir))
        scores, t1 = self.scorer.score_mtbench(cells, judge, self.cfg.mt_turns, self.cfg.mt_max_new_tokens)
        rows = [self._row(c, None if s is None else 10.0 * s, tokens=g["tokens"]) for c, s, g in zip(cells, scores, t1)]
        # The judge's sanity check on the no-persona answers: an answer to the question vs one to another.
        base = [(c.item.turns[0], g["text"]) for c, g in zip(cells, t1) if c.condition.persona == "none"]
        sanity = self.scorer.judge_sanity(judge, [q for q, _ in base], [a for _, a in base], self.cfg.sanity_pairs,
                                          self.cfg.seed)
        return rows, sanity.to_dict()

    def score_mmlu(self, items: list[D.Item]) -> list[dict]:
        cells = self.cells(items)
        return [self._row(c, 100.0 * s) for c, s in zip(cells, self.scorer.score_mmlu(cells))]

    def score_safety(self, items: list[D.Item]) -> list[dict]:
        cells = self.cells(items)
        refused, gens = self.scorer.score_refusal(cells, self.cfg.refusal, self.cfg.safety_max_new_tokens)
        return [self._row(c, 100.0 * r, tokens=g["tokens"]) for c, r, g in zip(cells, refused, gens)]

    def _row(self, cell: Cell, score: float | None, tokens: int | None = None) -> dict:
        it, cond = cell.item, cell.condition
        return {"condition": cond.label, "persona": cond.persona, "length": cond.length,
                "placement": cond.placement, "persona_used": cell.persona_name, "item": it.id,
                "benchmark": "safety" if it.benchmark in D.SAFETY_LOADERS else it.benchmark,
                "category": it.category, "score": score, "tokens": tokens}

    def run(self) -> dict:
        """Scores for every cell; also written to scores.json (derived from the caches)."""
        saved, self.model.prefix_cache = self.model.prefix_cache, self.cfg.prefix_cache
        try:
            return self._run()
        finally:
            self.model.prefix_cache = saved

    def _run(self) -> dict:
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
                  "timings": timings, "computed": dict(self.scorer.computed),
                  "answer_tokens": sum(r["tokens"] or 0 for r in rows)}
        atomic_write_json(self.out / "scores.json", result)
        return result
