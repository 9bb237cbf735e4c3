"""`prism serve --engine llamacpp`: the server tests of test_serve.py, run again against the
llama.cpp engine (gate in torch on layer 0, replies from the in-process llama.cpp server with the
run's adapters as LoRA GGUFs), and what only this engine does: the exported LoRA GGUF computes
what the PEFT adapter computes, and one bad request never fails the requests beside it."""

import asyncio

import httpx
import openai
import pytest

from prism.serve.server import BackgroundServer

pytest.importorskip("xllamacpp", reason="the llamacpp engine needs xllamacpp (a core dependency: pip install -e .)")

# The same tests, collected here with this module's `local` fixture (the engine's server).
from conftest import TO_ADAPTER, TO_BASE  # noqa: E402
from test_serve import (CONTEXT, HELLO, KEY, ERRORS, USER, _post, client,  # noqa: E402,F401
                        run_dir, test_bad_requests_get_openai_error_bodies, test_chat_plain_reports_route_and_usage,
                        test_forced_routes_seed_stop_and_length, test_models_completions_and_health,
                        test_openai_client_raises_typed_errors, test_streaming_gives_the_same_text_as_plain)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local(run_dir):
    from prism.routed import PrismModel
    from prism.serve.router import RouterOptions, create_engine_app

    # torch keeps its threads: the tests after this module run torch work (serving speed is not tested)
    prism = PrismModel.load_on_engine(run_dir, slots=8, context=CONTEXT, torch_threads=None)
    app = create_engine_app(prism, RouterOptions(api_key=KEY, context_length=CONTEXT, max_tokens_limit=256,
                                                 max_body_bytes=200_000))
    with BackgroundServer(app) as server:
        server.prism, server.app = prism, app
        yield server


def test_health_names_the_engine(local):
    health = httpx.get(local.url + "/health", timeout=10).json()
    assert health["mode"] == "llamacpp" and health["upstream_status"] == "ok"
    assert len(local.prism.model.model.model.layers) == 1  # torch holds the gate's layer 0 only


def test_lora_gguf_gives_the_peft_adapters_greedy_tokens(local, run_dir):
    """The adapter through llama.cpp (LoRA GGUF, f16 base) against torch + PEFT (float32), greedy:
    the same tokens. With the adapter off, llama.cpp gives the base model's tokens."""
    from prism.routed import PrismModel

    torch_side = PrismModel.load(run_dir, adapter_mode="lora")
    questions = ["What is the capital of France?", "Write a haiku about rain.", "Name three primary colors.",
                 "Give me one tip for sleeping better.", "Explain what a verb is.", "How do I boil an egg?"]
    convs = [[{"role": "user", "content": q}] for q in questions]
    agree, total = 0, 0
    for adapter in (True, False):
        want = torch_side.chat_batch(convs, max_new_tokens=24, adapter=adapter)
        got = local.prism.chat_batch(convs, max_new_tokens=24, adapter=adapter)
        for w, g in zip(want, got):
            a, b = torch_side.model.token_ids(w.text), torch_side.model.token_ids(g.text)
            agree += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            total += max(len(a), len(b))
        assert [g.route.adapter for g in got] == [w.route.adapter for w in want]
    # f16 weights and float32 activations (llama.cpp) vs float32 (torch): measured 100% here
    assert agree / total >= 0.9, f"greedy token agreement {agree}/{total}"
    adapted = local.prism.chat_batch(convs, max_new_tokens=24, adapter=True)
    base = local.prism.chat_batch(convs, max_new_tokens=24, adapter=False)
    assert [a.text for a in adapted] != [b.text for b in base]  # the adapter is really applied


def test_scoring_is_refused_with_a_reason(local):
    r = _post(local.url + "/v1/completions", {"model": "prism-base", "prompt": "The sky is", "max_tokens": 0,
                                              "echo": True, "logprobs": 1})
    assert r.status_code == 400 and "--engine torch" in r.json()["error"]["message"]


def test_32_concurrent_clients_and_bad_neighbours(local):
    """32 clients at once (half streaming, the model ids mixed), with malformed requests in between:
    every good one gets a reply with the route it gets alone, each bad one its own 400. (Texts are
    not compared with the replies alone: llama.cpp's batched kernels may change a greedy token when
    the batch around a sequence changes; test_serve.py checks that for the torch engine.)"""
    models = ["prism", "prism-base", "prism-adapter"]
    convs = [TO_ADAPTER[0], TO_BASE[0], TO_ADAPTER[3], TO_BASE[2]]
    sync = openai.OpenAI(base_url=local.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    alone = {(c, m): sync.chat.completions.create(model=m, messages=[{"role": "user", "content": c}], max_tokens=4,
                                                  temperature=0).prism["route"]
             for c in convs for m in models}

    async def main():
        client = openai.AsyncOpenAI(base_url=local.url + "/v1", api_key=KEY, timeout=180, max_retries=0)
        raw = httpx.AsyncClient(timeout=60)

        async def one(i):
            c, m = convs[i % len(convs)], models[i % 3]
            kw = dict(model=m, messages=[{"role": "user", "content": c}], max_tokens=8, temperature=0)
            if i % 2:
                parts = [p async for p in await client.chat.completions.create(stream=True, **kw)]
                text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
                return (c, m), text, parts[0].prism["route"]
            r = await client.chat.completions.create(**kw)
            return (c, m), r.choices[0].message.content, r.prism["route"]

        async def bad(i):
            r = await raw.post(local.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                               json={"messages": [{"role": "user", "content": "x"}], "max_tokens": -i - 1})
            return r.status_code

        try:
            return await asyncio.gather(asyncio.gather(*(one(i) for i in range(32))),
                                        asyncio.gather(*(bad(i) for i in range(8))))
        finally:
            await client.close()
            await raw.aclose()

    good, bad = asyncio.run(main())
    assert set(bad) == {400}
    assert all(text for _, text, _ in good)
    assert all(route == alone[key] for key, _, route in good)
    assert {route for _, _, route in good} == {"base", "adapter"}  # both routes were in the burst
    stats = httpx.get(local.url + "/health", timeout=10).json()["stats"]
    assert stats["upstream_errors"] == 0


def test_stages_generate_on_llamacpp_and_the_manifest_says_so(tmp_path, embedded):
    """`prism run --engine llamacpp`: stages 1-2 generate on llama.cpp (greedy/sampled replies of
    the right sizes), the judge and everything after stay in torch, and the manifest names the engine."""
    import json

    from prism.config import load_config
    from prism.io import read_jsonl
    from prism.pipeline import run_pipeline

    config = load_config("micro", overrides={"engine": "llamacpp"})
    run_pipeline(config, tmp_path / "run", quiet=True, model=embedded, until="answers")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["queries"]["engine"] == manifest["stages"]["answers"]["engine"] == "llamacpp"
    answers = read_jsonl(tmp_path / "run" / "answers.jsonl")
    queries = read_jsonl(tmp_path / "run" / "queries.jsonl")
    assert len(answers) == len(queries) > 0
    assert all(a["answer_base"].strip() and a["answer_persona"].strip() for a in answers)
    assert manifest["stages"]["answers"]["tokens_generated"] > 0
