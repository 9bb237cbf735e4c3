"""The OpenAI wire format shared by the local server and the router: request validation,
error bodies, API-key checks, response and SSE chunk builders."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from prism.errors import ConfigError
from prism.routed import Route

log = logging.getLogger("prism.serve")

# Model ids the server answers to: the gated model, the base model, and `prism-<adapter>` for each
# adapter (`prism-adapter` also names a run's only adapter).
MODEL_GATED, MODEL_BASE, MODEL_ADAPTER = "prism", "prism-base", "prism-adapter"
ROLES = ("system", "user", "assistant")
MAX_STOP = 4
MAX_LOGPROBS = 20  # top alternatives per token a completion may ask for (vLLM's default limit)


@dataclass
class HttpOptions:
    """What the local server and the router check on every request."""

    api_key: str | None = None  # None: no key needed (the server binds to loopback by default)
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256
    context_length: int | None = None  # prompt + max_tokens limit; default: the model's
    max_body_bytes: int = 1 << 20
    # Host names the server answers to besides the loopback ones ("*": any). A web page cannot
    # then drive a server on loopback through DNS rebinding: its requests carry its own host name.
    allowed_hosts: tuple[str, ...] = ()
    body_timeout: float = 30.0  # seconds a client may take to send its request body
    max_concurrent: int = 512  # HTTP requests in progress (streams included) before 503 answers

    def __post_init__(self):
        self.allowed_hosts = tuple(self.allowed_hosts)
        at_least(self, max_tokens_limit=1, default_max_tokens=1, max_body_bytes=1024, body_timeout=0.001,
                 max_concurrent=1)
        if self.context_length is not None:
            at_least(self, context_length=2)


def at_least(options, **minimums) -> None:
    """Start-up checks of server limits: a 0 or negative limit is an error, not "unlimited"."""
    for name, low in minimums.items():
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{name} ({flag}) must be at least {low}, got {value!r}")


def context_length(options: HttpOptions, chat_model) -> int:
    return options.context_length or chat_model.context_length


class ApiError(Exception):
    """An error the client caused (or an overload); becomes an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """The host of a Host header value, lower case, without port, IPv6 brackets or a final dot."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return (h.rsplit(":", 1)[0] if h.count(":") == 1 else h).rstrip(".")


class Guard:
    """What every request must pass before an endpoint runs (an ASGI middleware):
    - its Host is one the server answers to (a web page that rebinds its own name to 127.0.0.1
      sends that name: without this check it could drive a keyless server on loopback);
    - a POST says its body is JSON (a page can send text/plain across origins without asking
      first, but not application/json);
    - fewer than `max_concurrent` requests are in progress (slow clients cannot pile up)."""

    def __init__(self, app, options: HttpOptions):
        self.app, self.options = app, options
        self.hosts = {*LOOPBACK_HOSTS, *(host_name(h) for h in options.allowed_hosts)}
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self.problem(scope)
        if problem is not None:
            return await error_response(problem)(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def problem(self, scope) -> ApiError | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if "*" not in self.hosts and host_name(host) not in self.hosts:
            return ApiError(400, f"this server does not answer to the host name {host!r}; start it with "
                                 "--allowed-host NAME to allow it", param="Host", code="invalid_host")
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["method"] == "POST" and kind != "application/json":
            return ApiError(415, f"Content-Type must be application/json, got {kind or 'none'!r}",
                            param="Content-Type", code="unsupported_media_type")
        if self.in_flight >= self.options.max_concurrent:
            return ApiError(503, f"the server is busy ({self.in_flight} requests in progress); retry shortly",
                            "server_overloaded", code="too_many_requests", headers={"retry-after": "1"})
        return None


def new_app(title: str, lifespan, options: HttpOptions) -> FastAPI:
    """A FastAPI app without generated docs, behind the Guard, whose every error leaves as an
    OpenAI error body; unexpected ones say nothing about internals."""
    app = FastAPI(title=title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, options=options)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        kinds = {404: ("not_found_error", "unknown_url"), 405: ("invalid_request_error", "method_not_allowed")}
        type_, code = kinds.get(e.status_code, ("invalid_request_error", None))
        message = "no such endpoint" if e.status_code == 404 else str(e.detail)
        return JSONResponse(error_body(message, type_, None, code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request, e: Exception):
        log.error("internal error", exc_info=e)  # the trace goes to the server log only
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    return app


def check_api_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:].strip() if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), api_key.encode()):  # constant time
        raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                       "authentication_error", code="invalid_api_key")


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


async def unless_client_leaves(request: Request, work):
    """Await the coroutine `work`, cancelling it as soon as the client disconnects (then raise
    ClientGone): a client that gave up must not keep the server generating for no one."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled itself
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task  # let its clean-up (freeing the batch slot) run
        raise ClientGone
    return task.result()


