"""GGUF files for the llama.cpp engine, written with the `gguf` package: a float copy of a quantized
model (the weights the torch engine computes with), and a run's PEFT LoRA adapters as llama.cpp
LoRA files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from prism.errors import RunError
from prism.io import atomic_path

FLOAT_TYPES = ("f32", "f16", "bf16")
# PEFT target module -> llama.cpp tensor name inside a block (the Llama-family layout)
_MODULES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_PEFT_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# Architectures whose converter permutes the rows of Q and K for llama.cpp's rotary layout; a LoRA
# B matrix (output rows) of q_proj/k_proj must be permuted the same way.
_PERMUTED_QK = {"llama"}


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _copy_fields(reader, writer, skip: tuple[str, ...]) -> None:
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in skip:
            continue
        sub = field.types[-1] if len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)


def write_float_gguf(src: str | Path, dst: str | Path, dtype: str = "f16") -> Path:
    """`src` with every quantized matrix dequantized to `dtype` (f32, f16 or bf16), metadata kept.
    A Q4 model's quantized matrix products (llama.cpp rounds activations to 8 bits for them) change
    a small model's greedy replies; float weights compute what the torch engine computes."""
    import gguf

    if dtype not in FLOAT_TYPES:
        raise ValueError(f"dtype must be one of {FLOAT_TYPES}, got {dtype!r}")
    Q = gguf.GGMLQuantizationType
    target = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[dtype]
    reader = _reader(Path(src))
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        writer = gguf.GGUFWriter(str(tmp), reader.fields["general.architecture"].contents())
        _copy_fields(reader, writer, skip=("general.architecture", "general.file_type"))
        writer.add_file_type({Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
                              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16}[target])
        for t in reader.tensors:
            if t.tensor_type in (Q.F32, Q.F16, Q.BF16):
                writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
                continue
            values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            if values.ndim < 2 or target == Q.F32:  # vectors stay float32 as in llama.cpp's converter
                writer.add_tensor(t.name, values)
            elif target == Q.F16:
                writer.add_tensor(t.name, values.astype(np.float16))
            else:
                writer.add_tensor(t.name, gguf.quants.quantize(values, Q.BF16), raw_dtype=Q.BF16)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return dst


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: each head's two rotary halves interleaved (HF -> GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_lora_gguf(adapter_dir: str | Path, base_gguf: str | Path, dst: str | Path) -> dict:
    """A PEFT LoRA (adapter_config.json + adapter_model.safetensors) as a llama.cpp LoRA GGUF for
    the model in `base_gguf`. Layers the adapter leaves out (layer 0, which the gate reads) stay
    out: llama.cpp applies a LoRA only to the tensors the file names. Scale: llama.cpp multiplies
    by alpha / rank, as PEFT does without rsLoRA."""
    import gguf
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_rslora") or config.get("use_dora"):
        raise RunError(f"{adapter_dir}: rsLoRA/DoRA adapters have no llama.cpp LoRA form")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise RunError(f"{adapter_dir}: per-module ranks/alphas are not supported by the GGUF export")
    base = _reader(Path(base_gguf))
    arch = base.fields["general.architecture"].contents()
    heads = {"q_proj": base.fields[f"{arch}.attention.head_count"].contents(),
             "k_proj": base.fields[f"{arch}.attention.head_count_kv"].contents()}
    base_shapes = {t.name: tuple(int(d) for d in t.shape) for t in base.tensors}  # ggml order: (in, out)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _PEFT_KEY.search(key)
        if not m or m.group(2) not in _MODULES:
            raise RunError(f"{adapter_dir}: cannot place the LoRA weight {key!r} in a llama.cpp model")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if which == "B" and module in heads and arch in _PERMUTED_QK:
            value = _permute_rows(value, heads[module])
        pairs.setdefault(f"blk.{layer}.{_MODULES[module]}.weight", {})[which] = value.astype(np.float32)
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
        for name in sorted(pairs, key=_block_order):
            a, b = pairs[name]["A"], pairs[name]["B"]
            n_in, n_out = base_shapes.get(name, (None, None))
            if (a.shape[1], b.shape[0]) != (n_in, n_out):
                raise RunError(f"{adapter_dir}: LoRA for {name} has shape in={a.shape[1]} out={b.shape[0]}, "
                               f"the base model's tensor is in={n_in} out={n_out}: a different model?")
            writer.add_tensor(name + ".lora_a", a)
            writer.add_tensor(name + ".lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    layers = sorted({_block_order(n)[0] for n in pairs})
    n_layers = base.fields[f"{arch}.block_count"].contents()
    return {"gguf": str(dst), "rank": config.get("r"), "alpha": config["lora_alpha"], "tensors": len(pairs),
            "layers_without_lora": [i for i in range(n_layers) if i not in layers]}


def _block_order(name: str) -> tuple[int, str]:
    return int(name.split(".")[1]), name
