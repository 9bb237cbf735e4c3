"""The routed model: base model + one or several context adapters + the gate. No context tokens are
ever sent.

For each conversation the gate reads the layer-1 hidden state of the routing prompt (the first
user turn, or the last one with `route_every_turn`) and picks the base model or an adapter, without
a reload. A gate class with several adapters (two users' memories: no content tells them apart) is
resolved by the request naming one (`context`); without a name it is served by the base model.
In `adapter_mode="swap"` (the default for models whose adapted weights take at most 2 GiB per
adapter, `"auto"`) each adapted projection keeps its base tensor and one merged tensor per adapter,
and a switch points the layer at one of them: no extra matmuls per token and the exact base
weights when off. `adapter_mode="lora"` keeps PEFT's named LoRA adapters and switches between them.
The gate's layer-0 pass costs about 0.07% of a 128-token reply (benchmarks/routing_overhead.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from prism.gate import BASE, Gate
from prism.model import ChatModel
from prism.run import RunDir

log = logging.getLogger(__name__)


@dataclass
class Route:
    """Which adapter serves a request (None: the base model), and why."""

    adapter: str | None
    probability: float | None = None  # the gate's probability of the chosen class (None: forced)
    runner_up: str | None = None  # the next most likely class, and its probability
    runner_up_probability: float | None = None
    rule: str = "gate"  # gate | constant (the gate did not beat a constant rule) | forced | needs a context name
    gate_class: str | None = None  # the class the gate chose (None: forced); several contexts may share it

    @property
    def forced(self) -> bool:
        return self.rule == "forced"

    @property
    def name(self) -> str:
        return self.adapter or BASE

    def to_dict(self) -> dict:
        return {**asdict(self), "route": self.name, "forced": self.forced}


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
# Torch's threads in a process that serves on the in-process llama.cpp engine: the gate's layer-0
# pass needs no more, and once torch has a team of OpenMP threads beside llama.cpp's, the threads
# outnumber the cores and OpenMP stops llama.cpp's from spinning between decode steps (one stream,
# embedded model, 2 cores: 97 tok/s with one torch thread, 57 with two; benchmarks/engines.py).
ENGINE_TORCH_THREADS = 1


def _adapted_bytes(peft_model) -> int:
    """Bytes of the base weights that carry a LoRA: what "swap" mode holds a copy of per adapter."""
    from peft.tuners.lora import LoraLayer

    return sum(m.get_base_layer().weight.nelement() * m.get_base_layer().weight.element_size()
               for m in peft_model.modules() if isinstance(m, LoraLayer))


class PrismModel:
    def __init__(self, model: ChatModel, peft_model, gate: Gate, run_dir: Path | None = None,
                 route_every_turn: bool = False, adapter_mode: str = "auto"):
        if adapter_mode not in ("auto", "swap", "lora"):
            raise ValueError(f"unknown adapter_mode {adapter_mode!r}; choose auto, swap or lora")
        self.adapters: list[str] = list(peft_model.peft_config) if peft_model is not None else []
        if peft_model is None:  # gate only (router mode): there are no weights to swap
            adapter_mode = "lora"
        elif adapter_mode == "auto":  # the extra copies are fine for small models, not for a 7B on a 24 GB GPU
            adapter_mode = "swap" if len(self.adapters) * _adapted_bytes(peft_model) <= SWAP_MAX_BYTES else "lora"
        self.model = model
        self.peft_model = peft_model
        self.gate = gate
        self.run_dir = run_dir
        self.created: str | None = None  # the run's creation time: with run_dir, names these adapters
        self.route_every_turn = route_every_turn
        self.adapter_mode = adapter_mode
        self.members: dict[str, list[str]] = gate.spec.members or {c: [c] for c in gate.spec.classes if c != BASE}
        self.decisions: list[dict] = []  # recent routing decisions, for inspection
        self.engine = None  # a LlamaCppEngine that generates instead of `model` (load_on_engine)
        self._swap = self._merged_weights() if adapter_mode == "swap" else None
        self.active: str | None = self.adapters[0] if self.adapters else None  # PEFT's state after loading
        if peft_model is not None:
            self.set_adapter(None)

    @classmethod
    def load(cls, run_dir: str | Path, model: ChatModel | None = None, route_every_turn: bool = False,
             adapter_mode: str = "auto", **model_overrides) -> "PrismModel":
        """Load a finished run: its base model (or `model`), its adapters and `gate/`.
        `adapter_mode`: "swap" (merged weights swapped in), "lora" (PEFT's LoRA path) or "auto"
        (default: swap when the extra copies of the adapted weights take at most SWAP_MAX_BYTES)."""
        from peft import PeftModel

        run = RunDir(run_dir).require("gate", "distill")
        if model is None:
            model = run.load_base_model(**model_overrides)
        names = run.finished_adapters()
        peft_model = PeftModel.from_pretrained(model.model, str(run.adapter_path(names[0])), adapter_name=names[0],
                                               is_trainable=False)
        for name in names[1:]:
            peft_model.load_adapter(str(run.adapter_path(name)), adapter_name=name, is_trainable=False)
        peft_model.eval()
        routed = cls(model, peft_model, Gate.load(run.gate_dir), run.path, route_every_turn, adapter_mode)
        routed.created = run.manifest.get("created")
        return routed

    @classmethod
    def load_gate_only(cls, run_dir: str | Path) -> "PrismModel":
        """The gate and only the part of the model it reads (embeddings and decoder layer 0): what
        a router in front of another server needs."""
        run = RunDir(run_dir).require("gate")
        routed = cls(run.load_base_model(first_layers=1), None, Gate.load(run.gate_dir), run.path)
        routed.adapters = run.finished_adapters()
        return routed

    @classmethod
    def load_on_engine(cls, run_dir: str | Path, gguf: str | None = None, slots: int = 16,
                       context: int | None = None, torch_threads: int | None = ENGINE_TORCH_THREADS) -> "PrismModel":
        """The gate in torch (embeddings and decoder layer 0 only), every reply generated by the
        llama.cpp engine: the run's base model as a GGUF (`gguf`, or the embedded model's float
        copy) and its adapters as LoRA GGUFs, one chosen per request by its scale. `context`: the
        tokens of one conversation (prompt and reply; None: the model's, at most llamacpp.SERVE_CONTEXT).
        Sets this process's torch threads to `torch_threads` (see ENGINE_TORCH_THREADS; None:
        unchanged)."""
        if torch_threads:
            torch.set_num_threads(torch_threads)
        run = RunDir(run_dir).require("gate", "distill")
        routed = cls.load_gate_only(run.path)
        from prism.model.llamacpp import SERVE_CONTEXT

        context = context or min(routed.model.context_length, SERVE_CONTEXT)
        routed.engine = run_on_engine(run, "llamacpp", routed.model, gguf, slots=slots, context=context)
        routed.created = run.manifest.get("created")
        return routed

    # ----- switching adapters --------------------------------------------------------------------
    def _merged_weights(self) -> list[tuple]:
        """(parameter, base tensor, {adapter: merged tensor}) for every LoRA-adapted layer; afterwards
        PEFT's own LoRA path stays disabled and the weights alone carry the adapter."""
        from peft.tuners.lora import LoraLayer

        out = []
        with torch.no_grad():
            for module in self.peft_model.modules():
                if not isinstance(module, LoraLayer):
                    continue
                w0 = module.get_base_layer().weight.data
                merged = {name: (w0 + module.get_delta_weight(name).to(w0.dtype)).contiguous()
                          for name in self.adapters if name in module.lora_A}
                out.append((module.get_base_layer().weight, w0, merged))
        self.peft_model.base_model.disable_adapter_layers()
        return out

    def set_adapter(self, name: str | None) -> None:
        """Serve with the adapter `name` (None: the exact base model). True means the only adapter."""
        if name is True:
            name = self.only_adapter()
        if name not in (None, False) and name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; this run has {', '.join(self.adapters)}")
        name = name or None
        if self._swap is not None:
            for param, base, merged in self._swap:
                param.data = merged.get(name, base) if name else base
        elif self.peft_model is not None:
            if name is None:
                self.peft_model.base_model.disable_adapter_layers()
            else:
                self.peft_model.base_model.enable_adapter_layers()
                self.peft_model.base_model.set_adapter(name)
        self.active = name

    def only_adapter(self) -> str:
        if len(self.adapters) != 1:
            raise ValueError(f"this run has {len(self.adapters)} adapters ({', '.join(self.adapters)}); name one")
        return self.adapters[0]

    def grouped(self, adapters: Sequence[str | None]):
        """(adapter, row indices) for each route present, with the model switched to it."""
        for name in dict.fromkeys(adapters):
            idx = [i for i, a in enumerate(adapters) if a == name]
            self.set_adapter(name)
            yield name, idx

    # ----- routing ----------------------------------------------------------------------------
    def routing_prompt(self, messages: Sequence[dict]) -> str:
        users = [m for m in messages if m["role"] == "user"]
        if not users:
            raise ValueError("a conversation needs at least one user message")
        turn = users[-1] if self.route_every_turn else users[0]
        return self.model.user_prompt(turn["content"])

    def route(self, conversations: Sequence[Sequence[dict]], contexts: Sequence[str | None] | None = None
              ) -> list[Route]:
        """The gate's decision for each conversation, from one layer-0 pass over all of them."""
        return self.route_prompts([self.routing_prompt(c) for c in conversations], contexts)

    def class_of(self, adapter: str) -> str:
        for cls_, names in self.members.items():
            if adapter in names:
                return cls_
        raise ValueError(f"unknown context {adapter!r}; this run has {', '.join(self.adapters)}")

    def warm_up(self) -> None:
        """One gate pass on a short conversation: torch's first call on a new shape picks and
        prepares its kernels (seconds on a CPU), which a server should not charge its first client."""
        self.route([[{"role": "user", "content": "Hello!"}]])

    def route_prompts(self, prompts: Sequence[str], contexts: Sequence[str | None] | None = None) -> list[Route]:
        """The gate's decision for already-formatted routing prompts. A row naming a context (a
        member of a gate class) is decided between that context and the base model only."""
        contexts = list(contexts or [None] * len(prompts))
        spec = self.gate.spec
        choice, probs = self.gate.decide(self.model.layer1_states(list(prompts), pooling=spec.pooling))
        out = []
        for i, (c, p) in enumerate(zip(choice.tolist(), probs)):
            rule = "constant" if spec.constant is not None else "gate"
            if contexts[i] is not None:  # named: that context's class against the base model only
                k = spec.classes.index(self.class_of(contexts[i]))
                if spec.constant is not None:
                    c = k if spec.constant == spec.classes[k] else 0
                else:
                    bias = spec.biases[k] if spec.biases else 0.0
                    c = k if math.log(max(float(p[k]), 1e-12)) + bias > math.log(max(float(p[0]), 1e-12)) else 0
            order = p.argsort(descending=True).tolist()
            runner = next(j for j in order if j != c)
            cls_ = spec.classes[c]
            members = self.members.get(cls_, [])
            adapter = None if c == 0 else contexts[i] if contexts[i] in members else members[0] if len(members) == 1 else None
            if c != 0 and adapter is None:
                rule = "needs a context name"  # several contexts share this class: the request must choose
            out.append(Route(adapter, round(float(p[c]), 4), spec.classes[runner], round(float(p[runner]), 4), rule,
                             cls_))
        return out

    # ----- chat ------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, adapter: bool | str | None = None,
             context: str | None = None) -> ChatReply:
        """Reply to one conversation. `adapter` forces the route (an adapter name; True: the only
        adapter; False: the base model); `context` names the member of a gate class to use."""
        return self.chat_batch([messages], max_new_tokens, temperature, top_p, seed, adapter, context)[0]

    def chat_batch(self, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 256,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   adapter: bool | str | None = None, context: str | None = None) -> list[ChatReply]:
        """Reply to many conversations: routed in one pass, then generated in one group per route."""
        prompts = [self.model.prompt(c) for c in conversations]
        if adapter is not None:
            name = self.only_adapter() if adapter is True else adapter or None
            routes = [Route(name, rule="forced") for _ in conversations]
        else:
            routes = self.route(conversations, [context] * len(conversations))
        replies: list[ChatReply | None] = [None] * len(conversations)
        for name, idx in self.grouped([r.adapter for r in routes]):
            if self.engine is not None:
                gens = self.engine.generate([prompts[i] for i in idx], max_new_tokens, temperature, top_p, seed=seed,
                                            adapter=name)
            else:
                gens = self.model.generate([prompts[i] for i in idx], max_new_tokens, temperature, top_p, seed=seed)
            for i, g in zip(idx, gens):
                replies[i] = ChatReply(g.text, routes[i], self._count(prompts[i]), g.n_tokens)
        self.set_adapter(None)
        self._log(routes)
        return replies  # type: ignore[return-value]

    def _count(self, prompt: str) -> int:
        return len(self.model.token_ids(prompt))

    def _log(self, routes: Sequence[Route]) -> None:
        self.decisions = (self.decisions + [r.to_dict() for r in routes])[-1000:]


