"""The local server: a finished run behind an OpenAI-compatible API.

Endpoints: POST /v1/chat/completions and /v1/completions (plain or SSE streaming; completions
also score: `echo`, `logprobs`, `max_tokens: 0`, token-id prompts, as vLLM), GET /v1/models and
/health. The model id picks the route: `prism` lets the gate decide,
`prism-base` and `prism-adapter` force it. Every reply carries the route (`prism` field and
`x-prism-route` header) and its token usage.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from prism.routed import PrismModel
from prism.serve import protocol as P
from prism.serve.batcher import Batcher, Job, QueueFull
from prism.serve.decode import Sampling


@dataclass
class ServeOptions(P.HttpOptions):
    max_batch: int = 16  # requests decoded together
    max_queue: int = 64  # waiting requests beyond this get 503
    batch_wait: float = 0.01  # seconds an idle worker waits for more requests to batch

    def __post_init__(self):
        super().__post_init__()
        P.at_least(self, max_batch=1, max_queue=1, batch_wait=0)


def create_app(prism: PrismModel, options: ServeOptions | None = None) -> FastAPI:
    opts = options or ServeOptions()
    prism.warm_up()
    batcher = Batcher(prism, opts.max_batch, opts.max_queue, opts.batch_wait)
    context = P.context_length(opts, prism.model)
    created = int(time.time())
    counter = P.PromptCounter(prism.model.tokenizer)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        batcher.stop()

    app = P.new_app("prism", lifespan, opts)
    app.state.batcher = batcher

    @app.get("/health")
    async def health():
        return {"status": "ok" if batcher.alive else "down", "mode": "local", "model": prism.model.name,
                "run_dir": str(prism.run_dir) if prism.run_dir else None, "context_length": context,
                "queue": {"waiting": batcher.queue.qsize(), "capacity": opts.max_queue},
                "max_batch": opts.max_batch, "stats": dict(batcher.stats)}

    @app.get("/v1/models")
    async def models(request: Request):
        P.check_api_key(request, opts.api_key)
        return P.models_list(prism.model.name, created, prism.adapters)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _reply(request, await P.parse_request(request, prism, opts, chat=True))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _reply(request, await P.parse_request(request, prism, opts, chat=False, counter=counter))

    async def _reply(request: Request, parsed: P.Parsed):
        """Stream the job, or wait for it and answer in the chat or completion format. A client
        that disconnects while its request waits or runs leaves the batch at the next step."""
        req, chat = parsed.req, parsed.chat
        try:
            job, prompt_tokens, info = await P.unless_client_leaves(request, _start(parsed))
            rid = P.new_id("chatcmpl" if chat else "cmpl")
            if req.stream:  # from here on the streaming response notices a disconnect itself
                return _stream(job, req, rid, prompt_tokens, info, chat=chat)
            text, reason, n, scores = await P.unless_client_leaves(request, _collect(job))
        except P.ClientGone:
            return Response(status_code=499)  # no one reads it
        logprobs = None
        if not chat and req.logprobs is not None:  # the prompt's lists (with echo), then the reply's
            logprobs = P.completion_logprobs([scores[k] for k in ("prompt_logprobs", "logprobs") if k in scores])
        if not chat and req.echo:
            text = parsed.prompt + text
        body = P.reply_body(chat, rid, req.model, text, reason, P.usage(prompt_tokens, n), info, logprobs)
        return JSONResponse(body, headers=P.route_headers(info))

    async def _start(parsed: P.Parsed):
        """Check the size, queue the request and wait until it is routed."""
        req = parsed.req
        ids = parsed.prompt_ids or counter.ids(parsed.prompt)
        max_tokens = P.resolve_max_tokens(req, len(ids), context, opts.max_tokens_limit, opts.default_max_tokens)
        scoring = not parsed.chat and req.logprobs is not None
        sampling = Sampling(max_tokens, req.temperature, req.top_p, req.seed, req.stop_list(),
                            req.logprobs if scoring else None)
        job = Job(ids, sampling, parsed.forced, parsed.routing, parsed.context, asyncio.get_running_loop(),
                  echo=not parsed.chat and req.echo)
        try:
            batcher.submit(job)
        except QueueFull:
            raise P.ApiError(503, "the server is busy (request queue full); retry shortly", "server_overloaded",
                             code="queue_full", headers={"retry-after": "1"}) from None
        try:
            kind, payload = await job.events.get()
        except asyncio.CancelledError:
            job.cancel()
            raise
        if kind == "error":
            raise P.ApiError(500, payload, "server_error")
        return job, len(ids), P.route_info(payload)

    return app


async def _collect(job: Job) -> tuple[str, str, int, dict]:
    """The reply's text, finish reason, token count, and its token scores by event kind."""
    parts, scores = [], {}
    try:
        while True:
            kind, payload = await job.events.get()
            if kind == "delta":
                parts.append(payload)
            elif kind in ("prompt_logprobs", "logprobs"):
                scores[kind] = payload
            elif kind == "done":
                return "".join(parts), payload[0], payload[1], scores
            elif kind == "error":
                raise P.ApiError(500, payload, "server_error")
    finally:
        if not job.finished:  # the client went away: free the batch slot
            job.cancel()


def _stream(job: Job, req: P.SamplingFields, rid: str, prompt_tokens: int, info: dict, chat: bool):
    created = int(time.time())
    def chunk(*args):
        return P.reply_chunk(chat, *args)

    def delta(text: str) -> bytes:
        return P.sse(chunk(rid, req.model, created, info, {"content": text} if chat else text))

    def final(reason: str, use: dict) -> bytes:
        return P.sse(chunk(rid, req.model, created, info, {} if chat else "", reason, use))

    def usage_only(use: dict) -> bytes:  # OpenAI's separate usage chunk: no choices
        return P.sse(chunk(rid, req.model, created, info, None, None, use))

    async def events():
        try:
            if chat:  # OpenAI streams open with the role
                yield P.sse(chunk(rid, req.model, created, info, {"role": "assistant", "content": ""}))
            while True:
                kind, payload = await job.events.get()
                if kind == "delta":
                    yield delta(payload)
                elif kind == "done":
                    reason, n = payload
                    use = P.usage(prompt_tokens, n)
                    yield final(reason, use)  # the final chunk always carries the usage
                    if req.include_usage_chunk():
                        yield usage_only(use)
                    yield P.SSE_DONE
                    return
                else:  # an error after the stream began: say so in the stream, then end it
                    yield P.sse(P.error_body(payload, "server_error"))
                    return
        finally:
            if not job.finished:  # client disconnected mid-stream: stop generating for it
                job.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**P.route_headers(info), "cache-control": "no-cache"})
