"""Typed records passed between stages; each is one JSON line in the run directory."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Literal, TypeVar

Letter = Literal["A", "B", "TIE"]
T = TypeVar("T", bound="Record")
GENERAL = "_general"  # the source of queries on general topics, which no context serves
SHARED = "adapter"  # the one adapter (and gate class) of `adapters: shared`


@dataclass
class Record:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING]
        if missing:
            raise ValueError(f"{cls.__name__} row is missing {missing}: {str(data)[:120]}")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class QueryRecord(Record):
    """Stage 1: a query the model wrote for the context `persona` (GENERAL: for none)."""

    id: str
    persona: str
    text: str
    n_tokens: int


@dataclass
class AnswerRecord(Record):
    """Stage 2: a query answered without and with the context `persona` (its own context, or with
    `answers.cross` any other); `source` is the context that wrote the query (GENERAL: none)."""

    query_id: str
    persona: str
    query: str
    answer_base: str
    answer_persona: str
    tokens_base: int
    tokens_persona: int
    source: str | None = None  # None: the query's own context (runs written before contexts)

    @property
    def origin(self) -> str:
        return self.source or self.persona


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
    source: str | None = None  # the context that wrote the query (None: `persona`)
    gain: float | None = None  # what the context did to the answer: +1 won both orders ... -1 lost both

    @property
    def origin(self) -> str:
        return self.source or self.persona

    @property
    def value(self) -> float:
        """The gain, derived from the letters for rows written before gains were recorded."""
        if self.gain is not None:
            return self.gain
        return float(self.label) - float(self.persona_first == "B" and self.persona_second == "A")

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
