"""The study's grid: which persona conditions are run on which items (settings: prism.config.StudyConfig).

A condition is (persona, length, placement). The persona is one of
  none      no persona (the baseline every effect is measured against)
  <name>    a persona from the registry, the same for every item
  matched   per item, the expert for the item's category (oracle routing, the paper's Expert Prompting)
  random    per item, a persona drawn at random among the OTHER personas (never the matched one): the
            control that separates "an expert context helps" from "any context helps"

`cross: reference` (the quick grid) runs every named persona at the reference length and placement
only (enough for the persona x task heatmap), and the matched/random controls at every length x
placement (enough for the length and placement effects). `cross: full` runs every persona everywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import product

from prism.config import StudyConfig

CONTROLS = ("none", "matched", "random")


@dataclass(frozen=True, order=True)
class Condition:
    persona: str  # none | matched | random | a registry name
    length: str | None = None  # None for `none`
    placement: str | None = None

    @property
    def label(self) -> str:
        return "none" if self.persona == "none" else f"{self.persona}/{self.length}/{self.placement}"


NONE = Condition("none")


def expand_grid(cfg: StudyConfig, persona_names: list[str]) -> list[Condition]:
    """Every condition of the study, each once, in a stable order."""
    if not persona_names:
        raise ValueError("the study needs at least one persona")
    clash = set(persona_names) & set(CONTROLS)
    if clash:
        raise ValueError(f"persona names {sorted(clash)} are reserved for the study's controls")
    cells = list(product(cfg.lengths, cfg.placements))
    ref = [(cfg.reference_length, cfg.reference_placement)]
    controls = ["matched"] + (["random"] if cfg.random_control else [])
    out = [NONE]
    out += [Condition(p, L, P) for p in persona_names for L, P in (cells if cfg.cross == "full" else ref)]
    out += [Condition(c, L, P) for c in controls for L, P in cells]
    seen: set[Condition] = set()
    return [c for c in out if not (c in seen or seen.add(c))]


def random_persona(item_id: str, matched: str | None, names: list[str], seed: int) -> str:
    """A persona other than the item's matched one, fixed per (item, seed) so every length and
    placement compares against the same draw."""
    pool = sorted(n for n in names if n != matched)
    if not pool:
        raise ValueError(f"no persona other than the matched one ({matched!r}) to draw the random control from")
    h = int(hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest(), 16)
    return pool[h % len(pool)]


def persona_for(cond: Condition, item_id: str, category: str, persona_map: dict[str, str], names: list[str],
                seed: int) -> str | None:
    """The registry name this condition puts in front of this item (None = no persona)."""
    if cond.persona == "none":
        return None
    matched = persona_map.get(category)
    if cond.persona == "matched":
        if matched is None:
            raise ValueError(f"category {category!r} has no matched persona; add it to persona_map")
        return matched
    if cond.persona == "random":
        return random_persona(item_id, matched, names, seed)
    return cond.persona
