"""How wall time grows: the pipeline with queries per persona, the server with concurrent clients.

    python benchmarks/scaling.py [--personas math,writing] [--n 4,8,16,32] [--clients 1,2,4,8,16,32]
                                 [--until distill] [--fast] [--run-dir runs/quick] [--skip-pipeline|--skip-serve]

Pipeline: one fresh run (quick preset, the given personas) per value of queries per persona, all
stages up to --until; the per-stage seconds come from each run's manifest. --fast adds
`infer_dtype: bfloat16` (prefix reuse is on by default). Serving: `prism serve`'s app on a free
127.0.0.1 port with --run-dir's adapter and gate (benchmarks/serve_load.py's client: greedy
32-token chat requests, every other one streamed); with c clients each sends --per-client
requests back to back; bounded in count and time. Writes benchmarks/results/scaling.json,
benchmarks/results/scaling_pipeline.png and benchmarks/results/scaling_serve.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT_DIR, ROOT, command, header, machine, table, write_json  # noqa: E402

STAGES = ("queries", "answers", "verdicts", "gate", "distill")


def pipeline_scaling(personas, ns, until, fast) -> list[dict]:
    from prism.config import load_config
    from prism.model import load_model
    from prism.pipeline import run_pipeline

    model = load_model(batch_size=16)
    model.generate([model.user_prompt("Hello")] * 2, 4)  # warm-up
    rows = []
    with tempfile.TemporaryDirectory(prefix="prism-scaling-") as tmp:
        for n in ns:
            over = {"personas": personas, "queries.n_per_persona": n}
            if fast:
                over["infer_dtype"] = "bfloat16"
            out = Path(tmp) / f"n{n}"
            t0 = time.perf_counter()
            run = run_pipeline(load_config("quick", overrides=over), out, until=until, quiet=True, model=model)
            wall = time.perf_counter() - t0
            st = run.manifest["stages"]
            row = {"n_per_persona": n, "queries": st["queries"].get("count"), "wall_s": round(wall, 1),
                   "stages_s": {s: st[s].get("seconds") for s in STAGES if st[s].get("status") == "done"},
                   "distill_examples": st.get("distill", {}).get("examples")}
            rows.append(row)
            print(f"n={n}: {row}", file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return rows


def serve_scaling(run_dir, clients, per_client, max_tokens, time_limit) -> list[dict]:
    import httpx

    from serve_load import phase
    from prism.routed import PrismModel
    from prism.serve.app import ServeOptions, create_app
    from prism.serve.server import BackgroundServer

    app = create_app(PrismModel.load(run_dir), ServeOptions(max_batch=16, max_queue=128))
    rows = []
    with BackgroundServer(app, host="127.0.0.1") as server:
        asyncio.run(phase(server.url, 2, 1, 4, 30))  # warm-up
        for c in clients:
            per = max(per_client, 4 // c)  # at least 4 requests per point
            r = asyncio.run(phase(server.url, c, per, max_tokens, time_limit))
            rows.append(r)
            print(f"clients={c}: {r['requests_per_s']} req/s p50 {r['p50_s']} s", file=sys.stderr, flush=True)
        stats = httpx.get(server.url + "/health", timeout=10).json()["stats"]
    if stats["errors"]:
        raise RuntimeError(f"server errors: {stats}")
    return rows


def plots(data: dict, out_dir: Path = OUT_DIR) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if data.get("pipeline"):
        rows = data["pipeline"]
        ns = [r["n_per_persona"] for r in rows]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        bottom = [0.0] * len(rows)
        for s in STAGES:
            vals = [r["stages_s"].get(s, 0) or 0 for r in rows]
            if any(vals):
                ax.bar([str(n) for n in ns], vals, bottom=bottom, label=s)
                bottom = [b + v for b, v in zip(bottom, vals)]
        ax.plot([str(n) for n in ns], [r["wall_s"] for r in rows], "k.-", label="total wall")
        ax.set_xlabel(f"queries per persona ({len(data['personas'])} personas)")
        ax.set_ylabel("wall time (s)")
        ax.set_title("PRISM pipeline wall time vs queries per persona" + (" (--fast)" if data.get("fast") else ""))
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / "scaling_pipeline.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    if data.get("serve"):
        rows = data["serve"]
        cs = [r["clients"] for r in rows]
        fig, ax1 = plt.subplots(figsize=(6.4, 4.2))
        ax1.plot(cs, [r["requests_per_s"] for r in rows], "o-", color="tab:blue", label="requests/s")
        ax1.set_xscale("log", base=2)
        ax1.set_xlabel("concurrent clients")
        ax1.set_ylabel("throughput (requests/s)", color="tab:blue")
        ax2 = ax1.twinx()
        ax2.plot(cs, [r["p50_s"] for r in rows], "s--", color="tab:red", label="p50 latency")
        ax2.set_ylabel("p50 latency (s)", color="tab:red")
        ax1.set_title(f"prism serve: {data['serve_max_tokens']}-token replies vs concurrent clients")
        fig.tight_layout()
        p = out_dir / "scaling_serve.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--personas", default="math,writing")
    ap.add_argument("--n", default="4,8,16,32", help="queries per persona")
    ap.add_argument("--until", default="distill", choices=STAGES)
    ap.add_argument("--fast", action="store_true", help="infer_dtype bfloat16 for stages 1-3 and the teacher")
    ap.add_argument("--clients", default="1,2,4,8,16,32")
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--time-limit", type=float, default=90.0)
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "quick"))
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--plot-only", help="redraw the plots from this JSON")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.plot_only:
        print("\n".join(plots(json.loads(Path(args.plot_only).read_text()), Path(args.plot_only).parent)))
        return 0
    clients = [int(c) for c in args.clients.split(",")]
    if max(clients) > 64 or max(clients) * args.per_client > 256:
        ap.error("kept small on purpose: at most 64 clients and 256 requests")
    personas = [p.strip() for p in args.personas.split(",") if p.strip()]
    data = {"machine": machine(), "command": command(), "personas": personas, "fast": args.fast,
            "until": args.until, "serve_max_tokens": args.max_tokens}
    if not args.skip_pipeline:
        data["pipeline"] = pipeline_scaling(personas, [int(n) for n in args.n.split(",")], args.until, args.fast)
    if not args.skip_serve:
        data["serve"] = serve_scaling(args.run_dir, clients, args.per_client, args.max_tokens, args.time_limit)
    data["machine_after"] = {k: machine()[k] for k in ("load_average", "other_busy_processes")}
    text = ""
    if data.get("pipeline"):
        rows = data["pipeline"]
        base = rows[0]
        text += table(["queries/persona", "n queries", *[s for s in STAGES if s in base["stages_s"]], "total s",
                       "s per query", "x time vs first", "x queries vs first"],
                      [[r["n_per_persona"], r["queries"], *[r["stages_s"].get(s) for s in STAGES if s in base["stages_s"]],
                        r["wall_s"], round(r["wall_s"] / max(1, r["queries"]), 2),
                        round(r["wall_s"] / base["wall_s"], 2), round(r["queries"] / base["queries"], 2)]
                       for r in rows],
                      title=f"Pipeline (stages up to {args.until}) vs queries per persona, {len(personas)} personas")
    if data.get("serve"):
        rows = data["serve"]
        seq = rows[0]["requests_per_s"]
        text += ("\n\n" if text else "") + table(
            ["clients", "requests", "req/s", "tok/s", "p50 s", "p95 s", "errors", "x req/s vs 1 client"],
            [[r["clients"], r["requests"], r["requests_per_s"], r["tokens_per_s"], r["p50_s"], r["p95_s"], r["errors"],
              round(r["requests_per_s"] / seq, 2)] for r in rows],
            title=f"prism serve vs concurrent clients ({args.max_tokens}-token greedy replies, max batch 16)")
    data["table"] = text
    data["plots"] = plots(data, Path(args.out).parent if args.out else OUT_DIR)
    path = write_json("scaling", data, args.out)
    print(header(data) + "\n\n" + text + "\n\nplots: " + ", ".join(data["plots"]) + f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
