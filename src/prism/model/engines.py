"""Which engine generates, in one place.

- torch: `ChatModel`'s own batched loop; any Hugging Face model; the reference.
- llamacpp: llama.cpp in-process (`model/llamacpp.py`); a GGUF file or the embedded model.
- vllm: vLLM's OpenAI server as a child process (`model/vllm.py`); the engine for GPUs and clusters.

Whatever generates, formatting, the gate's layer-0 features, scoring and training stay in torch.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from prism.errors import ConfigError

log = logging.getLogger(__name__)
ENGINES = ("auto", "torch", "llamacpp", "vllm")


def pick_engine(requested: str, model: str, gguf: str | None = None, device: str = "cpu", job: str = "serve") -> str:
    """The engine that generates a `job` ("serve": one reply per request; "bulk": stages 1-3 and
    eval, many prompts at once): the one asked for, or with "auto" the faster one measured here
    (benchmarks/engines.py, embedded model, 2-core CPU): llama.cpp serves (one stream ~5x torch's
    token loop, many clients through continuous batching), torch's batched bfloat16 generation is
    at least as fast for bulk work. llama.cpp only where it can load the model (the embedded
    model, or a `gguf` file) and on a CPU. vLLM only when asked for: on this CPU its start-up
    (20-100 s) costs more than it saves on small runs."""
    from prism.config import EMBEDDED_MODEL
    from prism.model import llamacpp, vllm

    if requested not in ENGINES:
        raise ConfigError(f"unknown engine {requested!r}; choose one of {', '.join(ENGINES)}")
    if requested == "llamacpp" and not llamacpp.available():
        raise ConfigError("--engine llamacpp needs the xllamacpp package: pip install xllamacpp")
    if requested == "vllm" and (problem := vllm.unavailable()):
        raise ConfigError(f"--engine vllm: {problem}")
    if requested != "auto":
        return requested
    can_load = bool(gguf) or model == EMBEDDED_MODEL
    return "llamacpp" if job == "serve" and can_load and llamacpp.available() and device in ("cpu", "auto") else "torch"


@contextmanager
def bulk_generation(config, local):
    """`local` (a ChatModel) with its `generate` on the engine the run's config asks for, for
    stages 1-3; the engine is shut down afterwards. Yields `local` itself for the torch engine."""
    from prism.model.remote import RemoteGenerationModel
    from prism.model.vllm import VllmEngine

    generator = None
    if config.generator_url:  # a server someone else runs (vLLM on a cluster, a hosted API)
        from prism.model.remote import RemoteGenerator

        generator = RemoteGenerator(config.generator_url, config.generator_model,
                                    concurrency=config.generator_concurrency)
        log.info("generating on %s (model %s)", config.generator_url, generator.model)
    else:
        engine = pick_engine(config.engine, config.model, config.gguf, config.device, job="bulk")
        if engine == "llamacpp":
            from prism.model.llamacpp import LlamaCppEngine, model_gguf

            generator = LlamaCppEngine(model_gguf(config.model, config.gguf), slots=config.batch_size,
                                       name=local.name, tokenize=local.token_ids)
            log.info("generating on llama.cpp (%s)", generator.gguf.name)
        elif engine == "vllm":
            # Our own server: every prompt of a call in flight at once, vLLM's scheduler batches them
            # (generator_concurrency is the politeness limit for servers other people run).
            generator = VllmEngine.for_model(config.model, args=config.vllm_args, max_logprobs=config.distill.top_k)
    # vLLM scores (stage 3's likelihood judge) only where torch is not on a CPU: on this 2-core CPU
    # its prompt log-probabilities take 1.46x torch's bfloat16 time (benchmarks/scoring_engines.py).
    # On a GPU its batched prefill should win; not measured here (no GPU).
    score_there = isinstance(generator, VllmEngine) and local.device.type != "cpu"
    try:
        yield local if generator is None else RemoteGenerationModel(local, generator, score_on_generator=score_there)
    finally:
        if generator is not None and hasattr(generator, "close"):
            generator.close()
