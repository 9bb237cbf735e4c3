"""Starting the servers: `prism serve` in the foreground, or a uvicorn server in a background
thread (tests and benchmarks)."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import threading
import time

import uvicorn

from prism.errors import ConfigError

log = logging.getLogger("prism.serve")


class BackgroundServer:
    """A real uvicorn server on a loopback port, run in a daemon thread.

    Port 0 lets the OS pick a free port at bind time (no race with other processes); `url`
    gives the port actually bound."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.host = host

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, extra: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """The host names a server bound to `host` answers to, besides the loopback ones: `extra`, and
    a non-loopback bound address itself. An address that binds every interface (0.0.0.0, ::) has
    no name of its own, so it needs them named."""
    if host in ("0.0.0.0", "::", "") and not extra:
        raise ConfigError(f"--host {host or '(all)'} listens on every address: name the host names clients use "
                          "with --allowed-host NAME (repeatable; '*' accepts any, e.g. behind a proxy that checks it)")
    return (*extra, *([host] if host not in ("0.0.0.0", "::", "") and not is_loopback(host) else []))


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          upstream: str | None = None, upstream_base: str | None = None, upstream_adapter: str = "prism-adapter",
          upstream_api_key: str | None = None, allowed_host: list[str] | None = None, engine: str = "auto",
          gguf: str | None = None, vllm_args: list[str] | None = None, dtype: str = "auto", **options) -> None:
    """Load a finished run and serve it until interrupted (the `prism serve` command). `dtype`: the
    torch engine's weights (auto: bfloat16 where the hardware computes it natively, else the run's)."""
    api_key = api_key or os.environ.get("PRISM_API_KEY") or None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    options["allowed_hosts"] = allowed_hosts(host, allowed_host or ())
    if not is_loopback(host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    from prism.routed import PrismModel

    # Settings are checked before anything slow (the upstream, the model) is touched.
    if upstream:
        from prism.run import RunDir
        from prism.export import upstream_names
        from prism.serve.router import RouterOptions, create_router_app, discover_base

        upstream_api_key = upstream_api_key or os.environ.get("PRISM_UPSTREAM_API_KEY") or None
        opts = RouterOptions(upstream=upstream, upstream_base=upstream_base or "", upstream_adapter=upstream_adapter,
                             upstream_api_key=upstream_api_key, api_key=api_key, **_fields_of(RouterOptions, options))
        names = upstream_names(RunDir(run_dir).require("gate", "distill").finished_adapters(), upstream_adapter)
        opts.upstream_base = upstream_base or discover_base(upstream, list(names.values()), upstream_api_key)
        app = create_router_app(PrismModel.load_gate_only(run_dir), opts)
        log.info("router: gate local, generation on %s (base %r, adapters %s)", upstream, opts.upstream_base,
                 ", ".join(names.values()))
    else:
        from prism.serve.app import ServeOptions, create_app

        local = ServeOptions(api_key=api_key, **_fields_of(ServeOptions, options))  # every limit checked first
        chosen = _engine_for(run_dir, engine, gguf)
        if chosen in ("vllm", "llamacpp"):  # the router in front of an engine of our own
            from prism.serve.router import RouterOptions, create_engine_app, create_vllm_app

            routing = RouterOptions(api_key=api_key, **_fields_of(RouterOptions, options))
        if chosen == "vllm":  # a vLLM server with the run's adapters loaded by name
            app = create_vllm_app(run_dir, routing, vllm_args or [])
        elif chosen == "llamacpp":
            prism = PrismModel.load_on_engine(run_dir, gguf=gguf, slots=local.max_batch,
                                              context=routing.context_length)
            app = create_engine_app(prism, routing)
            log.info("gate in torch (layer 0), generation on llama.cpp (%s, %d slots)", prism.engine.gguf.name,
                     local.max_batch)
        else:
            app = create_app(PrismModel.load(run_dir, **serving_dtype(run_dir, dtype)), local)
    mode = "router" if upstream else getattr(app.state, "mode", "local")
    print(f"prism: serving {run_dir} on http://{host}:{port} (mode: {mode})", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        if hasattr(app.state, "vllm"):  # our child vLLM server goes with us
            app.state.vllm.close()


def _engine_for(run_dir: str, engine: str, gguf: str | None) -> str:
    from prism.model.engines import pick_engine
    from prism.run import RunDir

    config = RunDir(run_dir).require("gate", "distill").config()
    return pick_engine(engine, config.model, gguf, config.device)


def serving_dtype(run_dir: str, dtype: str) -> dict:
    """The dtype override for serving a run on torch: bfloat16 by default where the CPU (AVX512-BF16,
    AMX) or GPU computes it natively (16 clients on the embedded model: benchmarks/engines.py; the
    gate's routes on 200 prompts were the same as in float32), else the run's own setting."""
    from prism.model.chat import fast_bf16
    from prism.model.loading import resolve_device
    from prism.run import RunDir

    if dtype != "auto":
        return {"dtype": dtype}
    device = resolve_device(RunDir(run_dir).config().device)
    return {"dtype": "bfloat16"} if fast_bf16(device) else {}


def _fields_of(cls, options: dict) -> dict:
    """The options that `cls` takes (router mode has no queue or batch settings); None = default."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in options.items() if k in names and v is not None}
