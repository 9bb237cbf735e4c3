"""Stages 1-3 generating on any OpenAI-compatible server (vLLM, SGLang, `prism serve`).

`OpenAIGenerator.generate` has the signature of `ChatModel.generate`: it takes prompt strings
already formatted with the local chat template and sends each to the server's `/v1/completions`
endpoint, many at a time, so the server can batch them. `RemoteGenerationModel` puts it in front
of a local ChatModel: stages call `ctx.model.generate` as before and it goes to the server, while
chat formatting, judging by likelihood, the gate and distillation stay local.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from prism.models import ChatModel, Generation

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class GeneratorError(RuntimeError):
    """The generation server refused or could not be reached; the message says which and why."""


def v1_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class OpenAIGenerator:
    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 16,
                 timeout: float = 600.0, retries: int = 4, add_special_tokens: bool = False):
        import httpx  # imported here: the CLI imports this module's error class on every command

        self._httpx = httpx
        self.url = v1_url(url)
        self.concurrency = concurrency
        self.retries = retries
        # Prompts already hold the template's special tokens; a server adding a BOS would double it.
        self.add_special_tokens = add_special_tokens
        api_key = api_key or os.environ.get("PRISM_GENERATOR_API_KEY")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout,
                                   limits=httpx.Limits(max_connections=concurrency))
        self.model = model or self._first_model()
        self.tokens_generated = 0

    def _first_model(self) -> str:
        data = self._call("GET", "/models")
        ids = [m["id"] for m in data.get("data", [])]
        if not ids:
            raise GeneratorError(f"{self.url}/models lists no model; pass the model name (--generator-model)")
        return ids[0]

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One request, retried with backoff on connection errors and overload answers."""
        for attempt in range(self.retries + 1):
            try:
                r = self.client.request(method, self.url + path, json=body)
            except self._httpx.HTTPError as e:
                problem = f"cannot reach {self.url} ({type(e).__name__})"
            else:
                if r.status_code == 200:
                    return r.json()
                problem = f"{self.url}{path} answered {r.status_code}: {_error_message(r)}"
                if r.status_code not in RETRY_STATUS:
                    raise GeneratorError(problem)
            if attempt < self.retries:
                time.sleep(min(8.0, 0.5 * 2**attempt))
        raise GeneratorError(problem)

    def _one(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
             seed: int | None) -> Generation:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "add_special_tokens": self.add_special_tokens}
        if seed is not None:
            body["seed"] = seed
        data = self._call("POST", "/completions", body)
        try:
            text = data["choices"][0]["text"]
            n = int(data["usage"]["completion_tokens"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise GeneratorError(f"{self.url}/completions sent a reply without choices or usage") from None
        return Generation(text.strip(), n)

    def generate(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, progress=None) -> list[Generation]:
        """One continuation per prompt, sent concurrently. Prompt i gets seed + i, so identical prompts
        (stage 1 samples one prompt many times) still give different samples, as locally."""

        def run(i: int) -> Generation:
            gen = self._one(prompts[i], max_new_tokens, temperature, top_p, None if seed is None else seed + i)
            if progress is not None:
                progress.update(1)
            return gen

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            out = list(pool.map(run, range(len(prompts))))
        self.tokens_generated += sum(g.n_tokens for g in out)
        return out

    def close(self) -> None:
        self.client.close()


def _error_message(r) -> str:
    try:
        return str(r.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return r.text[:300]


class RemoteGenerationModel:
    """A local ChatModel whose `generate` runs on a remote server; everything else is local."""

    def __init__(self, local: ChatModel, generator: OpenAIGenerator):
        self._local = local
        self.generator = generator

    def __getattr__(self, name):  # formatting, scoring, .model, .tokenizer, ... stay local
        return getattr(self._local, name)

    def generate(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, progress=None) -> list[Generation]:
        return self.generator.generate(prompts, max_new_tokens, temperature, top_p, seed, progress)

    @property
    def tokens_generated(self) -> int:
        return self._local.tokens_generated + self.generator.tokens_generated
