"""The llama.cpp engine: generation on llama.cpp's own server, run in-process by `xllamacpp`
(continuous batching over parallel slots, prompt caching, LoRA adapters with a per-request scale).

It generates only; formatting, scoring, the gate's layer-0 features and training stay in torch
(`ChatModel`). Prompts go in as the token ids our tokenizer makes, so both engines read exactly the
same input. For the embedded model it loads a float16 copy of the shipped Q4_1 GGUF (made once,
cached): the Q4_1 file's quantized matrix products change the small model's greedy replies, the
float16 copy reproduces the torch engine's (benchmarks/engines.py).
"""

from __future__ import annotations

import logging
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from prism.errors import ConfigError, ModelLoadError, RemoteError
from prism.model.chat import Generation

log = logging.getLogger(__name__)

# Tokens of KV cache each sequence (slot) gets. Every slot has a cache of its own instead of one
# pool shared by all (llama.cpp's "unified" KV): in the shared pool each decoded token attends over
# every sequence's cells, masked, so attention grows with the whole batch. Embedded model, 2 cores,
# 128-token replies, 2 requests per stream, llama.cpp alone: 16 streams 137 -> 172 tok/s, 32 streams
# 147 -> 204 (through `prism serve`: benchmarks/engines.py). The price is memory taken up front:
# slots x context x the model's KV bytes per token (23 KB for the embedded model: 16 x 2048 tokens
# = 0.75 GB).
SEQ_CONTEXT = 2048
# A served conversation's tokens when the model allows more (16 slots x 4096 tokens = 1.5 GB for
# the embedded model); `prism serve --context-length` sets it.
SERVE_CONTEXT = 4096


def available() -> bool:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return False
    return True


def embedded_float_gguf(dtype: str = "f16") -> Path:
    """The embedded model as a float GGUF (dequantized from the shipped Q4_1 once, then cached)."""
    from prism.model.gguf import write_float_gguf
    from prism.model.loading import cache_dir, embedded_gguf_path

    src = embedded_gguf_path()
    stat = src.stat()
    dst = cache_dir() / "gguf" / f"{src.stem}-{dtype}-{stat.st_size}-{int(stat.st_mtime)}.gguf"
    if not dst.is_file():
        log.info("writing a %s copy of %s for llama.cpp (once)", dtype, src.name)
        write_float_gguf(src, dst, dtype)
    return dst


def model_gguf(model: str, gguf: str | None) -> Path:
    """The GGUF file the llama.cpp engine loads for `model`: `gguf` when given, the embedded model's
    float copy, else an error saying how to get one."""
    from prism.config import EMBEDDED_MODEL

    if gguf:
        path = Path(gguf).expanduser()
        if not path.is_file():
            raise ConfigError(f"--gguf {gguf}: no such file")
        return path
    if model == EMBEDDED_MODEL:
        return embedded_float_gguf()
    raise ConfigError(f"the llamacpp engine needs {model!r} as a GGUF file: convert it with llama.cpp's "
                      "convert_hf_to_gguf.py and pass --gguf PATH, or use --engine torch")


def adapter_ggufs(run, base_gguf: Path) -> dict[str, Path]:
    """A finished run's adapters as llama.cpp LoRA GGUFs, written once into the cache (named by
    the adapter's weights and the base file, so a retrained adapter gets a new file)."""
    from prism.model.gguf import write_lora_gguf
    from prism.model.loading import adapter_fingerprint, cache_dir

    out = {}
    for name in run.finished_adapters():
        src = run.adapter_path(name)
        dst = cache_dir() / "gguf" / f"lora-{adapter_fingerprint(src, str(base_gguf.resolve()))}.gguf"
        if not dst.is_file():
            write_lora_gguf(src, base_gguf, dst)
        out[name] = dst
    return out


