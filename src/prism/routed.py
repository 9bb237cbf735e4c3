"""The routed model: base model + persona adapter + gate. No persona tokens are ever sent.

For each conversation the gate reads the layer-1 hidden state of the routing prompt (the first
user turn, or the last one with `route_every_turn`) and switches the adapter on or off, without a
reload. In `adapter_mode="swap"` (the default for models whose adapted weights take at most 2 GiB,
`"auto"`) each adapted projection keeps two weight tensors, the
base one and one with the LoRA merged in, and a switch points the layer at one or the other: no
extra matmuls per token, the exact base weights when off, at the memory cost of one more copy of
the adapted projections. `adapter_mode="lora"` keeps PEFT's unmerged LoRA path behind a flag.
When the routing prompt is the whole request (a single user turn), the gate is computed inside
the forward pass that serves the request: a hook on decoder layer 0 reads its output (which the
adapter never changes, since it skips layer 0) and sets the adapter before layer 1 runs."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from prism.gate import Gate
from prism.model import ChatModel
from prism.run import RunDir

log = logging.getLogger(__name__)


@dataclass
class Route:
    adapter: bool
    score: float | None  # None when the route was forced
    threshold: float
    forced: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ChatReply:
    text: str
    route: Route
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict:
        return {"text": self.text, "route": self.route.to_dict(), "usage": {
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}}


SWAP_MAX_BYTES = 2 * 1024**3


def _adapted_bytes(peft_model) -> int:
    """Bytes of the base weights that carry a LoRA: what "swap" mode holds a second copy of."""
    from peft.tuners.lora import LoraLayer

    return sum(m.get_base_layer().weight.nelement() * m.get_base_layer().weight.element_size()
               for m in peft_model.modules() if isinstance(m, LoraLayer))


class PrismModel:
    def __init__(self, model: ChatModel, peft_model, gate: Gate, run_dir: Path | None = None,
                 route_every_turn: bool = False, adapter_mode: str = "auto"):
        if adapter_mode not in ("auto", "swap", "lora"):
            raise ValueError(f"unknown adapter_mode {adapter_mode!r}; choose auto, swap or lora")
        if peft_model is None:  # gate only (router mode): there are no weights to swap
            adapter_mode = "lora"
        elif adapter_mode == "auto":  # the extra copy is fine for small models, not for a 7B on a 24 GB GPU
            adapter_mode = "swap" if _adapted_bytes(peft_model) <= SWAP_MAX_BYTES else "lora"
        self.model = model
        self.peft_model = peft_model
        self.gate = gate
        self.run_dir = run_dir
        self.created: str | None = None  # the run's creation time: with run_dir, names this adapter
        self.route_every_turn = route_every_turn
        self.adapter_mode = adapter_mode
        self.decisions: list[dict] = []  # recent routing decisions, for inspection
        self._swap: list[tuple] | None = self._merged_weights() if adapter_mode == "swap" else None
        self.adapter_on = True  # PEFT's state after loading
        if self._swap is not None:
            self.set_adapter(False)

    @classmethod
    def load(cls, run_dir: str | Path, model: ChatModel | None = None, route_every_turn: bool = False,
             adapter_mode: str = "auto", **model_overrides) -> "PrismModel":
        """Load a finished run: its base model (or `model`), `adapter/` and `gate/`.
        `adapter_mode`: "swap" (merged weights swapped in), "lora" (PEFT's LoRA path) or "auto"
        (default: swap when the extra copy of the adapted weights is at most SWAP_MAX_BYTES)."""
        from peft import PeftModel

        run = RunDir(run_dir).require("gate", "distill")
        if model is None:
            model = run.load_base_model(**model_overrides)
        peft_model = PeftModel.from_pretrained(model.model, str(run.adapter_dir), is_trainable=False)
        peft_model.eval()
        gate = Gate.load(run.gate_dir)
        routed = cls(model, peft_model, gate, run.path, route_every_turn, adapter_mode)
        routed.created = run.manifest.get("created")
        return routed

    # ----- routing ------------------------------------------------------------------------
    def _merged_weights(self) -> list[tuple]:
        """(parameter, base tensor, merged tensor) for every LoRA-adapted layer; afterwards PEFT's
        own LoRA path stays disabled and the weights alone carry the adapter."""
        from peft.tuners.lora import LoraLayer

        out = []
        with torch.no_grad():
            for module in self.peft_model.modules():
                if not isinstance(module, LoraLayer):
                    continue
                base = module.get_base_layer()
                for name in module.active_adapters:
                    if name not in module.lora_A:
                        continue
                    w0 = base.weight.data
                    out.append((base.weight, w0, (w0 + module.get_delta_weight(name).to(w0.dtype)).contiguous()))
        self.peft_model.base_model.disable_adapter_layers()
        return out

    def set_adapter(self, on: bool) -> None:
        if self._swap is not None:
            for param, base, merged in self._swap:
                param.data = merged if on else base
        elif on:
            self.peft_model.base_model.enable_adapter_layers()
        else:
            self.peft_model.base_model.disable_adapter_layers()
        self.adapter_on = on

    def grouped(self, adapters: Sequence[bool]):
        """(adapter on?, row indices) for each route present, with the model switched to that route."""
        for on in (True, False):
            idx = [i for i, a in enumerate(adapters) if a == on]
            if idx:
                self.set_adapter(on)
                yield on, idx

    def routing_prompt(self, messages: Sequence[dict]) -> str:
        users = [m for m in messages if m["role"] == "user"]
        if not users:
            raise ValueError("a conversation needs at least one user message")
        turn = users[-1] if self.route_every_turn else users[0]
        return self.model.user_prompt(turn["content"])

    def route(self, conversations: Sequence[Sequence[dict]]) -> list[Route]:
        """The gate's decision for each conversation, from one layer-0 pass over all of them."""
        return self.route_prompts([self.routing_prompt(c) for c in conversations])

    def route_prompts(self, prompts: Sequence[str]) -> list[Route]:
        """The gate's decision for already-formatted routing prompts (e.g. a raw completion prompt)."""
        feats = self.model.layer1_states(list(prompts), pooling=self.gate.spec.pooling)
        on, scores = self.gate.decide(feats)
        return [Route(bool(o), round(float(s), 4), self.gate.spec.threshold) for o, s in zip(on, scores)]

    @classmethod
    def load_gate_only(cls, run_dir: str | Path) -> "PrismModel":
        """The gate and only the part of the model it reads (embeddings and decoder layer 0): what
        a router in front of another server needs."""
        run = RunDir(run_dir).require("gate")
        return cls(run.load_base_model(first_layers=1), None, Gate.load(run.gate_dir), run.path)

    # ----- chat ------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, adapter: bool | None = None) -> ChatReply:
        """Reply to one conversation. `adapter=True/False` forces the route."""
        return self.chat_batch([messages], max_new_tokens, temperature, top_p, seed, adapter)[0]

    def chat_batch(self, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 256,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   adapter: bool | None = None) -> list[ChatReply]:
        """Reply to many conversations: routed in one pass, then generated in two groups."""
        prompts = [self.model.prompt(c) for c in conversations]
        if adapter is not None:
            routes = [Route(adapter, None, self.gate.spec.threshold, forced=True) for _ in conversations]
        else:
            routes = self.route(conversations)
        replies: list[ChatReply | None] = [None] * len(conversations)
        for _, idx in self.grouped([r.adapter for r in routes]):
            gens = self.model.generate([prompts[i] for i in idx], max_new_tokens, temperature, top_p, seed=seed)
            for i, g in zip(idx, gens):
                replies[i] = ChatReply(g.text, routes[i], self._count(prompts[i]), g.n_tokens)
        self._log(routes)
        return replies  # type: ignore[return-value]

    def _count(self, prompt: str) -> int:
        return len(self.model.token_ids(prompt))

    def _log(self, routes: Sequence[Route]) -> None:
        self.decisions = (self.decisions + [r.to_dict() for r in routes])[-1000:]
