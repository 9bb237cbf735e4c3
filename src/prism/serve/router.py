"""Router mode: the gate runs here, generation on an upstream OpenAI-compatible server.

The upstream (e.g. vLLM started with `--enable-lora --lora-modules prism-adapter=DIR`) holds the
base model and the adapter under two model names. For each request the router computes the gate
from the embeddings and decoder layer 0 only (the router never loads the rest of the model), then
forwards the request unchanged except for `model`: the base name or the adapter name. Replies
and stream chunks come back with the route added (`prism` field, `x-prism-route` header).
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

from prism.serve import protocol as P

log = logging.getLogger("prism.serve")


@dataclass
class RouterOptions:
    upstream: str  # base URL of the upstream, with or without /v1
    upstream_base: str  # the upstream's name for the base model
    upstream_adapter: str = P.MODEL_ADAPTER  # the upstream's name for the LoRA
    upstream_api_key: str | None = None
    api_key: str | None = None
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    context_length: int | None = None
    max_body_bytes: int = 1 << 20
    timeout: float = 600.0
    max_connections: int = 256  # concurrent upstream requests; vLLM batches them


def v1_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def load_gate_router(run_dir: str | Path):
    """A PrismModel holding only what the gate needs: tokenizer, embeddings, decoder layer 0."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from prism.config import EMBEDDED_MODEL
    from prism.gate import Gate
    from prism.models import ChatModel, embedded_model_dir, resolve_dtype
    from prism.routed import PrismModel
    from prism.run import RunDir, RunError

    run = RunDir(run_dir)
    if run.status("gate") != "done":
        raise RunError(f"{run.path}: stage 'gate' is not finished; run `prism run --out {run.path}` first")
    cfg = run.config()
    where = str(embedded_model_dir()) if cfg.model == EMBEDDED_MODEL else cfg.model
    kw = dict(revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code)
    config = AutoConfig.from_pretrained(where, **kw)
    config.num_hidden_layers = 1  # the gate reads the output of layer 0; nothing after it is loaded
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:1]
    dtype = resolve_dtype(cfg.dtype)
    lm = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=dtype if dtype != "auto" else torch.float32,
                                              use_safetensors=True, **kw)
    tok = AutoTokenizer.from_pretrained(where, **kw)
    chat_model = ChatModel(lm, tok, name=Path(where).name, source={"id": where}, batch_size=cfg.batch_size)
    return PrismModel(chat_model, None, Gate.load(run.path / "gate"), run.path)


def discover_base(upstream: str, adapter: str, api_key: str | None = None, timeout: float = 10.0) -> str:
    """The upstream's base model name: the adapter's `parent` (vLLM lists it), or the only other model."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(v1_url(upstream) + "/models", headers=headers, timeout=timeout)
        r.raise_for_status()
        models = r.json()["data"]
    except (httpx.HTTPError, ValueError, KeyError) as e:
        raise RuntimeError(f"cannot list the upstream's models at {upstream}: {e}") from None
    ids = [m["id"] for m in models]
    if adapter not in ids:
        raise RuntimeError(f"the upstream serves no model named {adapter!r} (it has {ids}); start it with "
                           f"--lora-modules {adapter}=ADAPTER_DIR or pass --upstream-adapter")
    parent = next((m.get("parent") for m in models if m["id"] == adapter), None)
    others = [i for i in ids if i != adapter]
    if parent:
        return parent
    if len(others) == 1:
        return others[0]
    raise RuntimeError(f"cannot tell the upstream's base model among {others}; pass --upstream-base")


def create_router_app(prism, options: RouterOptions) -> FastAPI:
    """`prism` is a PrismModel whose ChatModel may hold only layer 0 (see load_gate_router)."""
    opts = options
    base_url = v1_url(opts.upstream)
    context = opts.context_length or int(getattr(prism.model.model.config, "max_position_embeddings", 2048))
    created = int(time.time())
    counter = P.PromptCounter(prism.model.tokenizer)
    gate_lock = threading.Lock()  # one gate pass at a time: torch on 2 cores gains nothing from more
    state: dict = {"client": None, "requests": 0, "upstream_errors": 0}

    @asynccontextmanager
    async def lifespan(_app):
        headers = {"authorization": f"Bearer {opts.upstream_api_key}"} if opts.upstream_api_key else {}
        limits = httpx.Limits(max_connections=opts.max_connections, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=opts.timeout, limits=limits) as c:
            state["client"] = c
            yield

    app = FastAPI(title="prism-router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    P.install_error_handlers(app)

    @app.get("/health")
    async def health():
        try:
            r = await state["client"].get("/models", timeout=5.0)
            upstream = "ok" if r.status_code == 200 else f"status {r.status_code}"
        except httpx.HTTPError as e:
            upstream = f"unreachable ({type(e).__name__})"
        return {"status": "ok" if upstream == "ok" else "degraded", "mode": "router", "upstream": base_url,
                "upstream_status": upstream, "upstream_models": {"base": opts.upstream_base,
                                                                 "adapter": opts.upstream_adapter},
                "stats": {"requests": state["requests"], "upstream_errors": state["upstream_errors"]}}

    @app.get("/v1/models")
    async def models(request: Request):
        P.check_api_key(request, opts.api_key)
        return P.models_list(opts.upstream_base, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        P.check_api_key(request, opts.api_key)
        raw = await P.read_json(request, opts.max_body_bytes)
        req = P.parse(P.ChatRequest, raw)
        forced = P.check_model(req.model)
        messages = req.plain_messages()
        try:
            prompt = prism.model.prompt(messages)
        except Exception as e:
            raise P.ApiError(400, f"the chat template cannot format these messages: {str(e)[:200]}",
                             param="messages") from None
        routing = prism.routing_prompt(messages) if forced is None else None
        return await _forward("/chat/completions", raw, req, prompt, forced, routing)

    @app.post("/v1/completions")
    async def completions(request: Request):
        P.check_api_key(request, opts.api_key)
        raw = await P.read_json(request, opts.max_body_bytes)
        req = P.parse(P.CompletionRequest, raw)
        forced = P.check_model(req.model)
        return await _forward("/completions", raw, req, req.prompt, forced, req.prompt if forced is None else None)

    def _route(forced: bool | None, routing: str | None) -> dict:
        threshold = prism.gate.spec.threshold
        if forced is not None:
            return P.route_info(forced, None, threshold, True)
        with gate_lock:
            route = prism.route_prompts([routing])[0]
        return P.route_info(route.adapter, route.score, threshold, False)

    async def _forward(path: str, raw: dict, req: P.SamplingFields, prompt: str, forced, routing):
        state["requests"] += 1
        n_prompt = len(counter.ids(prompt))
        max_tokens = P.resolve_max_tokens(req, n_prompt, context, opts.max_tokens_limit, opts.default_max_tokens)
        info = await asyncio.to_thread(_route, forced, routing)
        body = dict(raw, model=opts.upstream_adapter if info["adapter"] else opts.upstream_base,
                    max_tokens=max_tokens)
        body.pop("max_completion_tokens", None)
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

    return app
