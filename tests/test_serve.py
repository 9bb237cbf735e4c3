"""The real server on a loopback port, driven by the official `openai` client and raw HTTP.

The session's micro run, with a gate that really routes (conftest.install_two_route_gate: the
run's own gate is a constant rule), is served by a local server, a router in front of it, and a
small server with a one-slot queue.
"""

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from prism.cli import main
from prism.config import load_config
from prism.io import read_jsonl
from prism.pipeline import run_pipeline
from prism.model.remote import free_port
from prism.serve.server import BackgroundServer

from conftest import TO_ADAPTER, TO_BASE

pytestmark = pytest.mark.slow
KEY = "test-key"
CONTEXT = 512
HELLO = [{"role": "user", "content": "What is the capital of France?"}]
# Minimal persona texts: the long ones can exceed micro's distill.max_seq_len (128 tokens).
MICRO = {"persona_length": "minimal"}


@pytest.fixture(scope="module")
def run_dir(routing_run):
    return routing_run


@pytest.fixture(scope="module")
def local(run_dir):
    """The local server, with its own model copy (the adapter is injected into it)."""
    from prism.routed import PrismModel
    from prism.serve.app import ServeOptions, create_app

    prism = PrismModel.load(run_dir)
    app = create_app(prism, ServeOptions(api_key=KEY, context_length=CONTEXT, max_tokens_limit=256,
                                         max_body_bytes=200_000))
    with BackgroundServer(app) as server:
        server.prism, server.app = prism, app
        yield server


@pytest.fixture(scope="module")
def client(local):
    return openai.OpenAI(base_url=local.url + "/v1", api_key=KEY, timeout=120, max_retries=0)


def gate_route(run_dir, embedded, messages):
    """The gate's decision computed apart from the server and from the routed model's code: the
    saved gate's decision rule on the layer-0 features of the first user turn, that prompt alone."""
    from types import SimpleNamespace

    from prism.gate import BASE, Gate

    gate = Gate.load(run_dir / "gate")
    first = next(m["content"] for m in messages if m["role"] == "user")
    choice, probs = gate.decide(embedded.layer1_states([embedded.user_prompt(first)], pooling=gate.spec.pooling))
    name = gate.spec.classes[int(choice[0])]
    return SimpleNamespace(name=name, adapter=None if name == BASE else name,
                           probability=float(probs[0, int(choice[0])]))


def test_chat_plain_reports_route_and_usage(local, client, run_dir, embedded):
    raw = client.chat.completions.with_raw_response.create(model="prism", messages=HELLO, max_tokens=8,
                                                            temperature=0)
    resp = raw.parse()
    text = resp.choices[0].message.content
    assert isinstance(text, str) and text.strip()
    assert resp.model == "prism" and resp.choices[0].finish_reason in ("stop", "length")
    assert 1 <= resp.usage.completion_tokens <= 8
    assert resp.usage.prompt_tokens == len(embedded.token_ids(embedded.prompt(HELLO)))
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    info = resp.prism
    expected = gate_route(run_dir, embedded, HELLO)
    assert info["adapter"] == (expected.adapter is not None) and info["forced"] is False
    assert info["score"] == pytest.approx(expected.probability, abs=1e-3)
    assert raw.headers["x-prism-route"] == info["route"] == expected.name


def test_streaming_gives_the_same_text_as_plain(client):
    msgs = [{"role": "user", "content": "Name a fruit and describe it."}]
    plain = client.chat.completions.create(model="prism", messages=msgs, max_tokens=16, temperature=0)
    raw = client.chat.completions.with_raw_response.create(
        model="prism", messages=msgs, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True})
    assert raw.headers["x-prism-route"] == plain.prism["route"]
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.prism["route"] == plain.prism["route"] for c in chunks)


