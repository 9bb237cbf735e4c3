"""Starting the servers: `prism serve` in the foreground, or a uvicorn server in a background
thread (tests and benchmarks)."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import socket
import threading
import time

import uvicorn

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


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (for a server started in another process)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          upstream: str | None = None, upstream_base: str | None = None, upstream_adapter: str = "prism-adapter",
          upstream_api_key: str | None = None, **options) -> None:
    """Load a finished run and serve it until interrupted (the `prism serve` command)."""
    api_key = api_key or os.environ.get("PRISM_API_KEY") or None
    if not is_loopback(host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    if upstream:
        from prism.routed import PrismModel
        from prism.serve.router import RouterOptions, create_router_app, discover_base

        upstream_api_key = upstream_api_key or os.environ.get("PRISM_UPSTREAM_API_KEY") or None
        base = upstream_base or discover_base(upstream, upstream_adapter, upstream_api_key)
        prism = PrismModel.load_gate_only(run_dir)
        opts = RouterOptions(upstream=upstream, upstream_base=base, upstream_adapter=upstream_adapter,
                             upstream_api_key=upstream_api_key, api_key=api_key, **_fields_of(RouterOptions, options))
        app = create_router_app(prism, opts)
        log.info("router: gate local, generation on %s (base %r, adapter %r)", upstream, base, upstream_adapter)
    else:
        from prism.routed import PrismModel
        from prism.serve.app import ServeOptions, create_app

        prism = PrismModel.load(run_dir)
        app = create_app(prism, ServeOptions(api_key=api_key, **_fields_of(ServeOptions, options)))
    print(f"prism: serving {run_dir} on http://{host}:{port} (mode: {'router' if upstream else 'local'})",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


def _fields_of(cls, options: dict) -> dict:
    """The options that `cls` takes (router mode has no queue or batch settings); None = default."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in options.items() if k in names and v is not None}
