"""Token-by-token batched decoding for the server, with rows joining and leaving between steps.

`ChatModel.generate` wraps Hugging Face `generate`, which returns only when the whole batch is
done and gives every row the same sampling settings. A server needs each request's own
temperature/top_p/seed/stop/max_tokens, and its text as it is produced (streaming). So this is a
small decode loop over a left-padded batch with a KV cache: one forward pass per step for the
whole batch, each row sampled with its own settings, and a row that finishes is dropped from
the batch (and from the cache) so it costs nothing afterwards.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from prism.model.batching import cache_kwarg, merge_caches, mergeable, output_cache, pad, trim_left

log = logging.getLogger("prism.serve")


GREEDY_BELOW = 1e-5  # a temperature this low is greedy decoding (dividing by it overflows), as in vLLM


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None  # report each generated token's log-probability and this many alternatives


class TextStream:
    """Turns a growing list of token ids into text deltas and finds stop strings.

    Text that could still become a stop string (its last len(stop)-1 characters) or that ends in
    half a UTF-8 character is held back until the next token settles it, so a client never sees
    text that the non-streaming reply would not contain.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to send (may be '')."""
        self.ids.append(token_id)
        text = self._text()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(text[:cut], len(text[:cut]))
        end = len(text) - self.holdback
        while end > self.sent and text[end - 1] == "\ufffd":  # incomplete multi-byte character
            end -= 1
        return self._take(text, end)

    def flush(self) -> str:
        """The held-back rest, when the row ends without a stop string."""
        return "" if self.stopped else self._take(self._text(), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent : end], end
        return delta


@dataclass
class Row:
    """One request inside a decode batch, with callbacks to its client."""

    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[str], None]  # a text delta
    finish: Callable[[str, int], None]  # finish_reason ("stop"/"length"/"cancelled"), tokens generated
    cancelled: Callable[[], bool] = lambda: False
    fail: Callable[[], None] = lambda: None  # this row hit an error; the rest of the batch goes on
    n_tokens: int = 0
    scored: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)  # with logprobs:
    # (token, its log-probability, the most likely (token, log-probability) pairs) per generated token
    stream: TextStream | None = field(default=None, repr=False)
    generator: torch.Generator | None = field(default=None, repr=False)


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """One token from one row's logits: greedy, or temperature + nucleus (top_p) sampling."""
    if s.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > s.top_p  # keep the smallest set reaching top_p
        sorted_p[outside] = 0.0
        return int(order[torch.multinomial(sorted_p, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class DecodeBatch:
    """Rows decoding together over one KV cache, one forward pass per step for all of them. Rows
    join between steps (their prompts run as one padded prefill, then their cache is merged into the
    batch's, left-padded to a common length) and leave as soon as they finish: continuous batching.
    The model must be in the state (adapter) these rows need whenever `join` or `step` runs."""

    def __init__(self, chat_model):
        self.chat_model = chat_model
        self.rows: list[Row] = []
        self.cache = self.mask = self.next_pos = self.logits = None
        self.stop_ids = set(chat_model.stop_ids)  # eos and the template's end-of-turn token, as in generate()
        self._cache_name = cache_kwarg(chat_model.model)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def can_join(self) -> bool:
        """Rows can join now: the batch is empty, or its cache takes new rows (batching.mergeable)."""
        return not self.rows or mergeable(self.cache)

    @torch.inference_mode()
    def join(self, rows: list[Row]) -> int:
        """Prefill `rows` and add them to the batch; returns the forward passes run (0 or 1)."""
        cm = self.chat_model
        rows = [r for r in rows if _guarded(r, _prepare, cm.tokenizer)]
        if not rows:
            return 0
        ids, mask, positions = pad([r.prompt_ids for r in rows], cm.tokenizer.pad_token_id)
        ids, mask, positions = ids.to(cm.device), mask.to(cm.device), positions.to(cm.device)
        out = cm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache, logits, next_pos = output_cache(out), out.logits[:, -1, :], positions[:, -1:] + 1
        if not self.rows:
            self.cache, self.mask, self.next_pos, self.logits = cache, mask, next_pos, logits
        else:
            self.cache, self.mask = merge_caches(self.cache, self.mask, cache, mask)
            self.next_pos = torch.cat([self.next_pos, next_pos])
            self.logits = torch.cat([self.logits, logits])
        self.rows += rows
        return 1

    @torch.inference_mode()
    def step(self) -> int:
        """Sample each row's next token from the last logits, let finished and cancelled rows leave,
        and run one forward pass for the rest; returns the passes run (0 when no row is left)."""
        tokens, keep = [], []
        for b, r in enumerate(self.rows):
            if r.cancelled():  # the client left: the row leaves the batch at this step
                r.finish("cancelled", r.n_tokens)
                continue
            t = _guarded(r, _step, self.logits[b], self.stop_ids)
            if t is not None:
                tokens.append(t)
                keep.append(b)
        if not keep:
            self.rows, self.cache = [], None
            return 0
        dev = self.chat_model.device
        if len(keep) < len(self.rows):  # the batch only carries live requests
            sel = torch.tensor(keep, device=dev)
            self.cache.batch_select_indices(sel)
            self.mask, self.next_pos = self.mask[sel], self.next_pos[sel]
            self.rows = [self.rows[b] for b in keep]
            self.mask = trim_left(self.cache, self.mask)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(keep), 1))], dim=1)
        step_ids = torch.tensor(tokens, dtype=torch.long, device=dev).unsqueeze(1)
        out = self.chat_model.model(input_ids=step_ids, attention_mask=self.mask, position_ids=self.next_pos,
                                    use_cache=True, **{self._cache_name: self.cache})
        self.cache, self.logits = output_cache(out), out.logits[:, -1, :]
        self.next_pos = self.next_pos + 1
        return 1