def test_forced_routes_seed_stop_and_length(client):
    base = client.chat.completions.create(model="prism-base", messages=HELLO, max_tokens=6, temperature=0)
    adapter = client.chat.completions.create(model="prism-adapter", messages=HELLO, max_tokens=6, temperature=0)
    assert base.prism == {"route": "base", "adapter": False, "score": None, "runner_up": None,
                          "runner_up_score": None, "rule": "forced", "forced": True}
    assert adapter.prism["route"] == "adapter" and adapter.prism["forced"] is True
    short = client.chat.completions.create(model="prism-base", messages=HELLO, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    # seed: the same seed samples the same text, whatever else is in flight
    kw = dict(model="prism-base", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
              temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=11, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=11, **kw).choices[0].message.content
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (12, 13, 14)}
    assert a == b and others != {a}
    # stop: the reply ends before the stop string, with finish_reason "stop"
    full = client.chat.completions.create(model="prism-base", messages=HELLO, max_tokens=24, temperature=0)
    words = full.choices[0].message.content.split()
    assert len(words) >= 3
    stopped = client.chat.completions.create(model="prism-base", messages=HELLO, max_tokens=24, temperature=0,
                                             stop=[" " + words[2]])
    assert stopped.choices[0].finish_reason == "stop"
    assert full.choices[0].message.content.startswith(stopped.choices[0].message.content)
    assert words[2] not in stopped.choices[0].message.content.split()[2:]
    assert stopped.usage.completion_tokens < full.usage.completion_tokens


def test_models_completions_and_health(local, client):
    assert [m.id for m in client.models.list()] == ["prism-base", "prism-adapter", "prism"]
    comp = client.completions.create(model="prism-base", prompt="The capital of France is", max_tokens=5,
                                      temperature=0)
    assert comp.choices[0].text and 1 <= comp.usage.completion_tokens <= 5 and comp.prism["route"] == "base"
    streamed = client.completions.create(model="prism-base", prompt="The capital of France is", max_tokens=5,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == comp.choices[0].text
    health = httpx.get(local.url + "/health", timeout=10).json()  # no key needed for health
    assert health["status"] == "ok" and health["context_length"] == CONTEXT
    assert health["stats"]["requests"] >= 2


def test_a_burst_of_32_mixed_requests_gets_what_each_gets_alone(local, client, run_dir, embedded):
    """32 clients at once: 8 conversations, each sent as `prism` (the gate decides), `prism-base` and
    `prism-adapter`, greedy, plus a seeded sampled `prism` request each (half of those streamed).
    Batched together (one layer-0 pass routes the gated ones, left-padded to a common length; one
    decode batch per route), every request must get the route and the text it gets alone."""
    convs = [TO_ADAPTER[0], TO_BASE[0], TO_ADAPTER[3], TO_BASE[2],
             TO_ADAPTER[6] + " Show each step of the working and check the result at the end.",
             TO_BASE[4] + " I have eggs, flour, milk and a little sugar, and I would like them fluffy.",
             TO_ADAPTER[7], TO_BASE[5]]
    requests = [(i, model, None) for i in range(len(convs)) for model in ("prism", "prism-base", "prism-adapter")]
    requests += [(i, "prism", 100 + i) for i in range(len(convs))]  # sampled at temperature 1, seeded

    def body(i, model, seed):
        sampling = {"temperature": 0} if seed is None else {"temperature": 1.0, "top_p": 0.9, "seed": seed}
        return dict(model=model, messages=[{"role": "user", "content": convs[i]}], max_tokens=6, **sampling)

    # Alone: the gate's decision for each conversation by itself (computed apart from the server),
    # and each forced or sampled request sent by itself (a batch of one).
    gate = {i: gate_route(run_dir, embedded, [{"role": "user", "content": c}]) for i, c in enumerate(convs)}
    alone = {}
    for i, model, seed in requests:
        if model == "prism" and seed is None:
            continue  # its text is the forced route's (checked below), its route the gate's
        r = client.chat.completions.create(**body(i, model, seed))
        alone[(i, model, seed)] = r.choices[0].message.content
        if seed is not None:
            assert r.prism["route"] == gate[i].name
    for i in range(len(convs)):
        alone[(i, "prism", None)] = alone[(i, "prism-adapter" if gate[i].adapter else "prism-base", None)]
    before = httpx.get(local.url + "/health", timeout=10).json()["stats"]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=local.url + "/v1", api_key=KEY, timeout=180, max_retries=0)

        async def one(i, model, seed):
            if seed is not None and seed % 2:
                stream = await aclient.chat.completions.create(**body(i, model, seed), stream=True)
                parts = [c async for c in stream]
                text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
                return text, parts[0].prism
            r = await aclient.chat.completions.create(**body(i, model, seed))
            return r.choices[0].message.content, r.prism

        try:
            # A longer request first, so that the 32 queue up behind it and are taken in full
            # batches (mixed routes, in arrival order), not one by one as they arrive.
            blocker = asyncio.create_task(aclient.chat.completions.create(
                model="prism-base", messages=[{"role": "user", "content": TO_BASE[6]}], max_tokens=48, temperature=0))
            await asyncio.sleep(0.3)
            replies = await asyncio.gather(*(one(*req) for req in requests))
            await blocker
            return replies
        finally:
            await aclient.close()

    together = dict(zip(requests, asyncio.run(main())))
    assert len(together) == 32
    for (i, model, seed), (text, info) in together.items():
        route = {"prism-base": "base", "prism-adapter": "adapter"}.get(model, gate[i].name)
        assert info["route"] == route and text == alone[(i, model, seed)], ((i, model, seed), text, info)
        if model == "prism":  # the same gate probability as alone, though computed in a padded batch
            assert info["score"] == pytest.approx(gate[i].probability, abs=1e-3)
    # The test means something: the gate sends some conversations to the adapter and some to the
    # base model (its own training prompts exactly as trained), and the adapter changes the text.
    assert {gate[i].name for i in (0, 2, 6)} == {"adapter"} and {gate[i].name for i in (1, 3, 7)} == {"base"}
    assert any(alone[(i, "prism-base", None)] != alone[(i, "prism-adapter", None)] for i in range(len(convs)))
    after = httpx.get(local.url + "/health", timeout=10).json()["stats"]
    assert after["requests"] - before["requests"] == 33 and after["errors"] == before["errors"]
    assert after["batches"] - before["batches"] <= 8 and after["largest_batch"] == 16  # really batched


