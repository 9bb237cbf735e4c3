"""Distillation step time in float32 vs bfloat16 autocast on this machine, same process, same batch.

    python benchmarks/train_dtype.py [--steps 6] [--batch 4] [--len 256]

Prints seconds per step for each dtype, the speed-up ratio, and how far the bf16 loss and
gradients drift from float32 (numerical safety).
"""

import argparse
import time

import torch

from prism.distill import lora_config, topk_kl
from prism.model import decoder_layers, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--len", type=int, default=256)
    args = ap.parse_args()
    from peft import get_peft_model

    m = load_model()
    peft_model = get_peft_model(m.model, lora_config(len(decoder_layers(m.model)), 16, 32, 0.0,
                                                     ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"]))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.len), generator=g)
    vals = torch.randn(args.batch, args.len, 64, generator=g) * 3
    idx = torch.randint(0, 40000, (args.batch, args.len, 64), generator=g)
    lse = torch.logsumexp(vals / 2, -1) + 1.0
    mask = torch.ones(args.batch, args.len)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01, generator=g)

    def step(dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = peft_model(input_ids=ids).logits
        loss = topk_kl(logits, vals, idx, mask, 2.0, lse)
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in params])
        for p in params:
            p.grad = None
        return loss.item(), grads

    results = {}
    for dtype in ("float32", "bfloat16"):
        step(dtype)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss, grads = step(dtype)
        results[dtype] = ((time.perf_counter() - t0) / args.steps, loss, grads)
    f32, b16 = results["float32"], results["bfloat16"]
    cos = torch.nn.functional.cosine_similarity(f32[2], b16[2], dim=0).item()
    print(f"batch {args.batch} x {args.len} tokens, {args.steps} timed steps each, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"float32  {f32[0]:.3f} s/step  loss {f32[1]:.5f}")
    print(f"bfloat16 {b16[0]:.3f} s/step  loss {b16[1]:.5f}")
    print(f"speed-up bf16/fp32 = {f32[0] / b16[0]:.2f}x; loss rel. diff {abs(b16[1] - f32[1]) / abs(f32[1]):.2e}; "
          f"gradient cosine {cos:.4f}")


if __name__ == "__main__":
    main()