async def _disconnected(request: Request) -> None:
    # With the body read, the server's next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_json(request: Request, max_bytes: int, timeout: float) -> dict:
    """The request body as a JSON object; 413 past `max_bytes`, 408 when it takes longer than
    `timeout` seconds to arrive, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body larger than {max_bytes} bytes", code="request_too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):  # a client trickling its body must not hold a slot forever
            async for part in request.stream():  # also bounds bodies sent without a length
                body += part
                if len(body) > max_bytes:
                    raise ApiError(413, f"request body larger than {max_bytes} bytes", code="request_too_large")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} seconds",
                       code="request_timeout") from None
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    except ValueError as e:  # NaN/Infinity, or an integer longer than Python converts
        raise ApiError(400, f"the request body is not usable JSON: {str(e).split(';')[0]}", code="invalid_json") \
            from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


# ----- request models ------------------------------------------------------------------------
# The fields a request may carry, each named once. A request model below declares the fields this
# server implements. Beyond those:
# - NO_EFFECT: accepted and ignored (they change nothing here).
# - UNSUPPORTED: OpenAI features this server lacks, accepted only at the values that leave them
#   off; any other value is a 400 naming the field, rather than a reply that silently ignored it.
#   Extending the server means moving a field from here into a model; a field one model declares
#   is checked by that model (completions implement `echo` and `logprobs`: N, chat neither).
# - anything else is a 400 too, as the OpenAI API answers an unrecognized argument.
# A null field means its default, as in the OpenAI API.
NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
UNSUPPORTED: dict[str, tuple] = {
    "n": (1,), "best_of": (1,), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
    "function_call": ("none",), "response_format": ({"type": "text"},), "logit_bias": ({},),
    "presence_penalty": (0,), "frequency_penalty": (0,), "suffix": ("",), "modalities": (["text"],),
    "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": (),
    "logprobs": (False,), "top_logprobs": (0,), "echo": (False,),  # on chat (a completion's top-N is `logprobs`)
    "add_special_tokens": (False,),  # prompts are tokenized as sent (the pipeline's generator sends false)
}
# The same for each message: `name` changes nothing, a reply's own fields are fine when empty.
MESSAGE_NO_EFFECT = frozenset({"name", "annotations"})
MESSAGE_UNSUPPORTED: dict[str, tuple] = {"tool_calls": ([],), "function_call": (), "tool_call_id": (),
                                         "refusal": (), "audio": ()}
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed integer, as vLLM takes


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        role = "system" if role == "developer" else role  # newer clients send 'developer'
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content):
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and isinstance(part.get("type"), str) and part["type"] != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported: this server reads "
                                 "text parts only")
        return content

    def text(self) -> str:
        """The message text; text parts are joined with newlines (as vLLM does: "Hello" and "world"
        must not fuse into "Helloworld")."""
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content)
        return self.content or ""


class SamplingFields(_Strict):
    model: str = MODEL_GATED
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0, le=2)  # below GREEDY_BELOW (prism.serve.decode): greedy
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: dict | None = None
    context: str | None = None  # prism: which context of a gate class to use (e.g. one user's memory)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage_chunk(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, messages):
        if not messages:
            raise ValueError("messages must hold at least one message")
        if not any(m.role == "user" for m in messages):
            raise ValueError("messages must hold at least one user message")
        return messages

    def plain_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids (as lm-eval sends them)
    max_tokens: int | None = 16  # the OpenAI default for completions
    # Scoring, as vLLM and OpenAI's legacy completions do it: `echo` puts the prompt in front of the
    # reply (and its tokens in front of the logprobs); `logprobs: N` returns each token's
    # log-probability and the N most likely tokens at its position; max_tokens 0 (with echo) only scores.
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        one_text_or_ids = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
        prompts = [prompt] if one_text_or_ids else prompt
        if len(prompts) != 1:
            raise ValueError("send one prompt per request (the server batches requests)")
        if not prompts[0]:
            raise ValueError("the prompt is empty")
        if isinstance(prompts[0], list) and min(prompts[0]) < 0:
            raise ValueError("token ids cannot be negative")
        return prompts[0]

    @field_validator("echo", "logprobs")
    @classmethod
    def _not_streamed(cls, value, info: ValidationInfo):
        if info.data.get("stream") and value not in (False, None):
            raise ValueError("is not supported with stream: true (send stream: false)")
        return value


def _without_nulls(data: dict) -> dict:
    return {k: v for k, v in data.items() if v is not None}


def _check_fields(data: dict, implemented, no_effect, unsupported: dict, prefix: str = "") -> None:
    """A 400 naming the first field the server does not know, or knows but cannot honour."""
    for key, value in data.items():
        if key in implemented or key in no_effect:
            continue
        name = prefix + key
        if key not in unsupported:
            raise ApiError(400, f"{name}: unrecognized request argument", param=name, code="unknown_parameter")
        if not any(value == off for off in unsupported[key]):
            accepted = " or ".join(json.dumps(v) for v in (*unsupported[key], None))
            raise ApiError(400, f"{name}: not supported by this server (it accepts only {accepted}); send the "
                                "request without it", param=name, code="unsupported_parameter")


def parse(model_cls: type[BaseModel], data: dict):
    """Validate a request body; the first problem becomes a 400 naming the field."""
    data = _without_nulls(data)
    _check_fields(data, model_cls.model_fields, NO_EFFECT, UNSUPPORTED)
    if isinstance(data.get("messages"), list):
        messages = []
        for i, m in enumerate(data["messages"]):
            if isinstance(m, dict):
                m = _without_nulls(m)
                _check_fields(m, ChatMessage.model_fields, MESSAGE_NO_EFFECT, MESSAGE_UNSUPPORTED, f"messages.{i}.")
                m = {k: v for k, v in m.items() if k in ChatMessage.model_fields}
            messages.append(m)
        data["messages"] = messages
    try:
        return model_cls.model_validate({k: v for k, v in data.items() if k in model_cls.model_fields})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required"
        raise ApiError(400, f"{where}: {msg}", param=where or None) from None


def forwarded_fields(req: SamplingFields, data: dict) -> dict:
    """What the router sends upstream: the validated fields the client set, and the unsupported
    ones it sent at their "off" value; not the ones without effect (a field the router ignores must
    not take effect upstream)."""
    body = req.model_dump(exclude_unset=True, exclude={"messages"})
    if isinstance(req, ChatRequest):
        body["messages"] = req.plain_messages()
    body.update({k: v for k, v in data.items() if k in UNSUPPORTED and k not in type(req).model_fields
                 and v is not None})
    return body


class PromptCounter:
    """Counts prompt tokens on the request side with its own tokenizer copy: the worker thread
    changes the padding settings of the model's fast tokenizer while it encodes batches, and a Rust
    tokenizer used from two threads at once fails ("Already borrowed")."""

    def __init__(self, tokenizer):
        import copy

        self.tokenizer = copy.deepcopy(tokenizer)

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text(self, ids: list[int]) -> str:
        """A token-id prompt as text (what the gate reads), after checking the ids exist."""
        if max(ids) >= len(self.tokenizer):
            raise ApiError(400, f"prompt: token id {max(ids)} is not in the vocabulary (0-{len(self.tokenizer) - 1})",
                           param="prompt")
        return self.tokenizer.decode(ids)


@dataclass
class Parsed:
    """A valid request: its raw body, its fields, the prompt to generate after (and its token ids
    when the client sent ids), and its route (`forced` True/False by model id, else the gate reads
    `routing`)."""

    raw: dict
    req: SamplingFields
    chat: bool
    prompt: str
    forced: Route | None  # None: the gate decides
    routing: str | None
    prompt_ids: list[int] | None = None

    @property
    def context(self) -> str | None:
        return self.req.context


async def parse_request(request: Request, prism, options: HttpOptions, chat: bool,
                        counter: PromptCounter | None = None) -> Parsed:
    """Key, body, fields, model id and prompt of a chat or completion request; each problem is a 4xx.
    `prism` is the served PrismModel (its chat template, routing prompt and adapters); `counter`
    turns a token-id prompt into text."""
    check_api_key(request, options.api_key)
    raw = await read_json(request, options.max_body_bytes, options.body_timeout)
    req = parse(ChatRequest if chat else CompletionRequest, raw)
    forced = check_model(req.model, prism.adapters)
    if req.context is not None and req.context not in prism.adapters:
        raise ApiError(400, f"context {req.context!r} is not one of this run's adapters ({', '.join(prism.adapters)})",
                       param="context")
    if not chat:  # a raw prompt, already formatted: what the pipeline's generator backend sends
        ids = req.prompt if isinstance(req.prompt, list) else None
        if ids is not None and counter is None:
            raise ApiError(400, "this server takes text prompts only", param="prompt")
        text = counter.text(ids) if ids is not None else req.prompt
        return Parsed(raw, req, chat, text, forced, text if forced is None else None, ids)
    messages = req.plain_messages()
    try:
        prompt = prism.model.prompt(messages)
    except Exception as e:  # e.g. a template that insists on alternating roles
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ApiError(400, f"the chat template cannot format these messages: {first}", param="messages") from None
    return Parsed(raw, req, chat, prompt, forced, prism.routing_prompt(messages) if forced is None else None)


def model_ids(adapters: list[str]) -> dict[str, str | None]:
    """Model id -> the adapter it forces (None: the base model); the gated id is not included."""
    ids: dict[str, str | None] = {MODEL_BASE: None, **{f"prism-{a}": a for a in adapters}}
    if len(adapters) == 1:
        ids.setdefault(MODEL_ADAPTER, adapters[0])
    return ids


def check_model(name: str, adapters: list[str]) -> Route | None:
    """The forced route of a model id (None = the gate decides); 404 for an unknown id."""
    if name == MODEL_GATED:
        return None
    ids = model_ids(adapters)
    if name not in ids:
        raise ApiError(404, f"model {name!r} does not exist; choose one of {', '.join([MODEL_GATED, *ids])}",
                       "not_found_error", param="model", code="model_not_found")
    return Route(ids[name], rule="forced")


def resolve_max_tokens(req: SamplingFields, prompt_tokens: int, context: int, limit: int, default: int) -> int:
    """max_tokens checked against the server limit (400) and the context left by the prompt (413);
    0 (score the prompt, generate nothing) only on a completion with echo."""
    asked = req.requested_max_tokens()
    completion = isinstance(req, CompletionRequest)
    low = 0 if completion and req.echo else 1
    if asked is not None and not low <= asked <= limit:
        hint = " (0 only scores the prompt: it needs echo: true)" if completion and asked == 0 else ""
        raise ApiError(400, f"max_tokens must be between {low} and {limit}, got {asked}{hint}", param="max_tokens")
    room = context - prompt_tokens
    if room < (0 if asked == 0 else 1):
        raise ApiError(413, f"the prompt has {prompt_tokens} tokens; the context holds {context}",
                       code="context_length_exceeded", param="messages")
    if asked is None:
        return min(default, room)
    if asked > room:
        raise ApiError(413, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({asked}) exceeds the "
                            f"context of {context} tokens", code="context_length_exceeded", param="max_tokens")
    return asked


# ----- responses -------------------------------------------------------------------------------
def route_info(route: Route) -> dict:
    """The `prism` field of every reply: which route served it and why (the gate's probability of
    the chosen class, and the runner-up)."""
    return {"route": route.name, "adapter": route.adapter is not None, "score": route.probability,
            "runner_up": route.runner_up, "runner_up_score": route.runner_up_probability, "rule": route.rule,
            "forced": route.forced}


def route_headers(info: dict) -> dict:
    return {"x-prism-route": info["route"]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def reply_body(chat: bool, rid: str, model: str, text: str, finish: str, use: dict, info: dict,
               logprobs: dict | None = None) -> dict:
    """A whole reply in the chat or the text-completion wire format."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [{**choice, "finish_reason": finish, "logprobs": logprobs}], "usage": use,
            "prism": info}