def test_a_request_joins_a_running_batch_and_leaves_first(local, client):
    """Continuous batching: a short request sent while a long reply is being decoded starts at the
    next step and is answered long before the long one ends (a static batch would make it wait for
    the whole long reply); the long reply is what it is alone."""
    long_body = dict(model="prism-base", messages=[{"role": "user", "content": TO_BASE[0]}], max_tokens=120,
                     temperature=1.0, seed=5)
    t0 = time.perf_counter()
    alone = client.chat.completions.create(**long_body)
    long_seconds = time.perf_counter() - t0
    assert alone.usage.completion_tokens == 120
    before = httpx.get(local.url + "/health", timeout=10).json()["stats"]
    parts = []
    with client.chat.completions.create(**long_body, stream=True) as stream:
        for chunk in stream:
            parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            if len(parts) == 8:  # the long reply is under way: a short request joins it
                t0 = time.perf_counter()
                short = client.chat.completions.create(model="prism-base", max_tokens=3, temperature=0,
                                                       messages=[{"role": "user", "content": TO_BASE[1]}])
                short_seconds = time.perf_counter() - t0
                assert short.usage.completion_tokens == 3
    after = httpx.get(local.url + "/health", timeout=10).json()["stats"]
    assert "".join(parts) == alone.choices[0].message.content
    assert short_seconds < long_seconds / 3, (short_seconds, long_seconds)
    assert after["errors"] == before["errors"]


def _post(url, body, key=KEY, raw=None, headers=None):
    h = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(url, content=content, headers=h, timeout=60)


