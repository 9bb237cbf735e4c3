"""The OpenAI wire format shared by the local server and the router: request validation,
error bodies, API-key checks, response and SSE chunk builders."""

from __future__ import annotations

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
from starlette.exceptions import HTTPException as StarletteHTTPException

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




def context_length(options: HttpOptions, chat_model) -> int:
    return options.context_length or int(getattr(chat_model.model.config, "max_position_embeddings", None) or 2048)


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


def new_app(title: str, lifespan) -> FastAPI:
    """A FastAPI app without generated docs, whose every error leaves as an OpenAI error body;
    unexpected ones say nothing about internals."""
    app = FastAPI(title=title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

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


async def read_json(request: Request, max_bytes: int) -> dict:
    """The request body as a JSON object; 413 past `max_bytes`, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body larger than {max_bytes} bytes", code="request_too_large")
    body = bytearray()
    async for part in request.stream():  # also bounds bodies sent without a length
        body += part
        if len(body) > max_bytes:
            raise ApiError(413, f"request body larger than {max_bytes} bytes", code="request_too_large")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


# ----- request models ------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are accepted and ignored


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

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class SamplingFields(_Strict):
    model: str = MODEL_GATED
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request: batching happens across requests
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


def parse(model_cls: type[BaseModel], data: dict):
    """Validate a request body; the first problem becomes a 400 naming the field."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required"
        raise ApiError(400, f"{where}: {msg}", param=where or None) from None


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


async def parse_request(request: Request, prism, api_key: str | None, max_bytes: int, chat: bool,
                        counter: PromptCounter | None = None) -> Parsed:
    """Key, body, fields, model id and prompt of a chat or completion request; each problem is a 4xx.
    `prism` is the served PrismModel (its chat template, routing prompt and adapters); `counter`
    turns a token-id prompt into text."""
    check_api_key(request, api_key)
    raw = await read_json(request, max_bytes)
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
    0 (score the prompt, generate nothing) only with echo."""
    asked = req.requested_max_tokens()
    if asked == 0 and not getattr(req, "echo", False):
        raise ApiError(400, "max_tokens 0 generates nothing: it needs echo: true (to score the prompt)",
                       param="max_tokens")
    if asked is not None and not 0 <= asked <= limit:
        raise ApiError(400, f"max_tokens must be between 1 and {limit}, got {asked}", param="max_tokens")
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
