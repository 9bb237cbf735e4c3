"""The four systems compared by `prism eval`, built from one run directory (or one model).

  base     the model, no persona, adapter off
  persona  expert prompting: the persona matched to the item's category, adapter off
  ungated  adapter always on (the paper's SFT baseline), no persona
  prism    the gate decides per conversation, no persona

All four share one loaded model: the adapter is a switch, so a system change costs nothing.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from prism.eval.data import Item
from prism.models import ChatModel
from prism.personas import PersonaRegistry

SYSTEMS = ("base", "persona", "ungated", "prism")
# Which persona is the expert for each category (MT-Bench categories map to themselves).
DEFAULT_PERSONA_MAP = {
    "stem": "stem", "humanities": "humanities", "social_sciences": "humanities", "other": "helpful",
    "harmbench": "safety_monitor", "jailbreak": "safety_monitor", "pku": "safety_monitor",
    "xstest_safe": "safety_monitor", "xstest_unsafe": "safety_monitor",
    "writing": "writing", "roleplay": "roleplay", "reasoning": "reasoning", "math": "math", "coding": "coding",
    "extraction": "extraction",
}
MMLU_INSTRUCTION = "Answer with the letter of the correct option."
MMLU_PREFIX = "The answer is"
LETTERS = "ABCD"


def mmlu_question(item: Item) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"{item.turns[0]}\n\n{options}\n\n{MMLU_INSTRUCTION}"


class Systems:
    def __init__(self, model: ChatModel, prism=None, registry: PersonaRegistry | None = None,
                 persona_map: dict[str, str] | None = None, persona_length: str = "long", placement: str = "system"):
        self.model = model
        self.prism = prism  # a PrismModel sharing `model`, or None (base/persona only)
        self.registry = registry or PersonaRegistry.builtin()
        self.persona_map = {**DEFAULT_PERSONA_MAP, **(persona_map or {})}
        self.persona_length = persona_length
        self.placement = placement
        for cat, name in self.persona_map.items():
            self.registry.get(name)  # unknown persona names fail now, not mid-run

    @property
    def available(self) -> tuple[str, ...]:
        return SYSTEMS if self.prism is not None else ("base", "persona")

    def persona_name(self, item: Item) -> str | None:
        return self.persona_map.get(item.category)

    def persona_text(self, item: Item) -> str | None:
        name = self.persona_name(item)
        return self.registry.get(name).text(self.persona_length) if name else None

    def routes(self, system: str, conversations: Sequence[Sequence[dict]]) -> list[dict]:
        """Adapter on/off per conversation, with the gate score for `prism`."""
        if system not in self.available:
            raise ValueError(f"system {system!r} needs a run directory (available: {', '.join(self.available)})")
        if system in ("base", "persona"):
            return [{"adapter": False, "score": None}] * len(conversations)
        if system == "ungated":
            return [{"adapter": True, "score": None}] * len(conversations)
        return [{"adapter": r.adapter, "score": r.score} for r in self.prism.route(conversations)]

    def _grouped(self, routes: list[dict], fn: Callable[[list[int]], None]) -> None:
        for on in (True, False):
            idx = [i for i, r in enumerate(routes) if r["adapter"] == on]
            if not idx:
                continue
            if self.prism is not None:
                self.prism.set_adapter(on)
            fn(idx)

    def prompts(self, system: str, items: Sequence[Item], conversations: Sequence[Sequence[dict]]) -> list[str]:
        if system == "persona":
            return [self.model.prompt(c, self.persona_text(it), self.placement) for it, c in zip(items, conversations)]
        return [self.model.prompt(c) for c in conversations]

    def generate(self, system: str, items: Sequence[Item], conversations: Sequence[Sequence[dict]],
                 max_new_tokens: int, routes: list[dict] | None = None) -> list[tuple[str, int, dict]]:
        """(text, n_tokens, route) per conversation, greedy."""
        routes = routes or self.routes(system, conversations)
        prompts = self.prompts(system, items, conversations)
        out: list = [None] * len(prompts)

        def run(idx):
            gens = self.model.generate([prompts[i] for i in idx], max_new_tokens, temperature=0.0)
            for i, g in zip(idx, gens):
                out[i] = (g.text, g.n_tokens, routes[i])

        self._grouped(routes, run)
        return out

    def letter_logprobs(self, system: str, items: Sequence[Item], shots: dict[str, list[Item]] | None = None
                        ) -> list[tuple[list[float], dict]]:
        """MMLU: log p(letter) for A-D after the question (zero- or few-shot, chat template)."""
        questions = [[{"role": "user", "content": mmlu_question(it)}] for it in items]
        routes = self.routes(system, questions)  # routed on the question itself
        convs = []
        for it, q in zip(items, questions):
            history: list[dict] = []
            for ex in (shots or {}).get(it.subject or "", []):
                history += [{"role": "user", "content": mmlu_question(ex)},
                            {"role": "assistant", "content": f"{MMLU_PREFIX} {LETTERS[ex.answer]}."}]
            convs.append(history + q)
        prompts = [p + MMLU_PREFIX for p in self.prompts(system, items, convs)]
        letter_ids = [_letter_ids(self.model, L) for L in LETTERS]
        out: list = [None] * len(items)

        def run(idx):
            logp = self.model.next_token_logprobs([prompts[i] for i in idx])
            for row, i in enumerate(idx):
                out[i] = ([float(logp[row, ids].logsumexp(-1)) for ids in letter_ids], routes[i])

        self._grouped(routes, run)
        return out


def _letter_ids(model: ChatModel, letter: str) -> list[int]:
    ids = model.variant_ids(letter)
    if not ids:
        raise ValueError(f"{model.name}: the letter {letter!r} is not a single token")
    return ids


def predicted_letter(logprobs: Sequence[float]) -> int:
    return int(torch.tensor(logprobs).argmax())