USER = [{"role": "user", "content": "hi"}]
ERRORS = [  # (name, path, body or raw bytes, key, status, code or type)
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', KEY, 400, "invalid_json"),
    ("not an object", "/v1/chat/completions", b"[1, 2]", KEY, 400, "invalid_json"),
    ("no messages", "/v1/chat/completions", {"model": "prism"}, KEY, 400, "invalid_request_error"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, KEY, 400, "invalid_request_error"),
    ("no user message", "/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, KEY, 400,
     "invalid_request_error"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, KEY, 400,
     "invalid_request_error"),
    ("content not text", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, KEY, 400,
     "invalid_request_error"),
    ("max_tokens zero", "/v1/chat/completions", {"messages": USER, "max_tokens": 0}, KEY, 400,
     "invalid_request_error"),
    ("max_tokens too large", "/v1/chat/completions", {"messages": USER, "max_tokens": 100_000}, KEY, 400,
     "invalid_request_error"),
    ("max_tokens not a number", "/v1/chat/completions", {"messages": USER, "max_tokens": "many"}, KEY, 400,
     "invalid_request_error"),
    ("temperature out of range", "/v1/chat/completions", {"messages": USER, "temperature": 7}, KEY, 400,
     "invalid_request_error"),
    ("prompt longer than the context", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "word " * 700}]}, KEY, 413, "context_length_exceeded"),
    ("prompt plus max_tokens over the context", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 200}, KEY, 413,
     "context_length_exceeded"),
    ("body too large", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x" * 300_000}]}, KEY, 413, "request_too_large"),
    ("wrong key", "/v1/chat/completions", {"messages": USER}, "not-the-key", 401, "invalid_api_key"),
    ("missing key", "/v1/chat/completions", {"messages": USER}, None, 401, "invalid_api_key"),
    ("models without key", "/v1/models", None, None, 401, "invalid_api_key"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": USER}, KEY, 404, "model_not_found"),
    ("unknown path", "/v1/embeddings", {"input": "x"}, KEY, 404, "unknown_url"),
    ("two prompts", "/v1/completions", {"model": "prism-base", "prompt": ["a", "b"]}, KEY, 400,
     "invalid_request_error"),
]


@pytest.mark.parametrize("name,path,body,key,status,code", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_requests_get_openai_error_bodies(local, name, path, body, key, status, code):
    if body is None:
        r = httpx.get(local.url + path, headers={"authorization": f"Bearer {key}"} if key else {}, timeout=30)
    else:
        r = _post(local.url + path, None if isinstance(body, bytes) else body, key,
                  raw=body if isinstance(body, bytes) else None)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert code in (err["code"], err["type"]) and err["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_openai_client_raises_typed_errors(local):
    bad = openai.OpenAI(base_url=local.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=local.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        good.chat.completions.create(model="prism", messages=[{"role": "tool", "content": "x"}])


def test_full_queue_answers_503_and_the_server_recovers(run_dir):
    """A one-slot queue: requests beyond it are refused at once instead of piling up."""
    from prism.routed import PrismModel
    from prism.serve.app import ServeOptions, create_app

    app = create_app(PrismModel.load(run_dir), ServeOptions(max_batch=1, max_queue=1, batch_wait=0))

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            body = {"model": "prism-base", "messages": USER, "max_tokens": 40, "temperature": 0}
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(6)))

    with BackgroundServer(app) as server:
        replies = asyncio.run(burst(server.url))
        codes = sorted(r.status_code for r in replies)
        assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 1, codes
        busy = next(r for r in replies if r.status_code == 503)
        assert busy.json()["error"]["code"] == "queue_full" and busy.headers["retry-after"] == "1"
        ok = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200
        stats = httpx.get(server.url + "/health", timeout=10).json()["stats"]
        assert stats["rejected"] == codes.count(503) and stats["largest_batch"] == 1


def test_router_forwards_to_upstream_by_route(local, run_dir):
    from prism.routed import PrismModel
    from prism.serve.router import RouterOptions, create_router_app, discover_base

    assert discover_base(local.url, ["prism-adapter"], KEY) == "prism-base"
    gate_only = PrismModel.load_gate_only(run_dir)
    assert len(gate_only.model.model.model.layers) == 1  # the router holds layer 0 only
    app = create_router_app(gate_only, RouterOptions(upstream=local.url, upstream_base="prism-base",
                                                     upstream_api_key=KEY, context_length=CONTEXT))
    up = openai.OpenAI(base_url=local.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    with BackgroundServer(app) as router:
        rc = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        routes = []
        for msgs in (HELLO, [{"role": "user", "content": TO_ADAPTER[1]}]):
            raw = rc.chat.completions.with_raw_response.create(model="prism", messages=msgs, max_tokens=10,
                                                                temperature=0)
            via_router = raw.parse()
            direct = up.chat.completions.create(model="prism", messages=msgs, max_tokens=10, temperature=0)
            # The same gate decision as the full server's, and the same text from the chosen model.
            assert via_router.prism["route"] == direct.prism["route"] == raw.headers["x-prism-route"]
            assert via_router.prism["score"] == pytest.approx(direct.prism["score"], abs=1e-3)
            assert via_router.choices[0].message.content == direct.choices[0].message.content
            assert via_router.model == "prism" and via_router.usage.completion_tokens >= 1
            routes.append(via_router.prism["route"])
        assert routes == ["base", "adapter"]  # both ways through the router
        chunks = list(rc.chat.completions.create(model="prism-adapter", messages=HELLO, max_tokens=8,
                                                 temperature=0, stream=True))
        forced = up.chat.completions.create(model="prism-adapter", messages=HELLO, max_tokens=8, temperature=0)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            forced.choices[0].message.content
        assert all(c.prism["route"] == "adapter" and c.model == "prism-adapter" for c in chunks)
        r = _post(router.url + "/v1/chat/completions", {"messages": USER, "max_tokens": 0}, None)
        assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
        r = _post(router.url + "/v1/chat/completions", {"messages": [{"role": "x", "content": "y"}]}, None)
        assert r.status_code == 400
    # An upstream that is down: 502 with an OpenAI error body, not a stack trace.
    dead = create_router_app(gate_only, RouterOptions(upstream=f"http://127.0.0.1:{free_port()}",
                                                      upstream_base="prism-base"))
    with BackgroundServer(dead) as router:
        r = _post(router.url + "/v1/chat/completions", {"messages": USER, "max_tokens": 2}, None)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
        assert httpx.get(router.url + "/health", timeout=10).json()["status"] == "degraded"


def test_prism_serve_cli_router_binds_loopback(local, run_dir):
    """`prism serve RUN --upstream URL` as a user starts it, in its own process."""
    port = free_port()
    env = {**os.environ, "PRISM_UPSTREAM_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "prism.cli", "serve", str(run_dir), "--port", str(port),
                             "--upstream", local.url, "--api-key", "router-key"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the router did not come up"
            time.sleep(0.3)
        health = httpx.get(url + "/health", timeout=10).json()
        assert health["mode"] == "router" and health["upstream_models"]["base"] == "prism-base"
        rc = openai.OpenAI(base_url=url + "/v1", api_key="router-key", max_retries=0, timeout=120)
        for msgs, route in ((HELLO, "base"), ([{"role": "user", "content": TO_ADAPTER[4]}], "adapter")):
            reply = rc.chat.completions.create(model="prism", messages=msgs, max_tokens=4, temperature=0)
            assert reply.choices[0].message.content and reply.prism["route"] == route
        assert _post(url + "/v1/chat/completions", {"messages": USER}, "wrong").status_code == 401
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}" in out  # loopback unless told otherwise


def test_eval_judge_url_talks_to_our_own_server(local, tmp_path, benchmarks_dir, monkeypatch, capsys):
    """`prism eval --judge-url` sends MT-Bench's judge prompt to our server as the served model named,
    with the key from --judge-key-env. The HTTP judge asks for up to 1024 tokens per judgment, more
    than this server allows (256), so the request is refused and the eval ends with one line naming
    the server and the problem. (A judgment that is answered takes the 135M model 1024 tokens,
    about a minute each here: too slow for the suite; the parsing of replies is tested apart.)"""
    monkeypatch.setenv("PRISM_TEST_JUDGE_KEY", KEY)
    before = httpx.get(local.url + "/health", timeout=10).json()["stats"]
    argv = ["eval", "--model", "embedded", "--out", str(tmp_path / "e"), "--preset", "micro", "--data",
            str(benchmarks_dir), "--systems", "base", "--benchmarks", "mtbench", "--limit", "mtbench=1",
            "--judge-url", local.url, "--judge-served-model", "prism-base", "--judge-key-env", "PRISM_TEST_JUDGE_KEY",
            "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"prism: error: {local.url}/v1/chat/completions answered 400: max_tokens must be between 1 "
                   "and 256, got 1024")
    after = httpx.get(local.url + "/health", timeout=10).json()["stats"]
    assert after["requests"] == before["requests"]  # refused before it joined the queue
    # Without the key the server refuses it as unauthorised, which names the key problem instead.
    monkeypatch.delenv("PRISM_TEST_JUDGE_KEY")
    assert main(argv) == 2
    assert "answered 401: invalid or missing API key" in capsys.readouterr().err


@pytest.fixture(scope="module")
def remote_run(local, tmp_path_factory, embedded):
    """Stages 1-2 of a new micro run, generated by the local server through /v1/completions."""
    out = tmp_path_factory.mktemp("remote") / "micro"
    before = httpx.get(local.url + "/health", timeout=10).json()["stats"]["requests"]
    os.environ["PRISM_GENERATOR_API_KEY"] = KEY
    try:
        run_pipeline(load_config("micro", overrides={**MICRO, "generator_url": local.url}), out, until="answers",
                     quiet=True, model=embedded)
    finally:
        del os.environ["PRISM_GENERATOR_API_KEY"]
    after = httpx.get(local.url + "/health", timeout=10).json()["stats"]["requests"]
    return out, after - before


def test_pipeline_generates_on_an_openai_compatible_server(remote_run):
    out, served = remote_run
    queries = read_jsonl(out / "queries.jsonl")
    answers = read_jsonl(out / "answers.jsonl")
    assert len(queries) == 6 and len(answers) == 6  # micro: 2 personas x 3
    assert len({q["text"] for q in queries}) == 6 and all(a["answer_base"] and a["answer_persona"] for a in answers)
    assert served >= len(queries) + 2 * len(answers)  # every generation went to the server
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["generator_url"]
    assert manifest["stages"]["answers"]["tokens_generated"] == sum(
        a["tokens_base"] + a["tokens_persona"] for a in answers)


def test_training_finishes_under_accelerate_launch(remote_run):
    """The rest of that run (judging, gate, distillation) under `accelerate launch`, one CPU process."""
    out, _ = remote_run
    proc = subprocess.run(["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
                           "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "prism.cli", "run", "--preset", "micro", "--length", "minimal", "--out", str(out),
                           "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_several_processes_only_share_distillation(tmp_path, monkeypatch, embedded):
    from prism.errors import RunError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunError, match="only share stage 5"):
        run_pipeline(load_config("micro"), tmp_path / "r", quiet=True, model=embedded)


def test_exported_adapter_is_the_same_function(run_dir, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from prism.model import load_model
    from prism.export import export_adapter

    info = export_adapter(run_dir, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] is None and info["adapters"]["adapter"]["zero_layers"] == [0]
    tensors = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))
    layer0 = [v for k, v in tensors.items() if ".layers.0." in k]
    assert layer0 and all(float(v.abs().sum()) == 0 for v in layer0)
    assert "--enable-lora" in info["vllm"] and "prism-adapter=" in info["vllm"]
    original, exported = load_model(), load_model()
    a = PeftModel.from_pretrained(original.model, str(run_dir / "adapter"))
    b = PeftModel.from_pretrained(exported.model, str(tmp_path / "export"))
    ids = torch.tensor([original.token_ids(original.user_prompt("Explain gravity."))])
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
        a.base_model.disable_adapter_layers()
        plain = a(input_ids=ids).logits
    assert torch.allclose(la, lb, atol=1e-5)  # zero LoRA on layer 0 == no LoRA on layer 0
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["distill"]["trained"]
    assert not torch.allclose(la, plain, atol=1e-4)  # and the adapter is really there


def test_bfloat16_serving_routes_as_float32_does(run_dir):
    """`prism serve --engine torch` loads bfloat16 weights where the CPU has bf16 units: the gate
    must decide as it does on the float32 model it was trained on, and the replies must be text."""
    import torch

    from prism.routed import PrismModel
    from prism.serve.server import serving_dtype

    assert serving_dtype(str(run_dir), "float32") == {"dtype": "float32"}
    bf16 = PrismModel.load(run_dir, **serving_dtype(str(run_dir), "bfloat16"))
    assert bf16.model.model.dtype == torch.bfloat16
    convs = [[{"role": "user", "content": c}] for c in TO_ADAPTER + TO_BASE]
    routes = [r.name for r in bf16.route(convs)]
    assert routes == [r.name for r in PrismModel.load(run_dir).route(convs)]
    assert {"base"} < set(routes)  # both routes are exercised
    replies = bf16.chat_batch(convs[:1] + convs[-1:], 12)
    assert all(r.text.strip() for r in replies)