def completion_logprobs(parts: list[dict]) -> dict:
    """A completion's `logprobs` from the prompt's and the reply's token lists (each {tokens,
    token_logprobs, top_logprobs}), with `text_offset`: where each token's text starts in the
    concatenated token texts (the echoed prompt, then the reply)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key in ("tokens", "token_logprobs", "top_logprobs"):
            out[key] += part[key]
    offset = 0
    for token in out["tokens"]:
        out["text_offset"].append(offset)
        offset += len(token)
    return out


def reply_chunk(chat: bool, rid: str, model: str, created: int, info: dict, delta: dict | str | None = None,
                finish: str | None = None, use: dict | None = None) -> dict:
    """One SSE chunk: a chat `delta` dict or a completion text; None for the usage-only chunk."""
    part = {"delta": delta} if chat else {"text": delta}
    chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
             "model": model, "choices": [] if delta is None else [{"index": 0, **part, "finish_reason": finish,
                                                                   "logprobs": None}],
             "prism": info}
    if use is not None:
        chunk["usage"] = use
    return chunk


def models_list(root: str, created: int, adapters: list[str]) -> dict:
    """The model ids. The base comes first: a client that takes the first model (like the
    pipeline's generator backend) gets the plain model; adapters name their parent, as vLLM does."""
    def entry(mid, parent=None):
        return {"id": mid, "object": "model", "created": created, "owned_by": "prism", "root": root,
                "parent": parent}

    return {"object": "list", "data": [entry(MODEL_BASE), *[entry(m, MODEL_BASE) for m in model_ids(adapters) if
                                                            m != MODEL_BASE], entry(MODEL_GATED)]}
