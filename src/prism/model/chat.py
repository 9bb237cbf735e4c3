"""ChatModel: a causal LM with its tokenizer, and the batched operations every stage needs:
chat formatting with persona placement (and what the template allows, found by rendering probe
conversations), generation, and scoring."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch

from prism.model.batching import (USER_WORDS, cache_kwarg, chunked_logits, first_layer_output, hidden_states,
                                  output_cache, pad, pool, positions, shared_prefixes)

Placement = str  # "system" or "user" (prism.config.Placement)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def fast_bf16(device: torch.device) -> bool:
    """Does the hardware compute bfloat16 natively (a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX)? Elsewhere bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


_SYSTEM_PROBE = "PRISM-SYSTEM-ROLE-PROBE"
_END_PROBE = "PRISM-END-PROBE"


def template_has_system_role(tokenizer) -> bool:
    msgs = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates without a system role raise on one
        return False
    return _SYSTEM_PROBE in text


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template puts right after an assistant message."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _END_PROBE}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:
        return tokenizer.eos_token_id
    after = text.split(_END_PROBE, 1)[1] if _END_PROBE in text else ""
    ids = tokenizer(after.lstrip(" "), add_special_tokens=False)["input_ids"] if after.strip() else []
    return ids[0] if ids else tokenizer.eos_token_id


@dataclass
class Generation:
    text: str
    n_tokens: int


@dataclass
class TokenScores:
    """How likely each scored token was (ChatModel.score_tokens): its log-probability, whether it
    was the most likely token there, the `top` most likely (token id, log-probability) pairs at its
    position (empty lists unless asked), and the sum of the log-probabilities."""

    logprobs: list[float]
    greedy: list[bool]
    top: list[list[tuple[int, float]]]
    total: float