def run_on_engine(run: RunDir, engine: str, local: ChatModel, gguf: str | None = None, vllm_args=(),
                  slots: int = 16, context: int | None = None):
    """A finished run's base model and adapters on `engine` (llamacpp: the model's GGUF and the
    adapters as LoRA GGUFs; vllm: a child server with them exported and loaded as named LoRAs),
    generating like `ChatModel.generate` with `adapter=` choosing one per call; None when the
    engine is torch. `local` (the run's ChatModel, or its gate-only part) lends its tokenizer."""
    from prism.model.engines import pick_engine

    config = run.config()
    engine = pick_engine(engine, config.model, gguf, config.device, job="bulk")
    if engine == "llamacpp":
        from prism.model.llamacpp import LlamaCppEngine, adapter_ggufs, model_gguf

        base = model_gguf(config.model, gguf)
        return LlamaCppEngine(base, adapter_ggufs(run, base), slots=slots, context=context, name=local.name,
                              tokenize=local.token_ids)
    if engine == "vllm":
        from prism.export import cached_exports, upstream_names
        from prism.model.loading import weights_location
        from prism.model.vllm import VllmEngine, VllmServer

        names = upstream_names(run.finished_adapters())
        server = VllmServer(weights_location(config.model), loras=cached_exports(run, names), args=vllm_args)
        return VllmEngine(server, adapters=names)
    return None
