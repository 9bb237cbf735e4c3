"""Typed records passed between stages; each is one JSON line in the run directory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

Letter = Literal["A", "B", "TIE"]
T = TypeVar("T", bound="Record")


@dataclass
class Record:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in fields(cls)}
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{cls.__name__} row is missing {missing}: {str(data)[:120]}")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class QueryRecord(Record):
    """Stage 1: a query the model wrote for `persona`."""

    id: str
    persona: str
    text: str
    n_tokens: int


@dataclass
class AnswerRecord(Record):
    """Stage 2: the same query answered without and with its persona."""

    query_id: str
    persona: str
    query: str
    answer_base: str
    answer_persona: str
    tokens_base: int
    tokens_persona: int


@dataclass
class VerdictRecord(Record):
    """Stage 3: the judge's two verdicts on one pair, with the positions swapped.

    `persona_first` is the verdict when the persona answer is shown as A, `persona_second`
    when it is shown as B. Scores are the judge's preference for A (after calibration);
    label 1 (distill) only if the persona answer wins both orders.
    """

    query_id: str
    persona: str
    judge: str
    persona_first: Letter
    persona_second: Letter
    score_persona_first: float
    score_persona_second: float
    label: int

    @property
    def consistent(self) -> bool:
        return winner(self.persona_first, persona_is="A") == winner(self.persona_second, persona_is="B")


def winner(letter: Letter, persona_is: Literal["A", "B"]) -> str:
    """Translate a letter verdict into 'persona', 'base' or 'tie'."""
    if letter == "TIE":
        return "tie"
    return "persona" if letter == persona_is else "base"


def both_orders_label(persona_first: Letter, persona_second: Letter) -> int:
    """The paper's rule: the persona answer must win in both orders to be distilled."""
    return int(persona_first == "A" and persona_second == "B")
