"""Load test of `prism serve` on loopback: 32 concurrent clients against one-at-a-time serving.

    python benchmarks/serve_load.py [--run-dir RUN] [--clients 32] [--per-client 2] [--max-tokens 32]

Without --run-dir a micro run is built once in runs/serve-bench (about a minute; reused after).
The server runs in this process on a free 127.0.0.1 port. Two phases on the same server:
  sequential  one client, one request at a time (no batching possible)
  concurrent  N clients at once, each sending --per-client requests back to back
Both use the same prompts greedily, so they generate the same tokens. Reported: requests/s,
completion tokens/s, p50/p95 latency, errors (must be 0), and the batching speed-up
(concurrent throughput / sequential throughput). Every phase is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is the boiling point of water?", "Write a haiku about autumn.", "How do I reverse a list in Python?",
    "Explain photosynthesis briefly.", "Give me three tips for better sleep.", "What is 17 times 23?",
    "Summarise the plot of Romeo and Juliet.", "Why is the sky blue?", "Name the planets of the solar system.",
    "What does a compiler do?", "Suggest a name for a pet turtle.", "How do vaccines work?",
    "Translate 'good morning' into Spanish.", "What causes earthquakes?", "Describe a cat in one sentence.",
    "What is the difference between weather and climate?",
]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, i: int, max_tokens: int, stream: bool) -> tuple[float, int]:
    """Latency (to the last byte) and completion tokens of one chat request; raises on any error."""
    body = {"model": "prism", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]
    tokens = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("stream ended without usage")
    return time.perf_counter() - t0, tokens


async def phase(url: str, clients: int, per_client: int, max_tokens: int, time_limit: float) -> dict:
    latencies, tokens, errors = [], 0, []
    deadline = time.monotonic() + time_limit
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=180, limits=limits) as client:

        async def worker(c: int):
            nonlocal tokens
            for k in range(per_client):
                if time.monotonic() > deadline:  # bounded in time as well as in count
                    return
                i = c * per_client + k
                try:
                    lat, n = await one_request(client, i, max_tokens, stream=i % 2 == 1)
                    latencies.append(lat)
                    tokens += n
                except Exception as e:  # counted, reported, and the run fails
                    errors.append(f"{type(e).__name__}: {e}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "error_samples": errors[:3],
            "seconds": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "completion_tokens": tokens,
            "p50_s": round(percentile(latencies, 0.5), 3), "p95_s": round(percentile(latencies, 0.95), 3),
            "mean_s": round(statistics.fmean(latencies), 3) if latencies else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="a finished run (default: build a micro run in runs/serve-bench)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=2, help="requests per concurrent client")
    ap.add_argument("--sequential", type=int, default=16, help="requests in the one-at-a-time phase")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=75.0, help="seconds per phase, at most")
    args = ap.parse_args()
    if args.clients > 64 or args.per_client * args.clients > 256:
        ap.error("kept small on purpose: at most 64 clients and 256 requests")

    from prism.config import load_config
    from prism.pipeline import run_pipeline
    from prism.routed import PrismModel
    from prism.serve.app import ServeOptions, create_app
    from prism.serve.server import BackgroundServer

    run_dir = Path(args.run_dir) if args.run_dir else ROOT / "runs" / "serve-bench"
    if not args.run_dir:
        t0 = time.perf_counter()
        # Minimal persona texts: the long ones can exceed micro's distill.max_seq_len (128 tokens).
        run_pipeline(load_config("micro", overrides={"persona_length": "minimal"}), run_dir, quiet=True)
        print(f"run {run_dir} ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    app = create_app(PrismModel.load(run_dir), ServeOptions(max_batch=args.max_batch, max_queue=128))
    with BackgroundServer(app, host="127.0.0.1") as server:
        asyncio.run(phase(server.url, 2, 1, 4, 30))  # warm-up
        seq = asyncio.run(phase(server.url, 1, args.sequential, args.max_tokens, args.time_limit))
        conc = asyncio.run(phase(server.url, args.clients, args.per_client, args.max_tokens, args.time_limit))
        stats = httpx.get(server.url + "/health", timeout=10).json()["stats"]
    result = {"max_tokens": args.max_tokens, "max_batch": args.max_batch, "sequential": seq, "concurrent": conc,
              "speedup_requests_per_s": round(conc["requests_per_s"] / max(seq["requests_per_s"], 1e-9), 2),
              "speedup_tokens_per_s": round(conc["tokens_per_s"] / max(seq["tokens_per_s"], 1e-9), 2),
              "server": {k: stats[k] for k in ("batches", "largest_batch", "rejected", "errors")}}
    print(json.dumps(result, indent=2))
    print(f"\n{'phase':<11} {'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} "
          f"{'errors':>6}")
    for name, p in (("sequential", seq), ("concurrent", conc)):
        print(f"{name:<11} {p['clients']:>7} {p['requests']:>8} {p['requests_per_s']:>7.2f} {p['tokens_per_s']:>7.1f} "
              f"{p['p50_s']:>7.2f} {p['p95_s']:>7.2f} {p['errors']:>6}")
    print(f"batching speed-up: {result['speedup_requests_per_s']}x requests/s, "
          f"{result['speedup_tokens_per_s']}x tokens/s")
    return 1 if seq["errors"] or conc["errors"] or stats["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
