"""Pairwise judges (stage 3): which of two answers to a query is better?

Every judge maps (query, answer_a, answer_b) to a preference score for A (positive: A is
better). A verdict letter is read from the score after subtracting the judge's position bias:
'A' above +margin, 'B' below -margin, 'TIE' between.

- PromptedJudge: the model reads a judging prompt; the score is log P('A') - log P('B') of the
  next token (one forward pass, no free generation). Its position bias is calibrated.
- GenerateJudge: the authors' judge: generate a few tokens and parse A / B / TIE.
- LikelihoodJudge: no prompt; an answer is better when the query makes it more likely: the
  per-token pointwise mutual information log p(y|q) - log p(y) under the chat template.
Program checks (a function of the answer) are in prism.judging.verifiers.

`check_judge` measures a judge on pairs whose right answer is known (an answer to the query vs
an answer to a different query) and calibrates the position bias on them.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

from prism.judging.sanity import SanityCheck, Triple, sanity_result
from prism.model import ChatModel
from prism.records import Letter

log = logging.getLogger(__name__)

JUDGE_PROMPT = (
    "Compare two answers to the same user question. Judge correctness, relevance, helpfulness "
    "and clarity. Do not favour an answer because it is longer.\n\n"
    "[Question]\n{query}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
    "Which answer is better? Reply with exactly one of: A, B, TIE."
)
ASSISTANT_PREFIX = "Better answer:"


class Judge:
    name = "judge"
    calibrated = False  # whether check_judge should estimate a position bias

    def __init__(self, margin: float = 0.0):
        self.margin = margin
        self.bias = 0.0

    def prefer_a(self, triples: Sequence[Triple], progress=None) -> list[float]:
        raise NotImplementedError

    def letter(self, score: float) -> Letter:
        s = score - self.bias
        if s > self.margin:
            return "A"
        if s < -self.margin:
            return "B"
        return "TIE"


class PromptedJudge(Judge):
    name = "prompted"
    calibrated = True

    def __init__(self, model: ChatModel, margin: float = 0.0, max_answer_chars: int = 3000):
        super().__init__(margin)
        self.model = model
        self.max_answer_chars = max_answer_chars
        self.ids_a = model.variant_ids("A", required=True)
        self.ids_b = model.variant_ids("B", required=True)

    def prompt(self, query: str, a: str, b: str) -> str:
        text = JUDGE_PROMPT.format(query=query, a=a[: self.max_answer_chars], b=b[: self.max_answer_chars])
        return self.model.user_prompt(text) + ASSISTANT_PREFIX

    def prefer_a(self, triples, progress=None):
        if len(triples) == 0:
            return []
        logp = self.model.next_token_logprobs([self.prompt(*t) for t in triples])
        _tick(progress, len(triples))
        la = logp[:, self.ids_a].logsumexp(-1)
        lb = logp[:, self.ids_b].logsumexp(-1)
        return (la - lb).tolist()


class GenerateJudge(PromptedJudge):
    name = "generate"
    calibrated = False

    def __init__(self, model: ChatModel, max_new_tokens: int = 5):
        super().__init__(model, margin=0.0)
        self.max_new_tokens = max_new_tokens

    def prefer_a(self, triples, progress=None):
        gens = self.model.generate([self.prompt(*t) for t in triples], self.max_new_tokens, temperature=0.0)
        _tick(progress, len(triples))
        return [{"A": 1.0, "B": -1.0, "TIE": 0.0}[parse_verdict(g.text)] for g in gens]


class LikelihoodJudge(Judge):
    name = "likelihood"

    def __init__(self, model: ChatModel, margin: float = 0.0):
        super().__init__(margin)
        self.model = model
        self._cache: dict[tuple[str, str], float] = {}  # the swapped order reuses the first order's scores

    def pmi(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Per-token log p(answer | query) - log p(answer | empty user turn)."""
        empty = self.model.user_prompt("")
        prompts = [self.model.user_prompt(q) for q, _ in pairs] + [empty] * len(pairs)
        answers = [a for _, a in pairs] * 2
        scored = self.model.continuation_logprobs(prompts, answers)
        n = len(pairs)
        return [(scored[i][0] - scored[n + i][0]) / max(1, scored[i][1]) for i in range(n)]

    def prefer_a(self, triples, progress=None):
        unique = sorted({(q, a) for q, a, _ in triples} | {(q, b) for q, _, b in triples})
        todo = [u for u in unique if u not in self._cache]
        if len(self._cache) > 20_000:
            self._cache.clear()
        self._cache.update(zip(todo, self.pmi(todo)))
        scores = {u: self._cache[u] for u in unique}
        _tick(progress, len(triples))
        return [scores[(q, a)] - scores[(q, b)] for q, a, b in triples]


def _tick(progress, n: int) -> None:
    if progress is not None:
        progress.update(n)


def parse_verdict(text: str) -> Letter:
    """A / B / TIE from free text; anything unparseable is a TIE."""
    t = text.strip().upper()
    if re.match(r"^\W*TIE\b", t):
        return "TIE"
    m = re.match(r"^\W*(?:ANSWER\s*)?([AB])\b", t)
    if m:
        return m.group(1)  # type: ignore[return-value]
    found = set(re.findall(r"\b(?:ANSWER\s+)?([AB])\b", t))
    return found.pop() if len(found) == 1 else "TIE"  # type: ignore[return-value]


def make_pairwise_judge(kind: str, model: ChatModel, margin: float = 0.0, max_new_tokens: int = 5) -> Judge:
    if kind == "prompted":
        return PromptedJudge(model, margin)
    if kind == "generate":
        return GenerateJudge(model, max_new_tokens)
    if kind == "likelihood":
        return LikelihoodJudge(model, margin)
    raise ValueError(f"unknown model judge kind {kind!r}; choose prompted, generate or likelihood (program checks "
                     "are prism.judging.verifiers)")


def check_judge(judge: Judge, triples: Sequence[Triple], progress=None) -> SanityCheck:
    """Judge each (query, right, wrong) triple in both orders; calibrate the position bias
    (mean preference for A, which would be 0 for a position-blind judge) and score accuracy."""
    forward = judge.prefer_a(list(triples), progress=progress)
    swapped = judge.prefer_a([(q, w, r) for q, r, w in triples], progress=progress)
    if judge.calibrated and triples:
        judge.bias = (sum(forward) + sum(swapped)) / (2 * len(triples))
    lf = [judge.letter(s) for s in forward]
    ls = [judge.letter(s) for s in swapped]
    credit = [((f == "A") + (s == "B")) / 2 for f, s in zip(lf, ls)]  # per pair: 0, 0.5 or 1
    consistent = sum((f == "A" and s == "B") or (f == "B" and s == "A") or (f == s == "TIE") for f, s in zip(lf, ls))
    return sanity_result(judge.name, credit, position_bias=round(judge.bias, 4),
                         consistency=round(consistent / len(triples), 4) if triples else None)
