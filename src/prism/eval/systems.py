"""The four systems compared by `prism eval`, built from one run directory (or one model).

  base     the model, no persona, adapter off
  persona  expert prompting: the persona matched to the item's category, adapter off
  ungated  adapter always on (the paper's SFT baseline), no persona
  prism    the gate decides per conversation, no persona

All four share one loaded model: the adapter is a switch, so a system change costs nothing.
A system turns items into cells (persona and route); the scoring itself is prism.bench.scoring's.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from prism.bench.data import DEFAULT_PERSONA_MAP, Item
from prism.bench.scoring import Cell
from prism.model import ChatModel
from prism.contexts import ContextRegistry

SYSTEMS = ("base", "persona", "ungated", "prism")


class Systems:
    def __init__(self, model: ChatModel, prism=None, registry: ContextRegistry | None = None,
                 persona_map: dict[str, str] | None = None, persona_length: str = "long", placement: str = "system"):
        self.model = model
        self.prism = prism  # a PrismModel sharing `model`, or None (base/persona only)
        self.registry = registry or ContextRegistry.builtin()
        self.persona_map = {**DEFAULT_PERSONA_MAP, **(persona_map or {})}
        self.persona_length = persona_length
        self.placement = placement
        for name in self.persona_map.values():
            self.registry.get(name)  # unknown persona names fail now, not mid-run
        # The adapter's variant name in cache keys: which run's adapter produced a row.
        self.adapter_variant: str | None = None
        if prism is not None:
            tag = f"{prism.run_dir.resolve() if prism.run_dir else ''}|{prism.created}"
            self.adapter_variant = "adapter:" + hashlib.sha1(tag.encode()).hexdigest()[:12]

    @property
    def available(self) -> tuple[str, ...]:
        return SYSTEMS if self.prism is not None else ("base", "persona")

    def persona_name(self, item: Item) -> str | None:
        return self.persona_map.get(item.category)

    def persona_text(self, item: Item) -> str | None:
        name = self.persona_name(item)
        return self.registry.get(name).text(self.persona_length) if name else None

    def routes(self, system: str, conversations: Sequence[Sequence[dict]]) -> list[dict]:
        """The adapter per conversation (None: base), with the gate's probability for `prism`."""
        if system not in self.available:
            raise ValueError(f"system {system!r} needs a run directory (available: {', '.join(self.available)})")
        if system in ("base", "persona"):
            return [{"adapter": None, "score": None}] * len(conversations)
        if system == "ungated":  # the paper's SFT baseline: one adapter, always on
            return [{"adapter": self.prism.only_adapter(), "score": None}] * len(conversations)
        return [{"adapter": r.adapter, "score": r.probability} for r in self.prism.route(conversations)]

    def cells(self, system: str, items: Sequence[Item], routing: Sequence[Sequence[dict]]) -> list[Cell]:
        """The items as this system sees them, routed on the `routing` conversations."""
        persona = system == "persona"
        return [Cell(it, self.persona_text(it) if persona else None, self.placement, route,
                     persona_name=self.persona_name(it) if persona else None)
                for it, route in zip(items, self.routes(system, routing))]
