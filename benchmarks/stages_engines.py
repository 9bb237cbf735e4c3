"""Stages 1-3 (queries, both answers, verdicts) on each generation engine, the same work each time.

    python benchmarks/stages_engines.py [--engines torch,llamacpp,vllm] [--config FILE] [--preset quick]

Default work: the paper-like load of issue 13/19 (12 personas x 4 queries, 512-token answers,
`queries.n_per_persona: 4`, `answers.max_new_tokens: 512`, quick preset otherwise). Each engine
runs `prism run --until verdicts --engine E` in a fresh process on a fresh directory (so one
engine's threads and caches never slow the next), one after the other. Reported per engine: each
stage's seconds (from the manifest), stages 1-3 together, the process's wall time (model load and
engine start-up included; start-up = wall - stages), peak RSS of the process tree, and the label
balance and judge check of stage 3. The vllm engine runs where vLLM imports (PRISM_VLLM_PYTHON).
Writes benchmarks/results/stages_engines.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, finish, machine, table  # noqa: E402

PAPER_LIKE = {"preset": "quick", "queries": {"n_per_persona": 4}, "answers": {"max_new_tokens": 512}}
STAGES = ("queries", "answers", "verdicts")


def run_one(engine: str, config: dict, workdir: Path) -> dict:
    cfg = workdir / f"{engine}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = workdir / engine
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "prism.cli", "run", "--config", str(cfg), "--engine", engine,
                           "--until", "verdicts", "--out", str(out), "--quiet"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    manifest = json.loads((out / "manifest.json").read_text())
    stages = {s: round(manifest["stages"][s]["seconds"], 1) for s in STAGES}
    verdicts = manifest["stages"]["verdicts"]
    return {"stages": stages, "stages_total": round(sum(stages.values()), 1), "wall": round(wall, 1),
            "startup_and_load": round(wall - sum(stages.values()), 1),
            "engine": manifest["stages"]["answers"].get("engine"),
            "scored_on": manifest["stages"]["verdicts"].get("scored_on"),
            "tokens_generated": sum(manifest["stages"][s].get("tokens_generated", 0) for s in STAGES),
            "labels": {"distill": verdicts.get("distill"), "retain": verdicts.get("retain")},
            "judge_check": verdicts.get("judge_check"),
            # ru_maxrss of children: the largest child so far (a vLLM worker counts on its own)
            "peak_child_rss_mb": round(max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="torch,llamacpp,vllm")
    ap.add_argument("--config", help="YAML settings of the work (default: the paper-like load)")
    ap.add_argument("--out", help="JSON results (default benchmarks/results/stages_engines.json)")
    args = ap.parse_args()
    config = yaml.safe_load(Path(args.config).read_text()) if args.config else PAPER_LIKE
    data = {"machine": machine(), "command": command(), "work": config, "engines": {}}
    with tempfile.TemporaryDirectory(prefix="prism-stages-") as tmp:
        for engine in args.engines.split(","):
            if engine == "vllm":
                from prism.model.vllm import unavailable

                if problem := unavailable():
                    data["engines"][engine] = {"error": problem}
                    continue
            print(f"{engine} ...", flush=True)
            data["engines"][engine] = run_one(engine, config, Path(tmp))
    torch_run = data["engines"].get("torch", {})
    rows, torch_total, torch_wall = [], torch_run.get("stages_total"), torch_run.get("wall")
    for engine, r in data["engines"].items():
        if "error" in r:
            rows.append([engine, "error: " + str(r["error"])[:60], "", "", "", "", "", "", "", "", ""])
            continue
        ratio = round(r["stages_total"] / torch_total, 3) if torch_total else ""
        wall_ratio = round(r["wall"] / torch_wall, 3) if torch_wall else ""
        rows.append([engine, *r["stages"].values(), r["stages_total"], ratio, r["startup_and_load"], r["wall"],
                     wall_ratio, r.get("scored_on", ""),
                     f"{r['labels']['distill']}/{r['labels']['retain']}", r["peak_child_rss_mb"]])
    text = table(["engine", "queries s", "answers s", "verdicts s", "stages 1-3 s", "/ torch", "start-up + load s",
                  "wall s", "wall / torch", "judge scored on", "labels distill/retain", "peak RSS MB"], rows,
                 title=f"stages 1-3, {json.dumps(config)}")
    return finish("stages_engines", data, text, args.out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
