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
from prism.models import ChatModel, decoder_layers, pool
from prism.run import RunDir, RunError

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
        self.route_every_turn = route_every_turn
        self.adapter_mode = adapter_mode
        self._layer0 = decoder_layers(model.model)[0]
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

        run = RunDir(run_dir)
        for stage in ("gate", "distill"):
            if run.status(stage) != "done":
                raise RunError(f"{run.path}: stage {stage!r} is not finished; run `prism run --out {run.path}` first")
        if model is None:
            from prism.pipeline import model_from_config

            config = run.config()
            if model_overrides:
                config = config.model_copy(update=model_overrides)
            model = model_from_config(config)
        peft_model = PeftModel.from_pretrained(model.model, str(run.path / "adapter"), is_trainable=False)
        peft_model.eval()
        gate = Gate.load(run.path / "gate")
        return cls(model, peft_model, gate, run.path, route_every_turn, adapter_mode)

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

    def _route_in_pass_hook(self, holder: dict):
        """A layer-0 hook that routes from the prefill of a single unpadded request."""

        def hook(_module, _inputs, output):
            if "route" in holder:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            on, score = self.gate.decide(pool(hidden, mask, self.gate.spec.pooling).float().cpu())
            holder["route"] = Route(bool(on[0]), round(float(score[0]), 4), self.gate.spec.threshold)
            self.set_adapter(holder["route"].adapter)  # before layer 1 runs
            return None

        return hook

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
        single = len(conversations) == 1 and adapter is None and prompts[0] == self.routing_prompt(conversations[0])
        if single:
            return [self._chat_single_pass(prompts[0], max_new_tokens, temperature, top_p, seed)]
        if adapter is not None:
            routes = [Route(adapter, None, self.gate.spec.threshold, forced=True) for _ in conversations]
        else:
            routes = self.route(conversations)
        replies: list[ChatReply | None] = [None] * len(conversations)
        for on in (True, False):
            idx = [i for i, r in enumerate(routes) if r.adapter == on]
            if not idx:
                continue
            self.set_adapter(on)
            gens = self.model.generate([prompts[i] for i in idx], max_new_tokens, temperature, top_p, seed=seed)
            for i, g in zip(idx, gens):
                replies[i] = ChatReply(g.text, routes[i], self._count(prompts[i]), g.n_tokens)
        self._log(routes)
        return replies  # type: ignore[return-value]

    def _chat_single_pass(self, prompt: str, max_new_tokens, temperature, top_p, seed) -> ChatReply:
        holder: dict = {}
        handle = self._layer0.register_forward_hook(self._route_in_pass_hook(holder))
        try:
            gen = self.model.generate([prompt], max_new_tokens, temperature, top_p, seed=seed)[0]
        finally:
            handle.remove()
        self._log([holder["route"]])
        return ChatReply(gen.text, holder["route"], self._count(prompt), gen.n_tokens)

    def _count(self, prompt: str) -> int:
        return len(self.model.token_ids(prompt))

    def _log(self, routes: Sequence[Route]) -> None:
        self.decisions = (self.decisions + [r.to_dict() for r in routes])[-1000:]
