"""Scoring shared by `prism eval` and `prism study`, each written once: greedy generation, MMLU
letter scoring, MT-Bench rating, refusal scoring and the rating judge's sanity check.

Every result is cached (append-only JSONL) under a key of what determines it: the model and its
precision, the variant (base, or a run's adapter), the exact prompt and the token budget. So
identical work is done once, a killed evaluation resumes, and a changed setting changes the key."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from prism.bench.data import Item
from prism.io import append_jsonl, atomic_write_json, read_jsonl
from prism.judging.rating import RatingRequest, rating_sanity
from prism.judging.refusal import ModelRefusalJudge, is_refusal
from prism.judging.sanity import SanityCheck, mismatched_pairs

log = logging.getLogger(__name__)

MMLU_INSTRUCTION = "Answer with the letter of the correct option."
MMLU_PREFIX = "The answer is"
LETTERS = "ABCD"
BASE = "base"  # the model variant with no adapter
# MT-Bench judges these categories against the reference answer.
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")


def cache_key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _variant(variant: str) -> tuple:
    """The variant's part of a key: none for the base model (older caches stay valid)."""
    return () if variant == BASE else (variant,)


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


def mmlu_question(item: Item) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"{item.turns[0]}\n\n{options}\n\n{MMLU_INSTRUCTION}"


def mmlu_conversation(item: Item, shots: Sequence[Item] = ()) -> list[dict]:
    """The question as a chat, after `shots` solved examples (few-shot) if any."""
    history: list[dict] = []
    for ex in shots:
        history += [{"role": "user", "content": mmlu_question(ex)},
                    {"role": "assistant", "content": f"{MMLU_PREFIX} {LETTERS[ex.answer]}."}]
    return history + [{"role": "user", "content": mmlu_question(item)}]


def predicted_letter(logprobs: Sequence[float]) -> int:
    return max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))