class ChatModel:
    """A causal LM with its tokenizer, used by every stage.

    All methods take lists and process them in batches of `batch_size`; nothing loops one
    prompt per forward pass.
    """

    def __init__(self, model, tokenizer, name: str, source: dict, batch_size: int = 16,
                 prefix_cache: bool = False, min_prefix: int = 32):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.source = source  # id, revision/hash: recorded in manifests
        self.batch_size = batch_size
        # generate(): prompts sharing a token prefix of at least `min_prefix` tokens (a persona
        # system prompt, or the same query prompt sampled k times) prefill it once per batch.
        self.prefix_cache = prefix_cache
        self.min_prefix = min_prefix
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.supports_system_role = template_has_system_role(tokenizer)
        self.end_of_turn_id = end_of_turn_id(tokenizer)
        # Stop on the model's own end tokens too (e.g. Gemma's <end_of_turn>, Llama-3's <|eot_id|>).
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.stop_ids = sorted({t for t in [tokenizer.eos_token_id, self.end_of_turn_id, *gen_eos] if t is not None})
        self.tokens_generated = 0
        self._placement_warned = False
        self._template_edges: tuple[list[int], list[int]] | None = None  # see query_span
        self._span_warned = False

    @property
    def work_chunk(self) -> int:
        """Prompts per call of a stage: a few batches (progress is saved per call, and a call still
        fills its batches)."""
        return self.batch_size * 2

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        """Tokens the model attends over (prompt + reply); 2048 when its config does not say."""
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2048)

    @property
    def dtype_name(self) -> str:
        """The weights' precision as a name ("float32", "bfloat16", ...)."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @contextmanager
    def inference_dtype(self, dtype: str | torch.dtype | None):
        """Run the block with the model's floating-point parameters cast to `dtype` (e.g. bfloat16
        for generation on a CPU with bf16 units); the original tensors are put back on exit, bit
        for bit (they are kept, not re-cast). None / "model" / the current dtype: no change; "auto":
        bfloat16 where the hardware has bf16 units, else no change. Buffers (e.g. rotary
        frequencies) stay as they are."""
        if dtype == "auto":
            dtype = "bfloat16" if fast_bf16(self.device) else None
        target = None if dtype in (None, "model") else (DTYPES[dtype] if isinstance(dtype, str) else dtype)
        saved = []
        if isinstance(target, torch.dtype):
            for p in self.model.parameters():  # parameters() lists a tied weight once
                if p.is_floating_point() and p.dtype != target:
                    saved.append((p, p.data))
                    p.data = p.data.to(target)
        try:
            yield self
        finally:
            for p, data in saved:
                p.data = data

    # ----- chat formatting -------------------------------------------------------------
    def messages_with_persona(
        self, messages: Sequence[dict], persona: str | None, placement: Placement = "system"
    ) -> list[dict]:
        """Insert the persona text as the system message or in front of the first user turn.

        A template without a system role gets the persona in the user turn, with a warning.
        """
        msgs = [dict(m) for m in messages]
        if not persona:
            return msgs
        if placement == "system" and not self.supports_system_role:
            if not self._placement_warned:
                warnings.warn(
                    f"{self.name}: the chat template has no system role; the persona goes in the user turn",
                    stacklevel=2,
                )
                self._placement_warned = True
            placement = "user"
        if placement == "system":
            if msgs and msgs[0]["role"] == "system":
                msgs[0]["content"] = persona + "\n\n" + msgs[0]["content"]
            else:
                msgs.insert(0, {"role": "system", "content": persona})
            return msgs
        for m in msgs:
            if m["role"] == "user":
                m["content"] = persona + "\n\n" + m["content"]
                return msgs
        raise ValueError("placement 'user' needs at least one user message")

    def prompt(
        self, messages: Sequence[dict], persona: str | None = None, placement: Placement = "system",
        continue_last: bool = False,
    ) -> str:
        """The chat-template string for `messages`, ending where the assistant starts writing; with
        `continue_last`, ending inside the last (assistant) message, so a reply continues it."""
        msgs = self.messages_with_persona(messages, persona, placement)
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=not continue_last,
                                                  continue_final_message=continue_last)

    def user_prompt(self, text: str, persona: str | None = None, placement: Placement = "system") -> str:
        return self.prompt([{"role": "user", "content": text}], persona, placement)

    # ----- batched operations -----------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of a left-padded batch, on the model's device."""
        ids, mask, _ = pad(self.tokenizer(list(texts), add_special_tokens=False)["input_ids"],
                           self.tokenizer.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        progress=None,
    ) -> list[Generation]:
        """Generate one continuation per prompt, batched, longest prompts grouped together."""
        out: list[Generation | None] = [None] * len(prompts)
        eos = self.stop_ids
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.prefix_cache and len(prompts) > 1:
            tok_ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
            prefix_len, group = shared_prefixes(tok_ids, self.min_prefix)
            # Groups stay contiguous (one prefix pass serves a whole batch), still roughly by length.
            first = {}
            for i, g in enumerate(group):
                if g >= 0:
                    first[g] = min(first.get(g, len(tok_ids[i])), len(tok_ids[i]))
            order = sorted(range(len(prompts)),
                           key=lambda i: (first.get(group[i], len(tok_ids[i])), group[i], len(tok_ids[i])))
        else:
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if seed is not None:
                torch.manual_seed(seed + start)
            if self.prefix_cache and len(prompts) > 1 and any(prefix_len[i] for i in idx):
                # rows without a group keep their first token as a one-token "prefix"
                ids, mask, cache = self._prefill_prefixes([tok_ids[i] for i in idx], [prefix_len[i] or 1 for i in idx])
                seqs = self.model.generate(input_ids=ids, attention_mask=mask, **{cache_kwarg(self.model): cache},
                                           **kwargs)
            else:
                ids, mask = self.encode([prompts[i] for i in idx])
                seqs = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            new = seqs[:, ids.shape[1] :]
            for row, i in enumerate(idx):
                ids = new[row].tolist()
                n = len(ids)
                for j, t in enumerate(ids):
                    if t in eos:
                        n = j
                        break
                out[i] = Generation(self.tokenizer.decode(ids[:n], skip_special_tokens=True).strip(), n)
                self.tokens_generated += n
            if progress is not None:
                progress.update(len(idx))
        return out  # type: ignore[return-value]

    def _prefill_prefixes(self, seqs: Sequence[list[int]], prefix_lens: Sequence[int]):
        """Inputs and a KV cache for generating after `seqs` whose first `prefix_lens` tokens are
        shared: each distinct prefix runs through the model once, its cache is copied to the rows
        that share it, and generate() then prefills only the rest. Row layout (the attention mask
        hides the padding, positions count real tokens only, so the maths is that of the plain prompt):
        [pad][prefix] [pad][rest]."""
        pad_id = self.tokenizer.pad_token_id
        prefixes = [tuple(s[:n]) for s, n in zip(seqs, prefix_lens)]
        unique = sorted(set(prefixes), key=len)
        which = torch.tensor([unique.index(p) for p in prefixes])
        p_ids, p_mask, p_pos = pad([list(p) for p in unique], pad_id)
        if p_ids.shape[1] == 0:  # cannot happen: the caller checks that some row has a prefix
            raise ValueError("no shared prefix")
        dev = self.device
        out = self.model(input_ids=p_ids.to(dev), attention_mask=p_mask.to(dev), position_ids=p_pos.to(dev),
                         use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        cache.batch_select_indices(which.to(dev))
        r_ids, r_mask, _ = pad([s[n:] for s, n in zip(seqs, prefix_lens)], pad_id)
        ids = torch.cat([p_ids[which], r_ids], dim=1).to(dev)
        mask = torch.cat([p_mask[which], r_mask], dim=1).to(dev)
        return ids, mask, cache

    def continuation_logprobs(
        self, prompts: Sequence[str], continuations: Sequence[str], progress=None
    ) -> list[tuple[float, int]]:
        """Sum of log p(continuation | prompt) and its token count, for each pair (each text
        tokenized on its own; an empty continuation scores the end-of-sequence token)."""
        assert len(prompts) == len(continuations)
        pieces = [(self.token_ids(p), self.token_ids(c) or [self.tokenizer.eos_token_id])
                  for p, c in zip(prompts, continuations)]
        return [(s.total, len(s.logprobs)) for s in self.score_tokens(pieces, progress=progress)]

    @torch.inference_mode()
    def score_tokens(self, pieces: Sequence[tuple[Sequence[int], Sequence[int]]], top: int = 0, progress=None
                     ) -> list[TokenScores]:
        """The log-probability of each continuation token after its context, for (context ids,
        continuation ids) pairs; with `top`, also the `top` most likely tokens at each of those
        positions. A context needs at least one token.

        Pieces that share a context and score one token each (the choices of a multiple-choice
        question) share one forward row. Rows are left-padded so every continuation ends at the
        last position; only the positions that predict a continuation token are projected to the
        vocabulary, a chunk at a time.
        """
        if any(not ctx for ctx, _ in pieces):
            raise ValueError("scoring needs at least one context token before the scored tokens")
        rows: dict[tuple, list[int]] = {}  # one forward row -> the pieces it scores
        for i, (ctx, cont) in enumerate(pieces):
            rows.setdefault((tuple(ctx), None if len(cont) == 1 else tuple(cont)), []).append(i)
        owners_of = list(rows.values())
        seqs = [list(pieces[owners[0]][0]) + list(pieces[owners[0]][1]) for owners in owners_of]
        scored = [len(pieces[owners[0]][1]) for owners in owners_of]
        results: list[TokenScores | None] = [None] * len(pieces)
        order = sorted(range(len(seqs)), key=lambda r: len(seqs[r]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, mask, pos = pad([seqs[r] for r in idx], self.tokenizer.pad_token_id)
            width = ids.shape[1]
            hidden = hidden_states(self.model, ids.to(self.device), mask.to(self.device), pos.to(self.device))
            # The positions that predict a scored token (row by row), and each piece's targets there.
            b_of, cols, first = [], [], []
            for b, r in enumerate(idx):
                first.append(len(cols))
                b_of += [b] * scored[r]
                cols += range(width - scored[r] - 1, width - 1)
            at_pos, targets, slots = [], [], []  # slots: (piece, token index) per target
            for b, r in enumerate(idx):
                for i in owners_of[r]:
                    for k, t in enumerate(pieces[i][1]):
                        at_pos.append(first[b] + k)
                        targets.append(t)
                        slots.append((i, k))
            at_pos_t, targets_t = torch.tensor(at_pos, dtype=torch.long), torch.tensor(targets, dtype=torch.long)
            tok_lp, best = torch.empty(len(targets)), torch.empty(len(cols))
            top_lp = torch.empty(len(cols), top)
            top_ids = torch.empty(len(cols), top, dtype=torch.long)
            picked = hidden[torch.tensor(b_of, dtype=torch.long), torch.tensor(cols, dtype=torch.long)]
            for at, logits in chunked_logits(self.model, picked):
                logp = (logits - logits.logsumexp(-1, keepdim=True)).cpu()
                end = at + len(logp)
                best[at:end] = logp.max(-1).values
                if top:
                    top_lp[at:end], top_ids[at:end] = logp.topk(top, dim=-1)
                here = (at_pos_t >= at) & (at_pos_t < end)
                tok_lp[here] = logp[at_pos_t[here] - at, targets_t[here]]
            values: dict[int, list[float]] = {}
            for (i, k), v in zip(slots, tok_lp.tolist()):
                values.setdefault(i, []).append(v)
            for b, r in enumerate(idx):
                span = slice(first[b], first[b] + scored[r])
                alternatives = ([list(zip(t, v)) for t, v in zip(top_ids[span].tolist(), top_lp[span].tolist())]
                                if top else [[] for _ in range(scored[r])])
                for i in owners_of[r]:
                    lps = values.get(i, [])  # nothing to score: an empty continuation
                    total = float(torch.tensor(lps, dtype=torch.float32).sum())  # float32, as the scores are
                    results[i] = TokenScores(lps, [v >= m for v, m in zip(lps, best[span].tolist())], alternatives,
                                             total)
            if progress is not None:
                progress.update(sum(len(owners_of[r]) for r in idx))
        return results  # type: ignore[return-value]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
        """Logits for a left-padded batch, with positions counted from each row's first token."""
        return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          position_ids=positions(mask).to(self.device), use_cache=False, **kwargs).logits

    @torch.inference_mode()
    def next_token_logprobs(self, prompts: Sequence[str], progress=None) -> torch.Tensor:
        """Log-probabilities of the next token after each prompt: (n_prompts, vocab).
        Batches hold prompts of similar length (less padding); rows come back in input order."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        rows = []
        for start in range(0, len(order), self.batch_size):
            ids, mask = self.encode([prompts[i] for i in order[start : start + self.batch_size]])
            logits = self._forward(ids, mask, logits_to_keep=1)[:, -1, :].float()
            rows.append(torch.log_softmax(logits, dim=-1).cpu())
            if progress is not None:
                progress.update(ids.shape[0])
        if not rows:
            return torch.empty(0)
        out = torch.cat(rows)
        return out[torch.tensor(order).argsort()]

    @torch.inference_mode()
    def layer1_states(self, prompts: Sequence[str], pooling: str = "mean", progress=None) -> torch.Tensor:
        """The hidden state after the first decoder layer, pooled (prism.model.batching.pool) over
        each prompt (mean), over the user's own words in it (query, max: without the chat
        template's system prompt and role tags, which are the same for every prompt) or at its
        last token: (n_prompts, hidden). Only layer 0 runs: the forward pass stops there."""
        rows = []
        for start in range(0, len(prompts), self.batch_size):
            part = prompts[start : start + self.batch_size]
            ids, mask = self.encode(part)
            hidden = first_layer_output(self.model, ids, mask)
            if pooling in USER_WORDS:
                mask = pad([self.query_span(p) for p in part], 0)[0].to(mask.device)
            rows.append(pool(hidden, mask, pooling).float().cpu())
            if progress is not None:
                progress.update(ids.shape[0])
        return torch.cat(rows) if rows else torch.empty(0)

    def query_span(self, prompt: str) -> list[int]:
        """Per token of a one-turn prompt: 1 for the user's words, 0 for the template around them.
        A prompt the template did not make (another shape, or tokens merged across the edge)
        counts every token."""
        ids = self.token_ids(prompt)
        for fresh in (False, True):  # a template may change (one that writes today's date): render it again once
            if fresh or self._template_edges is None:
                before, _, after = self.user_prompt("\x00").partition("\x00")
                self._template_edges = (self.token_ids(before), self.token_ids(after))
            before, after = self._template_edges
            n = len(ids) - len(before) - len(after)
            if n >= 1 and ids[: len(before)] == before and ids[len(ids) - len(after) :] == after:
                return [0] * len(before) + [1] * n + [0] * len(after)
        if not self._span_warned:
            self._span_warned = True
            warnings.warn(f"{self.name}: a routing prompt does not start and end as the chat template's user turn "
                          "does (a raw prompt, or a template that merges the user's first token into its own); its "
                          "gate features pool over every token", stacklevel=2)
        return [1] * len(ids)

    def variant_ids(self, text: str, required: bool = False) -> list[int]:
        """Single tokens that spell `text` as a next token: alone, after a space, or after other
        text (SentencePiece vocabularies encode a bare "1" as two pieces). Empty if none, or an
        error naming the model when `required`."""
        ids = {t[0] for t in (self.token_ids(text), self.token_ids(" " + text)) if len(t) == 1}
        tail = self.token_ids("[[" + text)
        if tail and self.tokenizer.decode([tail[-1]]).strip() == text:
            ids.add(tail[-1])
        if required and not ids:
            raise ValueError(f"{self.name}: {text!r} is not a single token in this vocabulary")
        return sorted(ids)

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


