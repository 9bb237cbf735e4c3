"""What every stage receives: the config, the model, the personas, the run directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tqdm.auto import tqdm

from prism.config import PrismConfig
from prism.models import ChatModel
from prism.personas import Persona
from prism.run import RunDir


@dataclass
class StageContext:
    config: PrismConfig
    model: ChatModel
    personas: list[Persona]
    run: RunDir
    quiet: bool = False
    judge_model_factory: Callable[[], ChatModel] | None = field(default=None, repr=False)

    def persona_text(self, persona: Persona) -> str:
        return persona.text(self.config.persona_length)

    def persona_by_name(self, name: str) -> Persona:
        for p in self.personas:
            if p.name == name:
                return p
        raise KeyError(f"persona {name!r} is not part of this run")

    def progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=self.quiet, dynamic_ncols=True, leave=False)
