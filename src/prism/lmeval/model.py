"""The lm-eval model `prism`: a finished run, each request routed on its own.

    --model prism --model_args run=RUN_DIR[,mode=gated|base|adapter][,adapter=NAME]

`gated` (the default) lets the gate choose per request, `base` turns every adapter off, `adapter`
forces one (`adapter=NAME`, or the run's only adapter). The gate reads the request's context (the
prompt without the continuation; a rolling log-likelihood has none and reads its text). A context
that lm-eval built with this model's chat template (`--apply_chat_template`) is routed the way
`prism serve` and `prism eval` route a conversation: on its first user turn as the gate saw such
prompts in training, not on a system instruction or an assistant prefix. Requests are then scored
or generated in one group per route, with the shared scoring code of prism.model.

`results[...]["config"]["prism"]` (in lm-eval's results file) records the mode and, per task, the
share of documents that took each route.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from prism.gate import BASE
from prism.lmeval import MODEL_NAME
from prism.routed import PrismModel

log = logging.getLogger(__name__)

MODES = ("gated", "base", "adapter")


@register_model(MODEL_NAME)
class PrismLM(LM):
    def __init__(self, run: str | None = None, mode: str = "gated", adapter: str | None = None,
                 batch_size: int | str = 8, device: str | None = None, max_gen_toks: int = 256,
                 route_every_turn: bool = False, max_batch_size: int | None = None):
        super().__init__()
        if not run:
            raise ValueError("the prism model needs a finished run: --model_args run=RUN_DIR")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose {', '.join(MODES)}")
        if adapter and mode != "adapter":
            raise ValueError("adapter=NAME goes with mode=adapter")
        overrides: dict = {}
        if str(batch_size).isdigit():  # lm-eval's "auto" keeps the run's own batch size
            overrides["batch_size"] = int(batch_size)
        if device:
            if device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's default is cuda:0
                log.warning("no CUDA device here: the prism model runs on the run's device, not %s", device)
            else:
                overrides["device"] = device
        self.prism = PrismModel.load(run, route_every_turn=route_every_turn, **overrides)
        self.chat = self.prism.model
        self.mode = mode
        self.forced = None if mode != "adapter" else (adapter or self.prism.only_adapter())
        if self.forced is not None and self.forced not in self.prism.adapters:
            raise ValueError(f"unknown adapter {adapter!r}; this run has {', '.join(self.prism.adapters)}")
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = int(getattr(self.chat.model.config, "max_position_embeddings", None) or 2048)
        tok = self.chat.tokenizer
        self.prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.routing_prompts: dict[str, str] = {}  # chat-templated context -> the prompt the gate reads
        self.doc_routes: dict[str, dict[int, str]] = {}  # task -> document -> route name

    # ----- routing ------------------------------------------------------------------------------
    def _routes(self, requests: Sequence, texts: Sequence[str]) -> list[str | None]:
        """The adapter (None: base) for each request, the gate reading each distinct text once."""
        if self.mode == "gated":
            unique = list(dict.fromkeys(texts))
            found = self.prism.route_prompts([self.routing_prompts.get(t, t) for t in unique])
            by_text = {t: r for t, r in zip(unique, found)}
            names = [by_text[t].name for t in texts]
            adapters = [by_text[t].adapter for t in texts]
        else:
            adapters = [self.forced] * len(texts)
            names = [a or BASE for a in adapters]
        for req, name in zip(requests, names):
            self.doc_routes.setdefault(req.task_name or "", {})[req.doc_id] = name
        return adapters

    def route_shares(self) -> dict[str, dict]:
        out = {}
        for task, docs in sorted(self.doc_routes.items()):
            counts = Counter(docs.values())
            out[task] = {"documents": len(docs), "shares": {k: round(v / len(docs), 4) for k, v in sorted(counts.items())}}
        return out

    def get_model_info(self) -> dict:
        """Merged into lm-eval's results["config"]: the run, the mode and the route shares per task."""
        return {"prism": {"run": str(self.prism.run_dir), "mode": self.mode, "adapter": self.forced,
                          "model": self.chat.name, "adapters": self.prism.adapters, "routes": self.route_shares()}}

    # ----- chat template ------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.chat.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.chat.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The model's chat template over lm-eval's turns (an assistant prefix is continued); a system
        instruction goes where ChatModel puts a persona (the user turn if the template has no system role)."""
        system = chat_history[0]["content"] if chat_history and chat_history[0]["role"] == "system" else None
        turns = chat_history[1:] if system is not None else chat_history
        text = self.chat.prompt(turns, persona=system, continue_last=not add_generation_prompt)
        if self.mode == "gated" and any(m["role"] == "user" for m in turns):
            self.routing_prompts[text] = self.prism.routing_prompt(turns)
        return text

    # ----- scoring --------------------------------------------------------------------------------
    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a (context, continuation) request: each text tokenized on its own, as prism's
        scorers do; trailing spaces of the context move to the continuation (lm-eval's convention);
        an empty context is the BOS (or EOS) token; a long context loses its start."""
        stripped = context.rstrip()
        continuation, context = context[len(stripped):] + continuation, stripped
        cont = self.chat.token_ids(continuation)
        if not cont:
            raise ValueError(f"nothing to score: the continuation {continuation!r} has no tokens")
        ctx = self.chat.token_ids(context) or [self.prefix_id]
        return ctx[-max(1, self.max_length - len(cont)):], cont[-(self.max_length - 1):]

    def _score(self, pieces: list[tuple[list[int], list[int]]], adapters: list[str | None], desc: str) -> list:
        """TokenScores of each piece, computed in one group per route."""
        out: list = [None] * len(pieces)
        with tqdm(total=len(pieces), desc=desc, leave=False, disable=len(pieces) < 2) as bar:
            for _, idx in self.prism.grouped(adapters):
                for i, s in zip(idx, self.chat.score_tokens([pieces[i] for i in idx], progress=bar)):
                    out[i] = s
        self.prism.set_adapter(None)
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        args = [r.args for r in requests]
        adapters = self._routes(requests, [ctx or cont for ctx, cont in args])
        scores = self._score([self._pair(ctx, cont) for ctx, cont in args], adapters, "prism loglikelihood")
        out = [(s.total, all(s.greedy)) for s in scores]
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each text's log-likelihood in disjoint windows of at most the model's context, each
        window conditioned on the tokens before it (lm-eval's rolling windows)."""
        texts = [r.args[0] for r in requests]
        adapters = self._routes(requests, texts)
        pieces, owner = [], []
        for i, text in enumerate(texts):
            for window in get_rolling_token_windows(self.chat.token_ids(text), self.prefix_id, self.max_length, 1):
                pieces.append(make_disjoint_window(window))
                owner.append(i)
        scores = self._score(pieces, [adapters[i] for i in owner], "prism rolling")
        out = [0.0] * len(texts)
        for i, s in zip(owner, scores):
            out[i] += s.total
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return out

    # ----- generation -------------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, with do_sample) replies, cut at the first `until` string; grouped by
        route and by sampling settings."""
        contexts = [r.args[0] for r in requests]
        settings = [self._sampling(r.args[1]) for r in requests]
        adapters = self._routes(requests, contexts)
        out: list[str | None] = [None] * len(requests)
        for _, idx in self.prism.grouped(adapters):
            for setting in dict.fromkeys(settings[i][:3] for i in idx):
                same = [i for i in idx if settings[i][:3] == setting]
                gens = self.chat.generate([contexts[i] for i in same], *setting)
                for i, g in zip(same, gens):
                    out[i] = _cut(g.text, settings[i][3])
        self.prism.set_adapter(None)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, res)
        return out  # type: ignore[return-value]

    def _sampling(self, gen_kwargs: dict) -> tuple[int, float, float, tuple[str, ...]]:
        """(max new tokens, temperature, top_p, stop strings) of lm-eval's generation arguments."""
        kw = dict(gen_kwargs or {})
        until = kw.get("until") or []
        until = (until,) if isinstance(until, str) else tuple(until)
        sample = bool(kw.get("do_sample", False))
        temperature = float(kw.get("temperature", 1.0 if sample else 0.0)) if sample else 0.0
        return (int(kw.get("max_gen_toks", self.max_gen_toks)), temperature, float(kw.get("top_p", 1.0)), until)


def _cut(text: str, until: Sequence[str]) -> str:
    cuts = [text.find(s) for s in until if s and s in text]
    return text[: min(cuts)] if cuts else text
