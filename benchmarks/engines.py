"""The generation engines side by side on one run: torch (transformers, the reference), llamacpp
(in-process llama.cpp through xllamacpp) and vllm (vLLM's server as a child process, where it
imports: PRISM_VLLM_PYTHON); the gate stays in torch.

    python benchmarks/engines.py [--run-dir RUN] [--max-tokens 128] [--clients 16] [--no-vllm] [--engine-torch-threads N]

Without --run-dir a micro run is built once in runs/serve-bench (about a minute; reused after).
Phases, each engine in turn (llama.cpp first, then vLLM, then torch in float32, the reference, and
serving again in bfloat16 as `prism serve --engine torch` does where the CPU has bf16 units):
  serve, one client   `prism serve` on loopback, the `openai` client, one request at a time,
                      `prism-base` (adapter off), `prism-adapter` (on) and `prism` (the gate decides)
  serve, N clients    N clients at once, 2 requests each, through the same server: all on
                      `prism-base`, then all on `prism` (routes recorded)
  bulk                32 prompts x max-tokens sampled at once (stages 1-3 and eval work): torch
                      float32 and bfloat16 batches, llama.cpp on the float16 and the Q4_1 GGUF
  agreement           greedy replies of each engine against torch's on 16 prompts, adapter off and
                      on; the gate's route from the full torch model and from the engine's
                      layer-0-only model on 200 prompts (vLLM: the route header of 100 requests)
vLLM's start-up (child process, model load, compile) is reported apart; bulk on vLLM uses a second
server without LoRA, as `prism run --engine vllm` starts it.
Reported: tokens/s (completion tokens / wall time, prefill included), the routed reply's time per
token over the base model's on the same engine, errors, agreement. Writes
benchmarks/results/engines.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, RssSampler, command, finish, machine, table  # noqa: E402

LONG = ["Write a long story about a lighthouse keeper.", "Describe, in detail, how bread is made.",
        "Explain the history of the printing press at length.", "Write a long letter to a friend about a trip.",
        "Describe a busy market in a big city in detail.", "Tell a long tale about a dragon and a knight."]
SHORT = ["What is the capital of France?", "Write a haiku about rain.", "Name three primary colors.",
         "Give me one tip for sleeping better.", "Explain what a verb is.", "How do I boil an egg?",
         "What is 12 times 7?", "Who wrote Hamlet?", "Why is the sea salty?", "What does a compiler do?",
         "Suggest a name for a cat.", "How many legs does a spider have?", "What is photosynthesis?",
         "Describe the moon in one sentence.", "What is a prime number?", "How do birds fly?"]


def route_of(reply) -> str | None:
    """The route prism reports in a reply's `prism` field."""
    return (getattr(reply, "model_extra", None) or {}).get("prism", {}).get("route")


def serve_phases(url: str, max_tokens: int, clients: int, repeats: int, adapter_id: str) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    out = {}
    for model in ("prism-base", adapter_id, "prism"):
        # untimed: the first request of a model id warms what it touches (a server's first decode)
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi!"}], max_tokens=8)
        tokens, seconds, routes = 0, 0.0, []
        for i in range(repeats):
            msgs = [{"role": "user", "content": LONG[i % len(LONG)]}]
            t0 = time.perf_counter()
            r = client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0)
            seconds += time.perf_counter() - t0
            tokens += r.usage.completion_tokens
            routes.append(route_of(r))
        out["prism-adapter" if model == adapter_id else model] = {
            "model": model, "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "routes": routes}

    async def burst(model: str):
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        errors, routes = 0, []

        async def one(i):
            nonlocal errors
            done = 0
            for k in range(2):
                msgs = [{"role": "user", "content": LONG[(i + k) % len(LONG)] + f" (version {i})"}]
                try:
                    r = await aclient.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens,
                                                              temperature=0.7, seed=i * 10 + k)
                    done += r.usage.completion_tokens
                    routes.append(route_of(r))
                except openai.OpenAIError:
                    errors += 1
            return done

        try:
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(one(i) for i in range(clients)))
            return sum(counts), time.perf_counter() - t0, errors, routes
        finally:
            await aclient.close()

    # N clients at once: all on the base model, then routed by the gate (a mix of routes costs an
    # engine one forward pass per route and step: an adapter is a switch on the whole model)
    for key, model in (("concurrent_base", "prism-base"), ("concurrent", "prism")):
        tokens, seconds, errors, routes = asyncio.run(burst(model))
        out[key] = {"model": model, "clients": clients, "requests": 2 * clients, "tokens": tokens,
                    "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1), "errors": errors,
                    "routes": dict(collections.Counter(routes))}
    return out


