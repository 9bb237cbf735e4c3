"""OpenAI-compatible servers (vLLM, SGLang, `prism serve`, a hosted judge) as a client sees them:
the one HTTP client (retries, errors naming the server), and stages 1-3 generating on a server
while formatting, scoring, the gate and distillation stay local."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from prism.errors import RemoteError
from prism.model.chat import ChatModel, Generation

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (for a server started in another process)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def v1_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def error_message(response) -> str:
    """The message of an OpenAI error body, or the start of whatever else the server sent."""
    try:
        return str(response.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


class OpenAIClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0, retries: int = 4,
                 max_connections: int = 16):
        import httpx  # imported here: the CLI imports this package's errors on every command

        self._httpx = httpx
        self.url = v1_url(url)
        self.retries = retries
        self.client = httpx.Client(headers=auth_headers(api_key), timeout=timeout,
                                   limits=httpx.Limits(max_connections=max_connections))

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One request, retried with backoff on connection errors and overload answers."""
        problem = ""
        for attempt in range(self.retries + 1):
            try:
                r = self.client.request(method, self.url + path, json=body)
            except self._httpx.HTTPError as e:
                problem = f"cannot reach {self.url} ({type(e).__name__})"
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError:
                        problem = f"{self.url}{path} sent a reply that is not JSON"
                else:
                    problem = f"{self.url}{path} answered {r.status_code}: {error_message(r)}"
                    if r.status_code not in RETRY_STATUS:
                        raise RemoteError(problem)
            if attempt < self.retries:
                time.sleep(min(8.0, 0.5 * 2**attempt))
        raise RemoteError(problem)

    def first_model(self) -> str:
        ids = [m.get("id") for m in self.call("GET", "/models").get("data", []) if isinstance(m, dict)]
        if not ids:
            raise RemoteError(f"{self.url}/models lists no model; name the served model")
        return ids[0]

    def chat(self, model: str, messages: list[dict], **sampling) -> str:
        data = self.call("POST", "/chat/completions", {"model": model, "messages": messages, **sampling})
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise RemoteError(f"{self.url}/chat/completions sent a reply without choices") from None

    def close(self) -> None:
        self.client.close()


class RemoteGenerator:
    """`ChatModel.generate` on a server's `/v1/completions`, requests sent concurrently."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 16,
                 timeout: float = 600.0, retries: int = 4, add_special_tokens: bool = False):
        self.client = OpenAIClient(url, api_key or os.environ.get("PRISM_GENERATOR_API_KEY"), timeout, retries,
                                   max_connections=concurrency)
        self.url = self.client.url
        self.concurrency = concurrency
        # Prompts already hold the template's special tokens; a server adding a BOS would double it.
        self.add_special_tokens = add_special_tokens
        self.model = model or self.client.first_model()
        self.engine = "remote"  # what a run's manifest records as the generating engine
        self.tokens_generated = 0

    def _one(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
             seed: int | None, model: str | None = None) -> Generation:
        body = {"model": model or self.model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "add_special_tokens": self.add_special_tokens}
        if seed is not None:
            body["seed"] = seed
        data = self.client.call("POST", "/completions", body)
        try:
            text = data["choices"][0]["text"]
            n = int(data["usage"]["completion_tokens"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise RemoteError(f"{self.url}/completions sent a reply without choices or usage") from None
        return Generation(text.strip(), n)

    def generate(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, progress=None, model: str | None = None) -> list[Generation]:
        """One continuation per prompt. Prompt i gets seed + i, so identical prompts (stage 1 samples
        one prompt many times) still give different samples, as locally. `model`: another of the
        server's models than the default one (a LoRA by its served name)."""

        def run(i: int) -> Generation:
            gen = self._one(prompts[i], max_new_tokens, temperature, top_p, None if seed is None else seed + i, model)
            if progress is not None:
                progress.update(1)
            return gen

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            out = list(pool.map(run, range(len(prompts))))
        self.tokens_generated += sum(g.n_tokens for g in out)
        return out

    def close(self) -> None:
        self.client.close()


class RemoteGenerationModel:
    """A local ChatModel whose `generate` runs on another generator (a server's RemoteGenerator, the
    in-process LlamaCppEngine, or a VllmEngine); formatting, scoring and everything else stay local."""

    def __init__(self, local: ChatModel, generator: RemoteGenerator, score_on_generator: bool = False):
        self.local = local
        self.generator = generator
        # Scoring (the likelihood judge) on the generator only where that is faster (model/engines.py).
        self.score_on_generator = score_on_generator
        self.scorer = generator.score_tokens if score_on_generator else local.score_tokens

    def __getattr__(self, name):  # formatting, scoring, .model, .tokenizer, ... stay local
        return getattr(self.local, name)

    def generate(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, progress=None) -> list[Generation]:
        return self.generator.generate(prompts, max_new_tokens, temperature, top_p, seed, progress)

    def score_tokens(self, pieces, top: int = 0, progress=None):
        return self.scorer(pieces, top=top, progress=progress)

    continuation_logprobs = ChatModel.continuation_logprobs  # through this object's score_tokens

    @property
    def work_chunk(self) -> int:
        """Prompts per call that keep the generator busy: a server batches all it has in flight."""
        return max(self.local.work_chunk, getattr(self.generator, "concurrency", 0))

    @property
    def tokens_generated(self) -> int:
        return self.local.tokens_generated + self.generator.tokens_generated
