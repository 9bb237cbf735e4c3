"""What every stage receives: the config, the model, the personas, the run directory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tqdm.auto import tqdm

from prism.config import PrismConfig
from prism.model import ChatModel
from prism.contexts import Context
from prism.run import RunDir


@dataclass
class StageContext:
    config: PrismConfig
    model: ChatModel
    personas: list[Context]
    run: RunDir
    quiet: bool = False
    # The engine's teacher pass for stage 5, when the generating engine has one (vLLM's prompt
    # log-probabilities): (examples, k, progress) -> the top-k cache; None: torch computes it.
    teacher: Callable | None = None

    def persona_text(self, persona: Context) -> str:
        return persona.text(self.config.persona_length)

    def persona_by_name(self, name: str) -> Context:
        found = [p for p in self.personas if p.name == name]
        if not found:
            raise KeyError(f"persona {name!r} is not part of this run")
        return found[0]

    def progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=self.quiet, dynamic_ncols=True, leave=False)
