"""The vllm engine, against a real vLLM (its OpenAI server, started as a child process on loopback):
`prism serve --engine vllm` (the gate here on layer 0, replies from vLLM with the run's adapters
exported and loaded as named LoRAs) passes test_serve.py's server tests, routes as the torch
PrismModel routes, lets scoring requests through, and `prism run --engine vllm` generates stages 1-3.

vLLM lives in its own environment on this machine (it pins transformers < 5.20): set
PRISM_VLLM_PYTHON to its Python (.ci/run makes one). Without it every test here is skipped with one
reason."""

import json
import os

import httpx
import openai
import pytest

from prism.serve.server import BackgroundServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def vllm_present():
    from prism.model.vllm import unavailable

    if problem := unavailable():
        pytest.skip(f"the vllm engine cannot run here: {problem}")


# The same tests, collected here with this module's `local` fixture (the router in front of vLLM).
from conftest import TO_ADAPTER, TO_BASE  # noqa: E402
from test_serve import (CONTEXT, HELLO, KEY, ERRORS, USER, _post, client,  # noqa: E402,F401
                        run_dir, test_bad_requests_get_openai_error_bodies, test_chat_plain_reports_route_and_usage,
                        test_forced_routes_seed_stop_and_length, test_models_completions_and_health,
                        test_openai_client_raises_typed_errors, test_streaming_gives_the_same_text_as_plain)


@pytest.fixture(scope="module")
def local(run_dir):
    from prism.serve.router import RouterOptions, create_vllm_app

    app = create_vllm_app(run_dir, RouterOptions(api_key=KEY, context_length=CONTEXT, max_tokens_limit=256,
                                                 max_body_bytes=200_000), [])
    try:
        with BackgroundServer(app) as server:
            server.prism, server.app = app.state.prism, app
            yield server
    finally:
        app.state.vllm.close()


def test_health_names_the_engine(local):
    health = httpx.get(local.url + "/health", timeout=10).json()
    assert health["mode"] == "vllm" and health["upstream_status"] == "ok"
    assert len(local.prism.model.model.model.layers) == 1  # torch holds the gate's layer 0 only
    assert local.app.state.vllm.process.poll() is None


def test_routes_equal_the_torch_models_and_replies_agree(local, run_dir):
    """Every prompt takes the route the torch PrismModel gives it; the replies (vLLM bfloat16 vs torch
    float32, greedy) are compared token by token and the agreement reported."""
    from prism.routed import PrismModel

    torch_side = PrismModel.load(run_dir)
    questions = [*TO_ADAPTER, *TO_BASE]
    want = torch_side.chat_batch([[{"role": "user", "content": q}] for q in questions], max_new_tokens=24)
    rc = openai.OpenAI(base_url=local.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    agree = total = 0
    for q, w in zip(questions, want):
        raw = rc.chat.completions.with_raw_response.create(
            model="prism", messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0)
        reply = raw.parse()
        assert raw.headers["x-prism-route"] == w.route.name, q
        assert reply.prism["route"] == w.route.name
        a, b = torch_side.model.token_ids(w.text), torch_side.model.token_ids(reply.choices[0].message.content)
        agree += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        total += max(len(a), len(b))
    print(f"greedy prefix agreement vLLM bf16 vs torch: {agree}/{total} tokens")
    assert {w.route.name for w in want} == {"base", "adapter"}  # both routes were exercised
    assert agree / total >= 0.5, f"greedy token agreement {agree}/{total}"


def test_scoring_requests_pass_through(local, embedded):
    """`echo` + `max_tokens: 0` (what lm-eval and likelihood judges send) reach vLLM and return the
    prompt's log-probabilities, close to torch's own."""
    prompt = "The capital of France is Paris."
    r = _post(local.url + "/v1/completions", {"model": "prism-base", "prompt": prompt, "max_tokens": 0,
                                              "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    got = [x for x in r.json()["choices"][0]["logprobs"]["token_logprobs"] if x is not None]
    ids = embedded.token_ids(prompt)
    want = embedded.score_tokens([(ids[:1], ids[1:])])[0].logprobs
    assert len(got) == len(want) == len(ids) - 1
    assert max(abs(g - w) for g, w in zip(got, want)) < 0.5  # bfloat16 against float32


def test_stages_generate_on_vllm(tmp_path, run_dir):
    """`prism run --engine vllm`: stages 1-3 generate on a vLLM child server (stopped afterwards),
    the manifest says so, and the stages' outputs are complete."""
    from prism.pipeline import run_pipeline
    from prism.config import load_config

    config = load_config(preset="micro", overrides={"engine": "vllm"})
    out = tmp_path / "run"
    run_pipeline(config, out, until="verdicts", quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    for stage in ("queries", "answers", "verdicts"):
        assert manifest["stages"][stage]["status"] == "done"
        assert manifest["stages"][stage]["engine"] == "vllm"
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    queries = (out / "queries.jsonl").read_text().splitlines()
    assert len(answers) == len(queries) > 0 and all(a["answer_base"] and a["answer_persona"] for a in answers)
    assert not [p for p in os.popen("ps -eo args").read().splitlines() if "vllm.entrypoints" in p and
                str(out) in p]  # nothing of ours left running