def decode_batch(chat_model, rows: list[Row]) -> int:
    """Generate for every row until each stops (no row joins later); returns the forward passes."""
    batch = DecodeBatch(chat_model)
    passes = batch.join(rows)
    while batch:
        passes += batch.step()
    return passes


def _guarded(r: Row, fn, *args):
    """fn(r, *args), or None after failing this row alone when it raises: one request's problem
    must not fail the others decoded beside it."""
    try:
        return fn(r, *args)
    except Exception:
        log.exception("a request failed while decoding; the rest of its batch goes on")
        r.fail()
        return None


def _prepare(r: Row, tok) -> bool:
    r.stream = TextStream(tok, r.sampling.stop)
    # A per-request generator: a seeded request samples the same way whatever its batch.
    r.generator = torch.Generator().manual_seed(
        r.sampling.seed if r.sampling.seed is not None else random.randrange(2**62))
    return True


def _step(r: Row, logits: torch.Tensor, stop_ids: set[int]) -> int | None:
    """Sample the row's next token and hand out its text; the token, or None when the row ends."""
    t = sample(logits, r.sampling, r.generator)
    if t in stop_ids:
        _end(r, "stop")
        return None
    r.n_tokens += 1
    if r.sampling.logprobs is not None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        best, ids = logp.topk(r.sampling.logprobs)
        r.scored.append((t, float(logp[t]), list(zip(ids.tolist(), best.tolist()))))
    delta = r.stream.push(t)
    if delta:
        r.emit(delta)
    if r.stream.stopped:
        _end(r, "stop")
    elif r.n_tokens >= r.sampling.max_tokens:
        _end(r, "length")
    else:
        return t
    return None


def _end(r: Row, reason: str) -> None:
    rest = r.stream.flush()
    if rest:
        r.emit(rest)
    r.finish(reason, r.n_tokens)


def logprob_lists(tokenizer, ids: Sequence[int], logprobs: Sequence[float | None],
                  alternatives: Sequence[Sequence[tuple[int, float]] | None]) -> dict:
    """OpenAI's legacy completion lists for tokens: each token's text, its log-probability, and a
    {token text: log-probability} dict of the most likely tokens at its position, the token itself
    included (as OpenAI and vLLM do). None where nothing was predicted (the prompt's first token)."""
    tokens = [tokenizer.decode([t]) for t in ids]
    top: list[dict | None] = []
    for token, lp, alts in zip(tokens, logprobs, alternatives):
        if lp is None:
            top.append(None)
            continue
        entry: dict[str, float] = {}
        for t, v in alts:  # most likely first; two ids with one text keep the likelier
            entry.setdefault(tokenizer.decode([t]), v)
        entry.setdefault(token, lp)
        top.append(entry)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top}
