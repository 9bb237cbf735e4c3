"""Router mode: the gate runs here, generation on an upstream OpenAI-compatible server.
Scoring fields (`echo`, `logprobs`, `max_tokens: 0`, token-id prompts) pass through to the upstream.

The upstream (e.g. vLLM started with `--enable-lora --lora-modules prism-adapter=DIR`) holds the
base model and the adapter under two model names. For each request the router computes the gate
from the embeddings and decoder layer 0 only (the router never loads the rest of the model), then
forwards the validated request (the fields the client set, as checked here) with `model` set to
the base name or the adapter name. Replies and stream chunks come back with the route added
(`prism` field, `x-prism-route` header).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from prism.errors import RemoteError
from prism.export import cached_exports, upstream_names
from prism.model.remote import OpenAIClient, auth_headers, v1_url
from prism.routed import Route
from prism.serve import protocol as P

log = logging.getLogger("prism.serve")


@dataclass
class RouterOptions(P.HttpOptions):
    upstream: str = ""  # base URL of the upstream, with or without /v1
    upstream_base: str = ""  # the upstream's name for the base model
    upstream_adapter: str = P.MODEL_ADAPTER  # the upstream's name for the LoRA of a one-adapter run
    # (a run with several adapters: `prism-<name>` each, as `prism export-adapter` prints)
    upstream_api_key: str | None = None
    timeout: float = 600.0
    max_connections: int = 256  # concurrent upstream requests; vLLM batches them

    def __post_init__(self):
        super().__post_init__()
        P.at_least(self, timeout=0.001, max_connections=1)


def discover_base(upstream: str, adapters: list[str], api_key: str | None = None, timeout: float = 10.0) -> str:
    """Check that the upstream serves every adapter name, and return its base model's name: the
    adapters' `parent` (vLLM lists it), or the only other model."""
    client = OpenAIClient(upstream, api_key, timeout=timeout, retries=1)
    try:
        models = [m for m in client.call("GET", "/models").get("data", []) if isinstance(m, dict)]
    finally:
        client.close()
    ids = [m.get("id") for m in models]
    missing = [a for a in adapters if a not in ids]
    if missing:
        flags = " ".join(f"{a}=ADAPTER_DIR" for a in missing)
        raise RemoteError(f"the upstream serves no model named {', '.join(map(repr, missing))} (it has {ids}); "
                          f"start it with --lora-modules {flags} (prism export-adapter prints the command)"
                          f"{' or pass --upstream-adapter' if len(adapters) == 1 else ''}")
    parent = next((m.get("parent") for m in models if m.get("id") in adapters and m.get("parent")), None)
    others = [i for i in ids if i not in adapters]
    if parent or len(others) == 1:
        return parent or others[0]
    raise RemoteError(f"cannot tell the upstream's base model among {others}; pass --upstream-base")


