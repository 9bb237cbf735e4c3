"""Batches of token sequences: the one padding helper (with position ids), the KV-cache keyword
of the installed transformers, rows joining and leaving a KV cache, shared-prefix detection for prefix caching, and the gate's input
(the hidden state after decoder layer 0, computed without running the rest)."""

from __future__ import annotations

import inspect
from typing import Sequence

import torch


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left", width: int | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids) of a padded batch. Positions count each row's real
    tokens from 0, so a left-padded row computes exactly what it computes alone."""
    width = max((len(s) for s in seqs), default=0) if width is None else width
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if not len(s):
            continue
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[r, span] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, span] = 1
    return ids, mask, positions(mask)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (the old name goes in 5.40); older releases,
    which some serving stacks pin, only know the old one."""
    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache of a model output, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def mergeable(cache) -> bool:
    """Can rows join or leave this KV cache by plain tensor edits? Yes for the full-attention
    cache most models use; no for sliding-window, quantized or state-space caches."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def merge_caches(cache, mask: torch.Tensor, other, other_mask: torch.Tensor):
    """`other`'s rows appended to `cache`'s (both full-attention caches, see `mergeable`): the
    shorter side is left-padded with masked-out zeros, as a left-padded batch would be. Returns
    (cache, mask) for the merged rows."""
    width = max(mask.shape[1], other_mask.shape[1])

    def left(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
        missing = width - t.shape[-dim_from_end]
        if not missing:
            return t
        pad_spec = [0, 0] * (dim_from_end - 1) + [missing, 0]
        return torch.nn.functional.pad(t, pad_spec)

    for mine, theirs in zip(cache.layers, other.layers):
        mine.keys = torch.cat([left(mine.keys, 2), left(theirs.keys, 2)])
        mine.values = torch.cat([left(mine.values, 2), left(theirs.values, 2)])
    return cache, torch.cat([left(mask, 1), left(other_mask, 1)])


def trim_left(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns no row attends to (left by rows that left the batch) from the mask
    and the cache; returns the mask."""
    if not mergeable(cache):
        return mask
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else 0
    if start == 0:
        return mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
    return mask[:, start:]


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefixes(seqs: Sequence[Sequence[int]], min_len: int) -> tuple[list[int], list[int]]:
    """For each token sequence: the length of the prefix it shares with its group, and the group
    (-1: none). Groups are runs of lexicographically sorted sequences whose common prefix is at
    least `min_len` tokens; the prefix stops one token short of the group's shortest sequence, so
    every row keeps a token to compute the next-token logits from."""
    n = len(seqs)
    prefix, group = [0] * n, [-1] * n
    if n < 2:
        return prefix, group
    order = sorted(range(n), key=lambda i: list(seqs[i]))
    runs, cur, common = [], [order[0]], len(seqs[order[0]])
    for a, b in zip(order, order[1:]):
        c = min(common, _common_length(seqs[a], seqs[b]))
        if c >= min_len:
            cur.append(b)
            common = c
        else:
            runs.append((cur, common))
            cur, common = [b], len(seqs[b])
    runs.append((cur, common))
    for g, (members, common) in enumerate(runs):
        length = min(common, min(len(seqs[i]) for i in members) - 1)
        if len(members) < 2 or length < min_len:
            continue
        for i in members:
            prefix[i], group[i] = length, g
    return prefix, group


class _StopForward(Exception):
    pass


def decoder_layers(model) -> torch.nn.ModuleList:
    """The stack of decoder layers of a causal LM (plain or wrapped by PEFT)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
        return layers
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text_config, "num_hidden_layers", None)
    for module in inner.modules():  # fall back to the only ModuleList of the right depth
        if isinstance(module, torch.nn.ModuleList) and n and len(module) == n:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(inner).__name__}: PRISM's gate reads the output "
                     "of the first decoder layer, so the model needs a `get_decoder().layers` stack")


def layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def first_layer_output(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Run the model only up to the output of decoder layer 0 (the gate's input), for a
    left-padded batch; positions count from each row's first real token."""
    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = layer_output(output)
        raise _StopForward

    handle = decoder_layers(model)[0].register_forward_hook(hook)
    try:
        model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["h"]


POOLINGS = ("mean", "last", "query", "max")
USER_WORDS = ("query", "max")  # poolings over the user's own words, not the chat template


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean over the positions `mask` marks (all real tokens for "mean", the user's own words for
    "query"), their elementwise maximum ("max": one telling word, such as a product's name, is not
    averaged away), or the state of the last token (left padding)."""
    if pooling == "last":
        return hidden[:, -1, :]
    if pooling in ("mean", "query"):
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if pooling == "max":
        top = hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).amax(1)
        return top.masked_fill(~mask.bool().any(1, keepdim=True), 0.0)  # an empty row: zeros, as mean gives
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


def hidden_states(model, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The last hidden state of every position (no vocabulary projection), plain or PEFT-wrapped
    (a LoRA lives in the modules, so the decoder alone runs it)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state


def head(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_output_embeddings()


def chunked_logits(model, hidden: torch.Tensor, chunk: int = 256):
    """(start, logits) for rows of `hidden` (N, H) in chunks: the vocabulary projection never
    holds more than `chunk` x vocab floats (it is the memory peak of scoring otherwise)."""
    lm_head = head(model)
    for start in range(0, hidden.shape[0], chunk):
        yield start, lm_head(hidden[start : start + chunk]).float()