@dataclass
class Cell:
    """One item under one condition: the persona text put in front of it (and where), and its route
    ({"adapter": adapter name or None, "score": gate probability or None}; None: the base model). `condition` and
    `persona_name` are the caller's labels."""

    item: Item
    persona: str | None = None
    placement: str = "system"
    route: dict | None = None
    condition: Any = None
    persona_name: str | None = None


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Scorer:
    """Cached scoring of cells over one model (named by `model_key`), caches in `folder`. With
    `adapters` (a PrismModel sharing the model) cells routed to the adapter are scored with it on.
    With `engine` (a LlamaCppEngine or VllmEngine holding the same model and adapters) the greedy
    replies are generated there, each with its route's adapter; letter scores stay in torch."""

    def __init__(self, model, folder: str | Path, model_key: str, quiet: bool = False, adapters=None,
                 adapter_variant: str | None = None, engine=None):
        self.model = model
        self.engine = engine
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model_key = model_key
        self.quiet = quiet
        self.adapters = adapters
        self.adapter_variant = adapter_variant
        self.gens = Cache(self.folder / "generations.jsonl")
        self.letters = Cache(self.folder / "mmlu_scores.jsonl")
        self.judgments = Cache(self.folder / "judgments.jsonl")
        self.computed = {"generations": 0, "mmlu": 0, "judgments": 0}  # new rows in this invocation

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=self.quiet or total == 0, leave=False, dynamic_ncols=True)

    def _todo(self, cache: Cache, keys: list[str], inputs: list) -> list[tuple[str, Any]]:
        """Inputs whose key is not cached yet, each once, shortest first (batches pad little)."""
        todo = {k: x for k, x in zip(keys, inputs) if cache.get(k) is None}
        return sorted(todo.items(), key=lambda kx: (len(str(kx[1])), kx[0]))

    def generate(self, prompts: Sequence[str], max_new_tokens: int, variant: str = BASE, desc: str = "generating",
                 adapter: str | None = None) -> list[dict]:
        """Greedy continuations of formatted prompts: rows {key, text, tokens}. `adapter`: the
        engine's adapter for `variant` (torch: the caller has switched the model to it)."""
        engine = () if self.engine is None else (self.engine.engine,)  # another engine, other replies
        keys = [cache_key("gen", self.model_key, *engine, *_variant(variant), p, max_new_tokens) for p in prompts]
        todo = self._todo(self.gens, keys, list(prompts))
        bar = self._bar(len(todo), desc)
        # An engine batches whatever is in flight: hand it more per call (the cache is written per call).
        step = self.model.work_chunk if self.engine is None else 256
        for start in range(0, len(todo), step):
            part = todo[start : start + step]
            if self.engine is not None:
                gens = self.engine.generate([p for _, p in part], max_new_tokens, temperature=0.0, adapter=adapter)
            else:
                gens = self.model.generate([p for _, p in part], max_new_tokens, temperature=0.0)
            self.gens.put([{"key": k, "variant": variant, "prompt": p[-2000:], "text": g.text, "tokens": g.n_tokens}
                           for (k, p), g in zip(part, gens)])
            self.computed["generations"] += len(part)
            bar.update(len(part))
        bar.close()
        return [self.gens.get(k) for k in keys]

    def letter_scores(self, prompts: Sequence[str], variant: str = BASE) -> list[dict]:
        """MMLU: log p(letter) for A-D after each prompt (which ends in MMLU_PREFIX): rows
        {key, logprobs, pred}."""
        keys = [cache_key("mmlu", self.model_key, *_variant(variant), p) for p in prompts]
        todo = self._todo(self.letters, keys, list(prompts))
        letter_ids = [self.model.variant_ids(L, required=True) for L in LETTERS]
        bar = self._bar(len(todo), "mmlu")
        step = self.model.work_chunk
        for start in range(0, len(todo), step):
            part = todo[start : start + step]
            logp = self.model.next_token_logprobs([p for _, p in part])
            rows = []
            for row, (k, _) in enumerate(part):
                lp = [float(logp[row, ids].logsumexp(-1)) for ids in letter_ids]
                rows.append({"key": k, "variant": variant, "logprobs": lp, "pred": predicted_letter(lp)})
            self.letters.put(rows)
            self.computed["mmlu"] += len(part)
            bar.update(len(part))
        bar.close()
        return [self.letters.get(k) for k in keys]

    def ratings(self, judge, keys: Sequence[Sequence[str]], requests: Sequence[RatingRequest],
                desc: str = "judging") -> list[float | None]:
        """The judge's 1-10 rating of each request, cached under `keys` (the generations rated)."""
        keys = [cache_key("rating", judge.name, *k) for k in keys]
        todo = sorted({k: r for k, r in zip(keys, requests) if self.judgments.get(k) is None}.items())
        bar = self._bar(len(todo), desc)
        for start in range(0, len(todo), 16):
            part = todo[start : start + 16]
            ratings = judge.rate([r for _, r in part])
            self.judgments.put([{"key": k, "judge": judge.name, "rating": v} for (k, _), v in zip(part, ratings)])
            self.computed["judgments"] += len(part)
            bar.update(len(part))
        bar.close()
        return [self.judgments.get(k)["rating"] for k in keys]

    # ----- cells: prompts, routes, and one function per benchmark ------------------------------
    def _by_route(self, cells: Sequence[Cell]):
        """(variant, adapter, indices) per route present, with the model switched to it; the base
        model after."""
        if self.adapters is None:
            yield BASE, None, list(range(len(cells)))
            return
        for name, idx in self.adapters.grouped([c.route["adapter"] if c.route else None for c in cells]):
            yield (f"{self.adapter_variant}/{name}" if name else BASE), name, idx
        self.adapters.set_adapter(None)

    def _prompts(self, cells: Sequence[Cell], conversations: Sequence[list[dict]]) -> list[str]:
        return [self.model.prompt(v, c.persona, c.placement) for c, v in zip(cells, conversations)]

    def replies(self, cells: Sequence[Cell], conversations: Sequence[list[dict]], max_new_tokens: int,
                desc: str = "generating") -> list[dict]:
        """Each cell's greedy reply to its conversation, under its persona and route."""
        prompts = self._prompts(cells, conversations)
        out: list[dict | None] = [None] * len(cells)
        for variant, adapter, idx in self._by_route(cells):
            for i, row in zip(idx, self.generate([prompts[i] for i in idx], max_new_tokens, variant, desc, adapter)):
                out[i] = row
        return out  # type: ignore[return-value]

    def score_mtbench(self, cells: Sequence[Cell], judge, turns: int, max_new_tokens: int
                      ) -> tuple[list[float | None], list[dict]]:
        """Per cell, the mean 1-10 rating of its `turns` answers (turn 2 judged with the whole
        conversation); and the turn-1 replies."""
        c1 = [user(c.item.turns[0]) for c in cells]
        t1 = self.replies(cells, c1, max_new_tokens, "mt-bench turn 1")
        t2: list[dict | None] = [None] * len(cells)
        if turns == 2:
            c2 = [v + [{"role": "assistant", "content": g["text"]}, *user(c.item.turns[1])]
                  for c, v, g in zip(cells, c1, t1)]
            t2 = self.replies(cells, c2, max_new_tokens, "mt-bench turn 2")
        return self.mtbench_scores(judge, [c.item for c in cells], t1, t2), t1

    def score_mmlu(self, cells: Sequence[Cell], shots: dict[str, list[Item]] | None = None) -> list[float]:
        """Per cell, 1.0 when the most likely letter is the right one (zero- or few-shot)."""
        convs = [mmlu_conversation(c.item, (shots or {}).get(c.item.subject or "", [])) for c in cells]
        prompts = [p + MMLU_PREFIX for p in self._prompts(cells, convs)]
        rows: list[dict | None] = [None] * len(cells)
        for variant, _, idx in self._by_route(cells):
            for i, row in zip(idx, self.letter_scores([prompts[i] for i in idx], variant)):
                rows[i] = row
        return [float(r["pred"] == c.item.answer) for r, c in zip(rows, cells)]

    def score_refusal(self, cells: Sequence[Cell], method: str, max_new_tokens: int, desc: str = "safety"
                      ) -> tuple[list[float], list[dict]]:
        """Per cell, 1.0 when the reply refuses; and the replies."""
        gens = self.replies(cells, [user(c.item.turns[0]) for c in cells], max_new_tokens, desc)
        refused = self.refusals(method, [c.item.turns[0] for c in cells], gens)
        return [float(r) for r in refused], gens

    def mtbench_scores(self, judge, items: Sequence[Item], turn1: Sequence[dict], turn2: Sequence[dict | None]
                       ) -> list[float | None]:
        """Per item, the mean 1-10 rating over its judged turns (None if the judge gave none)."""
        keys, reqs, owner = [], [], []
        for i, (it, a, b) in enumerate(zip(items, turn1, turn2)):
            ref = it.reference if it.category in REFERENCE_CATEGORIES and it.reference else []
            keys.append([a["key"]])
            reqs.append(RatingRequest([it.turns[0]], [a["text"]], ref[:1]))
            owner.append(i)
            if b is not None:  # turn 2 is judged with the whole conversation
                keys.append([a["key"], b["key"]])
                reqs.append(RatingRequest(list(it.turns), [a["text"], b["text"]], ref))
                owner.append(i)
        ratings = self.ratings(judge, keys, reqs)
        per_item: list[list[float]] = [[] for _ in items]
        for i, r in zip(owner, ratings):
            if r is not None:
                per_item[i].append(r)
        return [sum(v) / len(v) if v else None for v in per_item]

    def refusals(self, method: str, requests: Sequence[str], responses: Sequence[dict]) -> list[bool]:
        """Does each response (a generation row) refuse its request? `method`: the documented
        pattern classifier, or `judge`: the model itself asked (adapter off is the caller's job)."""
        if method == "pattern":
            return [is_refusal(g["text"]) for g in responses]
        judge = ModelRefusalJudge(self.model)
        keys = [cache_key("refusal", judge.name, g["key"]) for g in responses]
        todo = [i for i, k in enumerate(keys) if self.judgments.get(k) is None]
        if todo:
            verdicts = judge([requests[i] for i in todo], [responses[i]["text"] for i in todo])
            self.judgments.put([{"key": keys[i], "judge": judge.name, "refusal": v} for i, v in zip(todo, verdicts)])
            self.computed["judgments"] += len(todo)
        return [self.judgments.get(k)["refusal"] for k in keys]

    def judge_sanity(self, judge, questions: Sequence[str], answers: Sequence[str], n: int, seed: int
                     ) -> SanityCheck:
        """The rating judge's sanity check on (question, its answer, an answer to another question),
        kept in judge_sanity.json and reused while the judge and the number of pairs stay the same."""
        path = self.folder / "judge_sanity.json"
        pairs = mismatched_pairs([(q, a, str(i)) for i, (q, a) in enumerate(zip(questions, answers))], n, seed)
        if path.is_file():
            saved = SanityCheck.from_dict(json.loads(path.read_text()))
            if saved.judge == judge.name and saved.pairs == len(pairs):
                return saved
        result = rating_sanity(judge, pairs)
        atomic_write_json(path, result.to_dict())
        if not result.passed:
            log.warning("MT-Bench judge %s is NO BETTER THAN CHANCE at telling an answer from an answer to another "
                        "question (accuracy %s, 95%% CI %s): its scores say little", judge.name, result.accuracy,
                        result.ci95)
        return result