def create_router_app(prism, options: RouterOptions) -> FastAPI:
    """`prism` is a PrismModel whose ChatModel may hold only layer 0 (PrismModel.load_gate_only).
    With a llama.cpp engine attached (PrismModel.load_on_engine) the upstream is that engine's
    in-process server and a route is sent as LoRA scales (`lora`) instead of a model name."""
    opts = options
    prism.warm_up()
    base_url = v1_url(opts.upstream)
    context = P.context_length(opts, prism.model)
    created = int(time.time())
    counter = P.PromptCounter(prism.model.tokenizer)
    gate_lock = threading.Lock()  # one gate pass at a time: torch on 2 cores gains nothing from more
    state: dict = {"client": None, "requests": 0, "upstream_errors": 0}
    engine = getattr(prism, "engine", None)  # the in-process llama.cpp engine (prism serve --engine llamacpp)

    @asynccontextmanager
    async def lifespan(_app):
        limits = httpx.Limits(max_connections=opts.max_connections, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=base_url, headers=auth_headers(opts.upstream_api_key),
                                     timeout=opts.timeout, limits=limits) as c:
            state["client"] = c
            yield

    app = P.new_app("prism-router", lifespan, opts)

    @app.get("/health")
    async def health():
        try:
            r = await state["client"].get("/models", timeout=5.0)
            upstream = "ok" if r.status_code == 200 else f"status {r.status_code}"
        except httpx.HTTPError as e:
            upstream = f"unreachable ({type(e).__name__})"
        return {"status": "ok" if upstream == "ok" else "degraded", "mode": app.state.mode,
                "context_length": context, "upstream": base_url,
                "upstream_status": upstream, "upstream_models": {"base": opts.upstream_base, "adapters": names},
                "stats": {"requests": state["requests"], "upstream_errors": state["upstream_errors"]}}

    @app.get("/v1/models")
    async def models(request: Request):
        P.check_api_key(request, opts.api_key)
        return P.models_list(opts.upstream_base, created, prism.adapters)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _answer(request, await P.parse_request(request, prism, opts, chat=True))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _answer(request, await P.parse_request(request, prism, opts, chat=False, counter=counter))

    async def _answer(request: Request, parsed: P.Parsed):
        """Forward the request; a client that leaves first closes the upstream request too (the
        upstream then stops generating for it)."""
        try:
            return await P.unless_client_leaves(request, _forward(parsed))
        except P.ClientGone:
            return Response(status_code=499)

    def _route(parsed: P.Parsed) -> Route:
        if parsed.forced is not None:
            return parsed.forced
        with gate_lock:
            return prism.route_prompts([parsed.routing], [parsed.context])[0]

    names = upstream_names(list(prism.adapters), opts.upstream_adapter)

    def upstream_name(route: Route) -> str:
        if route.adapter is None or engine is not None:
            return opts.upstream_base
        return names[route.adapter]

    async def _forward(parsed: P.Parsed):
        path, req = ("/chat/completions" if parsed.chat else "/completions"), parsed.req
        state["requests"] += 1
        if engine is not None and not parsed.chat and req.echo:
            raise P.ApiError(400, "echo (scoring the prompt) needs the torch engine: llama.cpp returns no prompt "
                                  "log-probabilities; start prism serve with --engine torch", param="echo")
        n_prompt = len(parsed.prompt_ids or counter.ids(parsed.prompt))
        max_tokens = P.resolve_max_tokens(req, n_prompt, context, opts.max_tokens_limit, opts.default_max_tokens)
        route = await asyncio.to_thread(_route, parsed)
        info = P.route_info(route)
        # Only what was validated goes upstream: the checks above hold there as well.
        body = dict(P.forwarded_fields(req, parsed.raw), model=upstream_name(route), max_tokens=max_tokens)
        for key in ("max_completion_tokens", "context"):  # ours, or renamed: the upstream does not take them
            body.pop(key, None)
        if engine is not None:  # llama.cpp serves one model: the route is the adapters' scales
            body["lora"] = engine.lora_field(route.adapter)
        client: httpx.AsyncClient = state["client"]
        try:
            upstream = await client.send(client.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as e:
            state["upstream_errors"] += 1
            log.warning("upstream request failed: %r", e)
            raise P.ApiError(502, "the upstream server is unreachable", "upstream_error",
                             code="upstream_unavailable") from None
        if upstream.status_code != 200:
            return await _upstream_error(upstream)
        if req.stream:
            return StreamingResponse(_relay(upstream, req.model, info), media_type="text/event-stream",
                                     headers={**P.route_headers(info), "cache-control": "no-cache"})
        try:
            data = json.loads(await upstream.aread())
        except (httpx.HTTPError, ValueError):
            state["upstream_errors"] += 1
            raise P.ApiError(502, "the upstream sent an invalid reply", "upstream_error") from None
        finally:
            await upstream.aclose()
        data.update(model=req.model, prism=info)
        return JSONResponse(data, headers=P.route_headers(info))

    async def _upstream_error(upstream: httpx.Response) -> Response:
        """Pass the upstream's own error through (it is already an OpenAI error body)."""
        state["upstream_errors"] += 1
        try:
            content = await upstream.aread()
            data = json.loads(content)
            if not isinstance(data, dict) or "error" not in data:
                raise ValueError
        except (httpx.HTTPError, ValueError):
            data = P.error_body(f"the upstream answered {upstream.status_code}", "upstream_error")
        finally:
            await upstream.aclose()
        return JSONResponse(data, status_code=upstream.status_code)

    async def _relay(upstream: httpx.Response, model: str, info: dict):
        """Upstream SSE events, each chunk with the route added and the client's model name."""
        try:
            async for line in upstream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    yield P.SSE_DONE
                    return
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(chunk, dict) and "error" not in chunk:
                    chunk.update(model=model, prism=info)
                yield P.sse(chunk)
        except httpx.HTTPError as e:
            log.warning("upstream stream broke: %r", e)
            yield P.sse(P.error_body("the upstream stream broke off", "upstream_error"))
        finally:
            await upstream.aclose()

    app.state.prism = prism  # keeps the engine (and its in-process server) alive with the app
    app.state.mode = "router" if engine is None else "llamacpp"
    return app


def create_engine_app(prism, options: RouterOptions) -> FastAPI:
    """`prism serve --engine llamacpp`: the router in front of the PrismModel's own llama.cpp engine."""
    options.upstream = prism.engine.url
    options.upstream_base = prism.engine.name
    options.upstream_api_key = prism.engine.api_key
    # what one conversation may hold is what each of the engine's slots holds
    options.context_length = min(options.context_length or prism.engine.context, prism.engine.context)
    return create_router_app(prism, options)


def create_vllm_app(run_dir, options: RouterOptions, vllm_args: list[str]) -> FastAPI:
    """`prism serve --engine vllm`: the router in front of a vLLM server that prism starts as a child
    process with the run's adapters exported and loaded under the names the router sends."""
    from prism.model.loading import weights_location
    from prism.model.vllm import BASE_NAME, VllmServer
    from prism.routed import PrismModel
    from prism.run import RunDir

    run = RunDir(run_dir).require("gate", "distill")
    loras = cached_exports(run, upstream_names(run.finished_adapters(), options.upstream_adapter))
    prism = PrismModel.load_gate_only(run_dir)
    server = VllmServer(weights_location(run.config().model), loras=loras, args=vllm_args)
    try:
        options.upstream, options.upstream_base, options.upstream_api_key = server.url, BASE_NAME, server.api_key
        app = create_router_app(prism, options)
    except BaseException:
        server.close()
        raise
    app.state.vllm, app.state.mode = server, "vllm"
    return app
