"""Load test of `prism serve` on loopback: batching speed-up, then 64 clients of whom some are
hostile or impatient.

    python benchmarks/serve_load.py [--run-dir RUN] [--clients 32] [--hostile-clients 64] [--max-tokens 32]

Without --run-dir a micro run is built once in runs/serve-bench (about a minute; reused after).
The server runs in this process on a free 127.0.0.1 port. Three phases on the same server:
  sequential  one client, one request at a time (no batching possible)
  concurrent  N clients at once, each sending --per-client requests back to back
  hostile     64 clients at once: 10% send malformed requests (bad JSON, a 65-bit seed, an
              unknown field, text/plain, a foreign Host, tools, 40,000-deep nesting), 10% ask for
              long replies and disconnect early (streaming: after the first chunk; plain: after
              1 s), the rest are ordinary requests
The first two use the same prompts greedily, so they generate the same tokens. Reported:
requests/s, completion tokens/s, p50/p95 latency, errors, the batching speed-up; for the hostile
phase, the valid requests' errors (must be 0), the malformed ones answered 4xx (must be all), and
the tokens the server generated for a client after it left (must be at most one decode step per
client). Writes benchmarks/results/serve_load.json; exit code 1 when a requirement fails.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, command, finish, machine, table  # noqa: E402

PROMPTS = [
    "What is the boiling point of water?", "Write a haiku about autumn.", "How do I reverse a list in Python?",
    "Explain photosynthesis briefly.", "Give me three tips for better sleep.", "What is 17 times 23?",
    "Summarise the plot of Romeo and Juliet.", "Why is the sky blue?", "Name the planets of the solar system.",
    "What does a compiler do?", "Suggest a name for a pet turtle.", "How do vaccines work?",
    "Translate 'good morning' into Spanish.", "What causes earthquakes?", "Describe a cat in one sentence.",
    "What is the difference between weather and climate?",
]
JSON = {"content-type": "application/json"}
OK_BODY = {"model": "prism", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
# (what, raw body, headers): each must get a 4xx with an OpenAI error body
MALFORMED = [
    ("not JSON", b'{"messages": [', JSON),
    ("65-bit seed", json.dumps({**OK_BODY, "seed": 2**64}).encode(), JSON),
    ("unknown field", json.dumps({**OK_BODY, "temprature": 0.5}).encode(), JSON),
    ("text/plain", json.dumps(OK_BODY).encode(), {"content-type": "text/plain"}),
    ("foreign Host", json.dumps(OK_BODY).encode(), {**JSON, "host": "evil.example"}),
    ("tools", json.dumps({**OK_BODY, "tools": [{"type": "function", "function": {"name": "f"}}]}).encode(), JSON),
    ("deep nesting", b'{"messages": ' + b"[" * 40_000 + b"]" * 40_000 + b"}", JSON),
]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def chat_body(i: int, max_tokens: int, stream: bool) -> dict:
    return {"model": "prism", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}


async def one_request(client: httpx.AsyncClient, i: int, max_tokens: int, stream: bool) -> tuple[float, int]:
    """Latency (to the last byte) and completion tokens of one chat request; raises on any error."""
    body = chat_body(i, max_tokens, stream)
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
                if "error" in chunk:
                    raise RuntimeError(f"error in the stream: {chunk['error']}")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("stream ended without usage")
    return time.perf_counter() - t0, tokens


def summary(clients: int, latencies: list[float], tokens: int, errors: list[str], wall: float) -> dict:
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "error_samples": errors[:3],
            "seconds": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "completion_tokens": tokens,
            "p50_s": round(percentile(latencies, 0.5), 3), "p95_s": round(percentile(latencies, 0.95), 3),
            "mean_s": round(statistics.fmean(latencies), 3) if latencies else None}


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
    return summary(clients, latencies, tokens, errors, wall)


async def hostile_phase(url: str, clients: int, max_tokens: int, leave_tokens: int) -> dict:
    """Every 10th client (0, 10, ...) sends a malformed request, every 10th from 5 on disconnects
    early from a long reply; the others send one ordinary request each."""
    latencies, tokens, errors, malformed, left = [], 0, [], [], 0

    async def valid(client, i):
        nonlocal tokens
        try:
            lat, n = await one_request(client, i, max_tokens, stream=i % 2 == 1)
            latencies.append(lat)
            tokens += n
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    async def bad(client, i):
        what, raw, headers = MALFORMED[(i // 10) % len(MALFORMED)]
        r = await client.post("/v1/chat/completions", content=raw, headers=headers)
        ok = 400 <= r.status_code < 500 and set(r.json().get("error", {})) >= {"message", "type", "code"}
        malformed.append((what, r.status_code, ok))

    async def leaver(client, i):
        nonlocal left
        body = chat_body(i, leave_tokens, stream=i % 20 == 5)
        if body["stream"]:  # read the first content chunk, then hang up
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        break
        else:  # give up waiting after a second
            try:
                await asyncio.wait_for(client.post("/v1/chat/completions", json=body), timeout=1.0)
            except asyncio.TimeoutError:
                pass
        left += 1

    t0 = time.perf_counter()
    # One connection per client (a client that hangs up closes its own connection only).
    async def one(i):
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            await (bad if i % 10 == 0 else leaver if i % 10 == 5 else valid)(client, i)

    await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    out = summary(clients - len(malformed) - left, latencies, tokens, errors, wall)
    out.update(malformed=len(malformed), malformed_4xx=sum(ok for *_, ok in malformed),
               malformed_statuses=sorted({f"{w}: {s}" for w, s, _ in malformed}), disconnected=left)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="a finished run (default: build a micro run in runs/serve-bench)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=2, help="requests per concurrent client")
    ap.add_argument("--sequential", type=int, default=16, help="requests in the one-at-a-time phase")
    ap.add_argument("--hostile-clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--leave-tokens", type=int, default=400, help="max_tokens of the clients that leave early")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=75.0, help="seconds per phase, at most")
    ap.add_argument("--out", help="JSON results (default benchmarks/results/serve_load.json)")
    args = ap.parse_args()
    if max(args.clients, args.hostile_clients) > 64 or args.per_client * args.clients > 256:
        ap.error("kept small on purpose: at most 64 clients and 256 requests")

    from prism.config import load_config
    from prism.pipeline import run_pipeline
    from prism.routed import PrismModel
    from prism.serve.app import ServeOptions, create_app
    from prism.serve.server import BackgroundServer

    run_dir = Path(args.run_dir) if args.run_dir else ROOT / "runs" / "serve-bench"
    if not args.run_dir:
        t0 = time.perf_counter()
        run_pipeline(load_config("micro"), run_dir, quiet=True)
        print(f"run {run_dir} ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    data = {"machine": machine(), "command": command(), "run_dir": str(run_dir), "max_tokens": args.max_tokens,
            "max_batch": args.max_batch}
    app = create_app(PrismModel.load(run_dir), ServeOptions(max_batch=args.max_batch, max_queue=128))
    with BackgroundServer(app, host="127.0.0.1") as server:
        asyncio.run(phase(server.url, 2, 1, 4, 30))  # warm-up
        seq = asyncio.run(phase(server.url, 1, args.sequential, args.max_tokens, args.time_limit))
        conc = asyncio.run(phase(server.url, args.clients, args.per_client, args.max_tokens, args.time_limit))
        before = dict(app.state.batcher.stats)
        hostile = asyncio.run(hostile_phase(server.url, args.hostile_clients, args.max_tokens, args.leave_tokens))
        time.sleep(1.0)  # the worker notices the last disconnects at its next step
        after = dict(app.state.batcher.stats)
    delta = {k: after[k] - before[k] for k in ("requests", "errors", "cancelled", "cancelled_queued",
                                               "tokens_after_cancel")}
    # The leavers whose request reached the queue (the others left while it was being read).
    submitted = delta["requests"] - hostile["requests"] - hostile["errors"]
    hostile.update(server_cancelled=delta["cancelled"], cancelled_queued=delta["cancelled_queued"],
                   left_before_queued=hostile["disconnected"] - submitted,
                   tokens_after_cancel=delta["tokens_after_cancel"],
                   max_tokens_after_cancel=after["max_tokens_after_cancel"], server_errors=delta["errors"])
    data.update(sequential=seq, concurrent=conc, hostile=hostile,
                speedup_requests_per_s=round(conc["requests_per_s"] / max(seq["requests_per_s"], 1e-9), 2),
                speedup_tokens_per_s=round(conc["tokens_per_s"] / max(seq["tokens_per_s"], 1e-9), 2),
                server={k: after[k] for k in ("batches", "largest_batch", "rejected", "errors")})
    failures = [msg for bad, msg in [
        (seq["errors"] or conc["errors"] or hostile["errors"], "valid requests failed"),
        (hostile["malformed_4xx"] != hostile["malformed"], "a malformed request did not get a 4xx error body"),
        (hostile["max_tokens_after_cancel"] > 1, "more than one decode step for a client that left"),
        (hostile["server_cancelled"] + hostile["cancelled_queued"] + hostile["left_before_queued"]
         != hostile["disconnected"], "the server did not drop every client that left"),
        (after["errors"], "the server counted errors")] if bad]
    data["failures"] = failures

    text = table(["phase", "clients", "requests", "req/s", "tok/s", "p50 s", "p95 s", "errors"],
                 [[name, p["clients"], p["requests"], p["requests_per_s"], p["tokens_per_s"], p["p50_s"], p["p95_s"],
                   p["errors"]] for name, p in (("sequential", seq), ("concurrent", conc), ("hostile (valid)", hostile))],
                 title=f"chat requests, max_tokens {args.max_tokens}, greedy, max_batch {args.max_batch}")
    text += (f"\n\nbatching speed-up: {data['speedup_requests_per_s']}x requests/s, "
             f"{data['speedup_tokens_per_s']}x tokens/s")
    h = hostile
    text += "\n\n" + table(
        ["clients", "valid", "valid errors", "malformed", "answered 4xx", "left early", "left before queued",
         "dropped queued", "dropped mid-reply", "tokens after leaving", "most for one client"],
        [[args.hostile_clients, h["requests"] + h["errors"], h["errors"], h["malformed"], h["malformed_4xx"],
          h["disconnected"], h["left_before_queued"], h["cancelled_queued"], h["server_cancelled"],
          h["tokens_after_cancel"], h["max_tokens_after_cancel"]]],
        title=f"hostile phase: 10% malformed, 10% leave early (max_tokens {args.leave_tokens})")
    text += "\n\nmalformed: " + "; ".join(h["malformed_statuses"])
    text += "\n\n" + ("requirements met" if not failures else "FAILED: " + "; ".join(failures))
    finish("serve_load", data, text, args.out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