class LlamaCppEngine:
    """A GGUF model (and LoRA GGUFs by name) in an in-process llama.cpp server.

    `slots` sequences decode together (continuous batching: a finished one leaves, a waiting one
    joins between steps), each in a KV cache of its own of `context` tokens (None: SEQ_CONTEXT): a
    request's prompt and reply together must fit in it. `url` is the server's own loopback address
    (OpenAI-compatible API), for a router."""

    def __init__(self, gguf: str | Path, loras: dict[str, str | Path] | None = None, slots: int = 16,
                 context: int | None = None, threads: int | None = None, name: str | None = None,
                 tokenize=None):
        try:
            import xllamacpp
        except ImportError:
            raise ConfigError("the llamacpp engine needs the xllamacpp package: pip install xllamacpp"
                              ) from None
        self.gguf = Path(gguf)
        self.lora_names = list(loras or {})
        self.name = name or self.gguf.stem
        self.engine = "llamacpp"  # what a run's manifest records as the generating engine
        # Text prompts become these token ids (the torch engine's tokenizer), so both engines read
        # the same input and llama.cpp adds no second BOS token.
        self.tokenize = tokenize
        self.slots = slots
        context = context or SEQ_CONTEXT
        params = xllamacpp.CommonParams()
        params.model.path = str(self.gguf)
        params.n_ctx = context * slots  # llama.cpp splits n_ctx evenly between the slots
        params.n_parallel = slots
        params.kv_unified = False  # a cache per sequence (see SEQ_CONTEXT)
        params.n_batch = params.n_ubatch = 512
        n = threads or int(os.environ.get("PRISM_THREADS", 0)) or (os.cpu_count() or 1)
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = n
        params.verbosity = -1 if not log.isEnabledFor(logging.DEBUG) else 3
        # The in-process server also listens on a loopback port (the router talks to it there): a
        # random key keeps other local users and web pages from using it past prism's own checks.
        self.api_key = secrets.token_urlsafe(24)
        params.api_keys = [self.api_key]
        if loras:
            adapters = []
            for lname, path in loras.items():
                info = xllamacpp.CommonAdapterLoraInfo(str(path), 0.0)
                adapters.append(info)
            params.lora_adapters = adapters
            params.lora_init_without_apply = True  # scale 0 until a request asks for one
        try:
            self.server = xllamacpp.Server(params)
        except Exception as e:  # llama.cpp's load errors come back as RuntimeError with its message
            raise ModelLoadError(f"llama.cpp cannot load {self.gguf} ({type(e).__name__}: {e})") from None
        self.context = context
        self.tokens_generated = 0
        # the KV caches are reserved now, whatever the traffic: say how much a setting costs
        log.info("llama.cpp: %s, %d slots x %d tokens of KV cache each", self.gguf.name, slots, context)

    @property
    def url(self) -> str:
        return self.server.listening_address

    def close(self) -> None:
        """Free the model and its KV cache (xllamacpp stops its server with the object)."""
        self.server = None

    def lora_field(self, adapter: str | None) -> list[dict]:
        """The per-request `lora` list: scale 1 for `adapter`, 0 for the others (None: base model)."""
        if adapter is not None and adapter not in self.lora_names:
            raise ValueError(f"unknown adapter {adapter!r}; the engine has {self.lora_names}")
        return [{"id": i, "scale": 1.0 if n == adapter else 0.0} for i, n in enumerate(self.lora_names)]

    def complete(self, body: dict) -> dict:
        """One /completions request, answered in-process."""
        reply = self.server.handle_completions(body)
        if not isinstance(reply, dict) or "error" in reply:
            message = reply.get("error", {}).get("message") if isinstance(reply, dict) else reply
            raise RemoteError(f"llama.cpp: {message}")
        return reply

    def generate(self, prompts: Sequence[str | list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, progress=None, adapter: str | None = None,
                 stop: Sequence[str] = ()) -> list[Generation]:
        """One continuation per prompt (text, or token ids: what the torch engine reads), all in
        flight at once; prompt i samples with seed + i. `adapter`: the LoRA to apply (None: base)."""
        lora = self.lora_field(adapter)
        if self.tokenize is not None:
            prompts = [self.tokenize(p) if isinstance(p, str) else p for p in prompts]

        def one(i: int) -> Generation:
            body = {"prompt": prompts[i], "max_tokens": max_new_tokens, "temperature": temperature,
                    "top_p": top_p, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "cache_prompt": True,
                    "stop": list(stop)}
            if seed is not None:
                body["seed"] = seed + i
            if lora:
                body["lora"] = lora
            reply = self.complete(body)
            gen = Generation(reply["choices"][0]["text"].strip(), int(reply["usage"]["completion_tokens"]))
            if progress is not None:
                progress.update(1)
            return gen

        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(len(prompts), self.slots * 2)) as pool:
            out = list(pool.map(one, range(len(prompts))))
        self.tokens_generated += sum(g.n_tokens for g in out)
        return out