def bulk_rate(generate, prompts, max_tokens: int) -> dict:
    generate(prompts[:2], 8)  # warm-up
    t0 = time.perf_counter()
    gens = generate(prompts, max_tokens)
    seconds = time.perf_counter() - t0
    tokens = sum(g.n_tokens for g in gens)
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def prefix_agreement(tok, a: list[str], b: list[str]) -> tuple[float, int]:
    same, total = 0, 0
    for x, y in zip(a, b):
        tx, ty = tok(x), tok(y)
        same += next((i for i, (p, q) in enumerate(zip(tx, ty)) if p != q), min(len(tx), len(ty)))
        total += max(len(tx), len(ty))
    return same / max(total, 1), sum(x == y for x, y in zip(a, b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", help="a finished run (default: build a micro run in runs/serve-bench)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="one-client requests per model id")
    ap.add_argument("--out", help="JSON results (default benchmarks/results/engines.json)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vllm engine")
    ap.add_argument("--engine-torch-threads", type=int,
                    help="torch threads during the llama.cpp phase (default: ENGINE_TORCH_THREADS, as prism serve)")
    args = ap.parse_args()

    import torch

    from prism.config import load_config
    from prism.model.llamacpp import LlamaCppEngine, embedded_float_gguf
    from prism.model.loading import embedded_gguf_path
    from prism.pipeline import run_pipeline
    from prism.routed import ENGINE_TORCH_THREADS, PrismModel
    from prism.serve.app import ServeOptions, create_app
    from prism.serve.server import serving_dtype
    from prism.serve.router import RouterOptions, create_engine_app
    from prism.serve.server import BackgroundServer

    run_dir = Path(args.run_dir) if args.run_dir else ROOT / "runs" / "serve-bench"
    if not (run_dir / "gate").is_dir():
        run_pipeline(load_config("micro"), run_dir, quiet=True)
    data = {"machine": machine(), "command": command(), "run_dir": str(run_dir), "max_tokens": args.max_tokens}

    # ----- llama.cpp -------------------------------------------------------------------------------
    # llama.cpp first, with torch on one thread as `prism serve` runs it (ENGINE_TORCH_THREADS):
    # with torch's own team of threads in the process, llama.cpp's serving lost a third or more.
    torch_threads = torch.get_num_threads()
    with RssSampler() as rss:
        engine_model = PrismModel.load_on_engine(run_dir, slots=max(args.clients, 16),
                                                 torch_threads=args.engine_torch_threads or ENGINE_TORCH_THREADS)
        data["engine_torch_threads"] = torch.get_num_threads()
        adapter_id = f"prism-{engine_model.adapters[0]}"  # forced on: the first adapter
        prompts = [engine_model.model.user_prompt(q) for q in (SHORT * 2)]
        convs = [[{"role": "user", "content": q}] for q in SHORT]
        on_off = (False, engine_model.adapters[0])
        route_prompts = [f"{q} ({i})" for i in range(13) for q in SHORT][:200]
        app = create_engine_app(engine_model, RouterOptions())
        with BackgroundServer(app) as server:
            data["llamacpp_serve"] = serve_phases(server.url, args.max_tokens, args.clients, args.repeats,
                                                 adapter_id)
        ids = [engine_model.model.token_ids(p) for p in prompts]
        data["bulk_llamacpp_f16"] = bulk_rate(
            lambda p, n: engine_model.engine.generate(p, n, temperature=0.8, seed=1), ids, args.max_tokens)
        got = {on: [r.text for r in engine_model.chat_batch(convs, 64, adapter=on)] for on in on_off}
        engine_routes = [r.name for r in engine_model.route([[{"role": "user", "content": p}] for p in route_prompts])]
    data["llamacpp_peak_rss_mb"] = round(rss.peak)
    del engine_model, app  # one llama.cpp server at a time: a second one's threads slow the first
    gc.collect()
    q4 = LlamaCppEngine(embedded_gguf_path(), slots=32)
    data["bulk_llamacpp_q4_1"] = bulk_rate(lambda p, n: q4.generate(p, n, temperature=0.8, seed=1), ids,
                                           args.max_tokens)
    q4_greedy = [g.text for g in q4.generate(ids[: len(SHORT)], 64)]
    del q4
    gc.collect()
    data["gguf"] = str(embedded_float_gguf())

    # ----- vLLM ----------------------------------------------------------------------------------
    from prism.model.vllm import VllmEngine, unavailable

    vllm_problem = "skipped (--no-vllm)" if args.no_vllm else unavailable()
    if vllm_problem is None:
        import openai

        from prism.serve.router import create_vllm_app

        app = create_vllm_app(run_dir, RouterOptions(), [])
        try:
            data["vllm_startup_s"] = {"serve_with_lora": round(app.state.vllm.startup_seconds, 1)}
            with BackgroundServer(app) as server:
                data["vllm_serve"] = serve_phases(server.url, args.max_tokens, args.clients, args.repeats,
                                                  adapter_id)
                client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
                vllm_got = {on: [client.chat.completions.create(
                    model=adapter_id if on else "prism-base", messages=c, max_tokens=64,
                    temperature=0).choices[0].message.content for c in convs] for on in on_off}
                vllm_routes = [client.chat.completions.with_raw_response.create(
                    model="prism", messages=[{"role": "user", "content": p}], max_tokens=1,
                    temperature=0).headers["x-prism-route"] for p in route_prompts[:100]]
        finally:
            app.state.vllm.close()
        del app
        from prism.run import RunDir

        bulk_engine = VllmEngine.for_model(RunDir(run_dir).config().model)
        try:
            data["vllm_startup_s"]["bulk"] = round(bulk_engine.server.startup_seconds, 1)
            data["bulk_vllm_bf16"] = bulk_rate(lambda p, n: bulk_engine.generate(p, n, temperature=0.8, seed=1),
                                               prompts, args.max_tokens)
        finally:
            bulk_engine.close()
    else:
        data["vllm"] = vllm_problem
    gc.collect()

    # ----- torch ---------------------------------------------------------------------------------
    torch.set_num_threads(torch_threads)
    with RssSampler() as rss:
        torch_model = PrismModel.load(run_dir)
        app = create_app(torch_model, ServeOptions(max_batch=args.clients, max_queue=128))
        with BackgroundServer(app) as server:
            data["torch_serve"] = serve_phases(server.url, args.max_tokens, args.clients, args.repeats,
                                              adapter_id)
        chat = torch_model.model
        chat.batch_size = 32
        data["bulk_torch_float32"] = bulk_rate(lambda p, n: chat.generate(p, n, temperature=0.8, seed=1), prompts,
                                               args.max_tokens)
        with chat.inference_dtype("bfloat16"):
            data["bulk_torch_bfloat16"] = bulk_rate(lambda p, n: chat.generate(p, n, temperature=0.8, seed=1),
                                                    prompts, args.max_tokens)
        greedy = {on: [r.text for r in torch_model.chat_batch(convs, 64, adapter=on)] for on in on_off}
        torch_routes = [r.name for r in torch_model.route([[{"role": "user", "content": p}] for p in route_prompts])]
        tok = chat.token_ids
    data["torch_peak_rss_mb"] = round(rss.peak)
    # the torch engine as `prism serve --engine torch` runs it here: bfloat16 weights (serving_dtype)
    del torch_model, app, chat
    gc.collect()
    with RssSampler() as rss:
        bf16_model = PrismModel.load(run_dir, **serving_dtype(str(run_dir), "auto"))
        data["torch_bf16_dtype"] = str(bf16_model.model.model.dtype)
        app = create_app(bf16_model, ServeOptions(max_batch=args.clients, max_queue=128))
        with BackgroundServer(app) as server:
            data["torch_bf16_serve"] = serve_phases(server.url, args.max_tokens, args.clients, args.repeats,
                                                   adapter_id)
        bf16_routes = [r.name for r in bf16_model.route([[{"role": "user", "content": p}] for p in route_prompts])]
    data["torch_bf16_peak_rss_mb"] = round(rss.peak)
    del bf16_model, app
    gc.collect()

    # ----- agreement ---------------------------------------------------------------------------
    agreement = {}
    for on in on_off:
        frac, exact = prefix_agreement(tok, greedy[on], got[on])
        agreement["adapter" if on else "base"] = {"token_agreement": round(frac, 3), "identical_replies": exact,
                                                  "of": len(convs)}
    frac, exact = prefix_agreement(tok, greedy[False], q4_greedy)
    agreement["base_q4_1_gguf"] = {"token_agreement": round(frac, 3), "identical_replies": exact, "of": len(convs)}
    if vllm_problem is None:
        for on in on_off:
            frac, exact = prefix_agreement(tok, greedy[on], vllm_got[on])
            agreement["vllm_adapter" if on else "vllm_base"] = {"token_agreement": round(frac, 3),
                                                                "identical_replies": exact, "of": len(convs)}
        agreement["vllm_routes_equal"] = sum(a == b for a, b in zip(torch_routes, vllm_routes))
        agreement["vllm_routes"] = len(vllm_routes)
    agreement["routes_equal"] = sum(a == b for a, b in zip(torch_routes, engine_routes))
    agreement["torch_bf16_routes_equal"] = sum(a == b for a, b in zip(torch_routes, bf16_routes))
    agreement["routes"] = len(route_prompts)
    agreement["route_counts"] = {r: torch_routes.count(r) for r in sorted(set(torch_routes))}
    data["agreement"] = agreement

    # ----- table -----------------------------------------------------------------------------------
    rows = []
    engines = ("torch", "torch_bf16", "llamacpp") + (("vllm",) if vllm_problem is None else ())
    data["vllm_peak_rss_mb"] = "child processes"  # vLLM runs outside this process
    for eng in engines:
        s = data[f"{eng}_serve"]
        base_spt = s["prism-base"]["seconds"] / s["prism-base"]["tokens"]
        routed_spt = s["prism"]["seconds"] / s["prism"]["tokens"]
        rows.append([eng, s["prism-base"]["tokens_per_s"], s["prism-adapter"]["tokens_per_s"],
                     s["prism"]["tokens_per_s"], round(routed_spt / base_spt, 3), s["concurrent_base"]["tokens_per_s"],
                     s["concurrent"]["tokens_per_s"], s["concurrent_base"]["errors"] + s["concurrent"]["errors"],
                     data[f"{eng}_peak_rss_mb"]])
    text = table(["engine", "1 client base tok/s", f"1 client adapter tok/s ({on_off[1]})", "1 client routed tok/s",
                  "routed / base time per token", f"{args.clients} clients base tok/s",
                  f"{args.clients} clients routed tok/s", "errors", "peak RSS MB"], rows,
                 title=f"prism serve, {args.max_tokens}-token replies")
    bulk = [["torch float32 (batch 32)", data["bulk_torch_float32"]["tokens_per_s"]],
            ["torch bfloat16 (batch 32)", data["bulk_torch_bfloat16"]["tokens_per_s"]],
            ["llama.cpp float16 GGUF (32 slots)", data["bulk_llamacpp_f16"]["tokens_per_s"]],
            ["llama.cpp Q4_1 GGUF (32 slots)", data["bulk_llamacpp_q4_1"]["tokens_per_s"]]]
    if vllm_problem is None:
        bulk.append(["vLLM bfloat16 (32 requests at once)", data["bulk_vllm_bf16"]["tokens_per_s"]])
    text += "\n\n" + table(["bulk generation, 32 prompts", "tok/s"], bulk, title="bulk (stages 1-3, eval)")
    data["adapter_forced"] = on_off[1]
    ag = [[k, v["token_agreement"], f"{v['identical_replies']}/{v['of']}"] for k, v in agreement.items()
          if isinstance(v, dict) and "of" in v]
    text += "\n\n" + table(["greedy, against torch", "token agreement", "identical replies"], ag,
                           title="agreement (64-token greedy replies)")
    text += (f"\n\nroutes equal: {agreement['routes_equal']}/{agreement['routes']} ({agreement['route_counts']}); "
             f"torch bfloat16 against float32: {agreement['torch_bf16_routes_equal']}/{agreement['routes']}")
    if vllm_problem is None:
        text += (f"; vLLM router: {agreement['vllm_routes_equal']}/{agreement['vllm_routes']}; vLLM start-up "
                 f"{data['vllm_startup_s']} s")
    else:
        text += f"\n\nvllm: {vllm_problem}"
    for eng in engines:
        data[f"{eng}_serve"]["speedup_vs_torch_one_client"] = round(
            data[f"{eng}_serve"]["prism"]["tokens_per_s"] / data["torch_serve"]["prism"]["tokens_per_s"], 2)
    return finish("engines", data, text, args.out)


if __name__ == "__main__":
    sys.exit(main())
