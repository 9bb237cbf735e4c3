"""Distillation (stage 5) speed and peak memory for the quick preset, and what PRISM adds on disk.

    python benchmarks/train_memory.py [--run-dir runs/quick] [--train-dtype bfloat16|float32]

Stage 5 is re-run, exactly as `prism run` runs it, in a scratch copy of a finished run's stages
1-4 (its queries, answers, verdicts and gate; the copy is deleted afterwards). Reported: the stage's
wall time, the training time (sum of epoch times), student tokens/s (real tokens of every training
batch, forward + backward) and response tokens/s, and peak resident memory: of the whole process
(model load included, `getrusage` ru_maxrss) and sampled every 0.2 s during the stage. Then the size
of the adapter + gate against the base model (parameters and bytes on disk).
Writes benchmarks/results/train_memory.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, RssSampler, command, finish, machine, peak_rss_mb, table  # noqa: E402


def scratch_copy(run_dir: Path, dest: Path) -> None:
    """Stages 1-4 of `run_dir` in `dest`, stage 5 pending."""
    dest.mkdir(parents=True)
    for name in ("queries.jsonl", "answers.jsonl", "verdicts.jsonl", "judge_check.json"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
    shutil.copytree(run_dir / "gate", dest / "gate")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["stages"]["distill"] = {"status": "pending"}
    (dest / "manifest.json").write_text(json.dumps(manifest))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "quick"))
    ap.add_argument("--train-dtype", choices=["bfloat16", "float32"], help="default: the run's own setting")
    ap.add_argument("--out")
    args = ap.parse_args()
    run_dir = Path(args.run_dir)

    from safetensors import safe_open

    from prism.distill import build_example  # noqa: F401  (imported before timing)
    from prism.io import read_jsonl
    from prism.model import load_model
    from prism.model.loading import embedded_gguf_path, embedded_model_dir
    from prism.pipeline import run_pipeline
    from prism.run import RunDir

    data = {"machine": machine(), "command": command(), "run_dir": str(run_dir)}
    rss_start = peak_rss_mb()
    with tempfile.TemporaryDirectory(prefix="prism-train-") as tmp:
        work = Path(tmp) / "run"
        scratch_copy(run_dir, work)
        config = RunDir(work).config()
        if args.train_dtype:
            config = config.model_copy(update={"distill": config.distill.model_copy(
                update={"train_dtype": args.train_dtype})})
            manifest = json.loads((work / "manifest.json").read_text())
            manifest["config"] = config.to_dict()
            (work / "manifest.json").write_text(json.dumps(manifest))
        model = load_model(config.model, dtype=config.dtype, batch_size=config.batch_size)
        rss_loaded = RssSampler.current_mb()
        with RssSampler() as sampler:
            t0 = time.perf_counter()
            run_pipeline(config, work, quiet=True, model=model)
            stage_s = time.perf_counter() - t0
        losses = read_jsonl(work / "distill" / "losses.jsonl")
        summary = json.loads((work / "distill" / "summary.json").read_text())
        from prism.stages.context import StageContext
        from prism.stages.distill import distill_examples
        from prism.contexts import ContextRegistry

        reg = ContextRegistry.load(config.persona_dir)
        ctx = StageContext(config=config, model=model, personas=reg.select(config.personas), run=RunDir(work),
                           quiet=True)
        examples = distill_examples(ctx)
    train_s = sum(r["seconds"] for r in losses)
    epochs = config.distill.epochs
    student_tokens = sum(len(e.student_ids) for e in examples) * epochs
    response_tokens = sum(e.n_response for e in examples) * epochs
    data["distill"] = {
        "train_dtype": config.distill.train_dtype, "examples": len(examples), "epochs": epochs,
        "stage_seconds": round(stage_s, 1), "train_seconds": round(train_s, 1),
        "student_tokens_per_s": round(student_tokens / train_s, 1),
        "response_tokens_per_s": round(response_tokens / train_s, 1),
        "kl_initial": summary.get("kl_initial"), "kl_final": summary.get("kl_final"),
        "rss_at_start_mb": round(rss_start), "rss_model_loaded_mb": round(rss_loaded),
        "peak_rss_stage_sampled_mb": round(sampler.peak), "peak_rss_process_mb": round(peak_rss_mb()),
    }

    def n_params(path: Path) -> tuple[int, int]:
        with safe_open(str(path), "pt") as f:
            return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys()), path.stat().st_size

    adapter_p, adapter_b = n_params(run_dir / "adapter" / "adapter_model.safetensors")
    gate_p, gate_b = n_params(run_dir / "gate" / "gate.safetensors")
    base_file = embedded_model_dir() / "model.safetensors"
    base_p, base_b = n_params(base_file)
    gguf_b = embedded_gguf_path().stat().st_size
    data["sizes"] = {
        "adapter_params": adapter_p, "adapter_bytes": adapter_b, "gate_params": gate_p, "gate_bytes": gate_b,
        "base_params": base_p, "base_bytes_safetensors_fp32": base_b, "base_bytes_gguf_q4_1": gguf_b,
        "added_share_of_base_params": round((adapter_p + gate_p) / base_p, 4),
        "added_share_of_base_bytes_fp32": round((adapter_b + gate_b) / base_b, 4),
        "added_share_of_gguf_bytes": round((adapter_b + gate_b) / gguf_b, 4),
    }
    data["machine_after"] = {k: machine()[k] for k in ("load_average", "other_busy_processes")}
    d, s = data["distill"], data["sizes"]
    text = table(["metric", "value"], [
        ["train dtype", d["train_dtype"]], ["examples x epochs", f"{d['examples']} x {d['epochs']}"],
        ["stage 5 wall s (teacher + KL checks + training)", d["stage_seconds"]],
        ["training s", d["train_seconds"]], ["student tokens/s (fwd+bwd)", d["student_tokens_per_s"]],
        ["response tokens/s", d["response_tokens_per_s"]],
        ["KL initial -> final", f"{d['kl_initial']} -> {d['kl_final']}"],
        ["RSS after model load MB", d["rss_model_loaded_mb"]],
        ["peak RSS during stage 5 MB (sampled)", d["peak_rss_stage_sampled_mb"]],
        ["peak RSS of the process MB (ru_maxrss)", d["peak_rss_process_mb"]],
    ], title="Stage 5 (distillation), quick preset")
    text += "\n\n" + table(["part", "parameters", "bytes", "share of base parameters"], [
        ["LoRA adapter", s["adapter_params"], s["adapter_bytes"], f"{100 * s['adapter_params'] / s['base_params']:.2f}%"],
        ["gate", s["gate_params"], s["gate_bytes"], f"{100 * s['gate_params'] / s['base_params']:.3f}%"],
        ["adapter + gate", s["adapter_params"] + s["gate_params"], s["adapter_bytes"] + s["gate_bytes"],
         f"{100 * s['added_share_of_base_params']:.2f}%"],
        ["base model (fp32 safetensors)", s["base_params"], s["base_bytes_safetensors_fp32"], "100%"],
        ["base model (GGUF Q4_1 as shipped)", "", s["base_bytes_gguf_q4_1"], ""],
    ], title="What PRISM adds to the base model")
    return finish("train_memory", data, text, args.out)


def _prod(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


if __name__ == "__main__":
    sys.exit(main())
