"""One sanity check for every judge: can it tell an answer to the question from an answer to
another question? Pairs with a known right answer, and the result type all judges report."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Sequence

Triple = tuple[str, str, str]  # (query, answer_a, answer_b) / (query, right answer, wrong answer)


@dataclass
class SanityCheck:
    """How well a judge tells an answer to the query from an answer to another query."""

    judge: str
    pairs: int
    accuracy: float | None  # share of judgments that prefer the right answer (ties count half)
    ci95: tuple[float, float] | None  # Wilson interval over pairs
    passed: bool  # the CI lies above chance
    position_bias: float = 0.0  # pairwise judges: mean preference for the first position
    consistency: float | None = None  # pairwise judges: share of pairs whose two orders agree

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci95"] = list(self.ci95) if self.ci95 is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "SanityCheck":
        fields = {k: data.get(k) for k in ("judge", "pairs", "accuracy", "ci95", "passed")}
        fields["ci95"] = tuple(fields["ci95"]) if fields["ci95"] is not None else None
        return cls(**fields, position_bias=data.get("position_bias", 0.0), consistency=data.get("consistency"))


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def mismatched_pairs(items: Sequence[tuple[str, str, str]], n: int, seed: int) -> list[Triple]:
    """(query, its answer, an answer to another query) from items (query, answer, group); the
    other query comes from another group (persona) when there is one."""
    rng = random.Random(seed)
    if len(items) < 2 or n <= 0:
        return []
    picks = rng.sample(range(len(items)), min(n, len(items)))
    out = []
    for i in picks:
        q, a, group = items[i]
        others = [j for j in range(len(items)) if j != i and items[j][2] != group] or \
                 [j for j in range(len(items)) if j != i]
        out.append((q, a, items[rng.choice(others)][1]))
    return out


def sanity_result(judge: str, credit: Sequence[float], position_bias: float = 0.0,
                  consistency: float | None = None, round_credit: bool = False) -> SanityCheck:
    """A SanityCheck from per-pair credit (1 right, 0.5 tie, 0 wrong)."""
    n = len(credit)
    if n == 0:
        return SanityCheck(judge, 0, None, None, False, position_bias, consistency)
    wins = sum(credit)
    lo, hi = wilson(int(round(wins)) if round_credit else wins, n)
    return SanityCheck(judge, n, round(wins / n, 4), (round(lo, 4), round(hi, 4)), lo > 0.5, position_bias,
                       consistency)
