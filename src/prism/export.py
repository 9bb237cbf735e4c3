"""The run's LoRA adapter in a form every LoRA loader accepts (vLLM, SGLang, plain PEFT).

The trained adapter skips decoder layer 0 (`layers_to_transform`), because the gate reads that
layer's output. Not every serving engine honours `layers_to_transform`, so the export writes
explicit zero LoRA weights for the skipped layers and drops the setting: the same function,
stated without the option.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from prism.errors import RunError
from prism.io import atomic_write_json, atomic_write_tensors
from prism.model.loading import weights_location
from prism.run import RunDir

_LAYER = re.compile(r"\.layers\.(\d+)\.")


EXPORTED = ("adapter_config.json", "adapter_model.safetensors")


def upstream_names(adapters: list[str], single: str = "prism-adapter") -> dict[str, str]:
    """The served model name of each adapter of a run (the vLLM command `export_adapter` prints,
    the router's upstream, prism's own vLLM server): `single` for a one-adapter run, `prism-<name>`
    for each of several."""
    return {adapters[0]: single} if len(adapters) == 1 else {a: f"prism-{a}" for a in adapters}


def export_one(run: RunDir, name: str, out: Path, force: bool) -> dict:
    src = run.adapter_path(name)
    if not (src / "adapter_config.json").is_file():
        raise RunError(f"{run.path}: no finished adapter {name!r}; run `prism run --out {run.path}` first")
    config = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    present = sorted({int(m.group(1)) for k in tensors if (m := _LAYER.search(k))})
    if not present:
        raise RunError(f"{src}: no per-layer LoRA weights found")
    missing = [i for i in range(present[-1] + 1) if i not in present]
    template = present[0]
    for key in [k for k in tensors if f".layers.{template}." in k]:
        for layer in missing:  # same shapes as a trained layer, all zero: no change to the model
            tensors[key.replace(f".layers.{template}.", f".layers.{layer}.")] = torch.zeros_like(tensors[key])
    config["layers_to_transform"] = None
    config["layers_pattern"] = None
    config["base_model_name_or_path"] = weights_location(run.config().model)
    # Each file is replaced whole; nothing else in `out` is touched.
    atomic_write_tensors(out / EXPORTED[1], tensors, metadata={"format": "pt"})
    atomic_write_json(out / EXPORTED[0], config)
    return {"adapter": str(out), "rank": config.get("r"), "zero_layers": missing}


def cached_exports(run: RunDir, names: dict[str, str]) -> dict[str, Path]:
    """The run's adapters in this form, written once per adapter version into the prism cache (for
    the vLLM server `prism serve --engine vllm` starts), keyed by `names[adapter]`."""
    from prism.model.loading import adapter_fingerprint, cache_dir

    out = {}
    for adapter, served in names.items():
        dst = cache_dir() / "vllm" / f"lora-{adapter_fingerprint(run.adapter_path(adapter))}"
        if not (dst / EXPORTED[1]).is_file():
            export_one(run, adapter, dst, force=True)
        out[served] = dst
    return out


def export_gguf(run: RunDir, names: list[str], out: Path, gguf: str | None) -> dict:
    """Each adapter as `out/<name>.gguf` (a llama.cpp LoRA for the base GGUF), and the llama.cpp
    server command that loads them (scale 0 until a request's `lora` field sets one)."""
    from prism.model.gguf import write_lora_gguf
    from prism.model.llamacpp import model_gguf

    base = model_gguf(run.config().model, gguf)
    exported = {n: write_lora_gguf(run.adapter_path(n), base, out / f"{n}.gguf") for n in names}
    loras = " ".join(f"--lora {e['gguf']}" for e in exported.values())
    return {"adapters": exported, "base_model": str(base),
            "llama_server": f"llama-server -m {base} --lora-init-without-apply {loras}"}


def export_adapter(run_dir: str | Path, out: str | Path, force: bool = False, format: str = "peft",
                   gguf: str | None = None) -> dict:
    """Write the run's adapters to `out` (one adapter) or `out/<name>/` (several), and the vLLM
    command that serves them under the names the router expects; with format "gguf", as llama.cpp
    LoRA files `out/<name>.gguf`."""
    run = RunDir(run_dir).require("distill")
    names, out = run.finished_adapters(), Path(out)
    if out.resolve() == run.path.resolve() or run.path.resolve() in out.resolve().parents:
        raise RunError(f"--out {out} is inside the run directory {run.path}; export somewhere else")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RunError(f"--out {out} is not empty; choose another directory or pass --force (which replaces only "
                       f"{' and '.join(EXPORTED)}{' in each adapter folder' if len(names) > 1 else ''})")
    if format == "gguf":
        return export_gguf(run, names, out, gguf)
    single = len(names) == 1
    exported = {n: export_one(run, n, out if single else out / n, force) for n in names}
    base = weights_location(run.config().model)
    served = upstream_names(names)
    modules = " ".join(f"{served[n]}={e['adapter']}" for n, e in exported.items())
    rank = max(e["rank"] or 0 for e in exported.values())
    return {"adapters": exported, "base_model": base,
            "vllm": f"vllm serve {base} --enable-lora --max-lora-rank {rank} --lora-modules {modules}"}
