"""The study's settings and its grid: which persona conditions are run on which items.

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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from prism.config import ConfigError, PersonaLength, Placement, _Section, deep_merge

CONTROLS = ("none", "matched", "random")
STUDY_BENCHMARKS = ("mtbench", "mmlu", "safety")


class StudyConfig(_Section):
    personas: list[str] | None = None  # None = every persona in the registry
    persona_dir: str | None = None  # extra/override personas (directory or YAML file)
    lengths: list[PersonaLength] = ["long", "short", "minimal"]
    placements: list[Placement] = ["system", "user"]
    reference_length: PersonaLength = "long"
    reference_placement: Placement = "system"
    cross: Literal["reference", "full"] = "reference"
    random_control: bool = True
    benchmarks: list[Literal["mtbench", "mmlu", "safety"]] = list(STUDY_BENCHMARKS)
    limits: dict[str, int | None] = {}  # per loader: mtbench, mmlu, harmbench, jailbreak, pku; None = all
    mt_turns: int = Field(1, ge=1, le=2)
    mt_max_new_tokens: int = Field(64, ge=1)
    safety_max_new_tokens: int = Field(48, ge=1)
    persona_map: dict[str, str] = {}  # category -> persona overrides (see prism.eval.systems)
    judge: str = "self"  # self | a local model directory / hub id
    judge_url: str | None = None
    judge_model: str | None = None
    judge_key_env: str = "OPENAI_API_KEY"
    refusal: Literal["pattern", "judge"] = "pattern"
    sanity_pairs: int = Field(12, ge=0)
    seed: int = 0
    n_boot: int = Field(2000, ge=100)
    batch_size: int = Field(16, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"  # bfloat16: faster on CPUs with bf16 units
    prefix_cache: bool = True  # prompts sharing a persona prefill it once per batch (same outputs, faster)

    @model_validator(mode="after")
    def _check(self):
        if not self.lengths or not self.placements:
            raise ValueError("lengths and placements must each name at least one value")
        if self.reference_length not in self.lengths:
            raise ValueError(f"reference_length {self.reference_length!r} is not in lengths {self.lengths}")
        if self.reference_placement not in self.placements:
            raise ValueError(f"reference_placement {self.reference_placement!r} is not in placements {self.placements}")
        unknown = set(self.limits) - {"mtbench", "mmlu", "harmbench", "jailbreak", "pku"}
        if unknown:
            raise ValueError(f"unknown limit names {sorted(unknown)}; use mtbench, mmlu, harmbench, jailbreak, pku")
        return self


STUDY_PRESETS: dict[str, dict[str, Any]] = {
    # About 30-35 minutes on the embedded model on 2 CPU cores: 23 distinct persona prompts per item
    # (16 MT-Bench, 60 MMLU and 40 safety items took 57 minutes with another job on the machine).
    "quick": {"limits": {"mtbench": 16, "mmlu": 48, "harmbench": 12, "jailbreak": 8, "pku": 12},
              "mt_turns": 1, "mt_max_new_tokens": 64, "safety_max_new_tokens": 48},
    # The paper's grid on the full sets: every persona at every length and placement.
    "full": {"limits": {"mtbench": None, "mmlu": None, "harmbench": None, "jailbreak": None, "pku": None},
             "cross": "full", "mt_turns": 2, "mt_max_new_tokens": 512, "safety_max_new_tokens": 256,
             "sanity_pairs": 40},
    # Tests: two personas, one length and placement beside the reference, a handful of items.
    "micro": {"personas": ["math", "writing", "safety_monitor"], "lengths": ["long", "minimal"],
              "placements": ["system", "user"], "limits": {"mtbench": 2, "mmlu": 4, "harmbench": 2, "jailbreak": 1,
                                                           "pku": 1},
              "mt_max_new_tokens": 12, "safety_max_new_tokens": 12, "sanity_pairs": 2, "n_boot": 200},
}


def load_study_config(preset: str = "quick", config_file: str | Path | None = None,
                      overrides: dict[str, Any] | None = None) -> StudyConfig:
    """preset -> YAML file -> overrides, validated; errors name the source and the field."""
    if preset not in STUDY_PRESETS:
        raise ConfigError(f"unknown study preset {preset!r}; choose one of {', '.join(STUDY_PRESETS)}")
    data = dict(STUDY_PRESETS[preset])
    source = f"study preset {preset!r}"
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"study config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a study config must be a mapping of settings")
        data = deep_merge(data, loaded)
        source = str(path)
    data = deep_merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return StudyConfig(**data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid study settings ({source}): {problems}") from None


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
