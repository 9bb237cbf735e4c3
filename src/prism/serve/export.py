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

from prism.config import EMBEDDED_MODEL
from prism.errors import RunError
from prism.io import atomic_directory, atomic_write_json, atomic_write_tensors
from prism.run import RunDir

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def base_model_location(model: str) -> str:
    """Where a serving engine finds the base weights: the embedded model's safetensors folder,
    or the model id / directory the run used."""
    if model == EMBEDDED_MODEL:
        from prism.model.loading import embedded_model_dir

        return str(embedded_model_dir())
    return model


def export_adapter(run_dir: str | Path, out: str | Path) -> dict:
    run = RunDir(run_dir).require("distill")
    src = run.adapter_dir
    if not (src / "adapter_config.json").is_file():
        raise RunError(f"{run.path}: no finished adapter; run `prism run --out {run.path}` first")
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
    base = base_model_location(run.config().model)
    config["base_model_name_or_path"] = base

    out = Path(out)
    with atomic_directory(out) as tmp:  # a reader sees no adapter or a whole one
        atomic_write_tensors(tmp / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", config)
    return {"adapter": str(out), "base_model": base, "rank": config.get("r"), "zero_layers": missing,
            "vllm": f"vllm serve {base} --enable-lora --max-lora-rank {config.get('r')} "
                    f"--lora-modules prism-adapter={out}"}
