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


def test_all_stages_run_with_the_vllm_engine(tmp_path, run_dir):
    """`prism run --engine vllm`: stages 1-3 generate on a vLLM child server and stage 5's teacher
    pass scores there too (stopped afterwards); the manifest says so; the adapter is trained."""
    from prism.config import load_config
    from prism.pipeline import run_pipeline

    out = tmp_path / "run"
    # --enforce-eager: no torch.compile at start-up (80 s -> 20 s here); vLLM's flags pass through
    run_pipeline(load_config("micro", overrides={"engine": "vllm", "vllm_args": ["--enforce-eager"]}), out,
                 quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    for stage in ("queries", "answers", "verdicts"):
        assert manifest["stages"][stage]["engine"] == "vllm"
    distill = manifest["stages"]["distill"]
    assert distill["teacher"] == "vllm top-k log-probabilities" and distill["kl_final"] < distill["kl_initial"]
    assert "--enforce-eager" in manifest["config"]["vllm_args"]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    queries = (out / "queries.jsonl").read_text().splitlines()
    assert len(answers) == len(queries) > 0 and all(a["answer_base"] and a["answer_persona"] for a in answers)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    leftover = [p for p in os.popen("ps -eo args").read().splitlines() if "vllm.entrypoints" in p]
    assert len(leftover) <= 1, leftover  # only the module's serving fixture, if any


FRENCH = "Always answer in French. Réponds toujours en français."
QA = [("What is the capital of Italy?", "La capitale de l'Italie est Rome."),
      ("How many legs does a spider have?", "Une araignée a huit pattes."),
      ("Name a primary colour.", "Le rouge est une couleur primaire."),
      ("What do bees make?", "Les abeilles fabriquent du miel."),
      ("Where does the sun rise?", "Le soleil se lève à l'est."),
      ("What do cows drink?", "Les vaches boivent de l'eau."),
      ("What colour is the sky?", "Le ciel est bleu."),
      ("How many days are in a week?", "Il y a sept jours dans une semaine.")]


def test_vllm_teacher_agrees_with_torch_and_distils_as_well(embedded):
    """Stage 5's teacher pass on vLLM (prompt log-probabilities, bfloat16) against torch's (float32
    logits) on the same examples: the top-1 token agrees at >= 95% of positions (the mean KL between
    the two teachers' top-k distributions is printed), and a LoRA trained from either cache reaches
    the same held-out KL against torch's exact teacher, within 25% of the initial KL."""
    import torch
    from peft import get_peft_model

    from prism.distill import build_example, lora_config, student_batch, teacher_topk
    from prism.model.batching import decoder_layers
    from prism.model.vllm import VllmEngine

    model, pad, k = embedded.model, embedded.tokenizer.pad_token_id, 64
    examples = [build_example(embedded, f"q{i}", q, a, FRENCH, "system", 128) for i, (q, a) in enumerate(QA)]
    exact = teacher_topk(model, examples, k, 4, pad)
    # A server without LoRA, as `prism run --engine vllm` starts it: with --enable-lora, vLLM 0.32's CPU
    # build crashes on batched prompt log-probabilities (punica add_lora_logits).
    engine = VllmEngine.for_model("embedded", args=["--enforce-eager"], max_logprobs=k)
    try:
        on_vllm = engine.teacher_topk(examples, k)
    finally:
        engine.close()
    assert not any(key.endswith(".lse") for key in on_vllm)
    agree = positions = 0
    kls = []
    for e in examples:
        tv, ti = exact[f"{e.key}.values"], exact[f"{e.key}.indices"]
        vv, vi = on_vllm[f"{e.key}.values"], on_vllm[f"{e.key}.indices"]
        assert vv.shape == vi.shape == (e.n_response, k)
        agree += int((ti[:, 0] == vi[:, 0]).sum())
        positions += e.n_response
        for row in range(e.n_response):  # KL over the tokens both top-k lists hold, renormalised
            common = sorted(set(ti[row].tolist()) & set(vi[row].tolist()))
            p = torch.log_softmax(tv[row][[ti[row].tolist().index(t) for t in common]], -1)
            q = torch.log_softmax(vv[row][[vi[row].tolist().index(t) for t in common]], -1)
            kls.append(float((p.exp() * (p - q)).sum()))
    print(f"teacher top-1 agreement {agree}/{positions}; mean KL(torch || vLLM) over shared top-{k} "
          f"{sum(kls) / len(kls):.4f}")
    assert agree / positions >= 0.95, (agree, positions)

    train, held = examples[:6], examples[6:]
    held_exact = student_batch(held, exact, pad, k)

    def trained_kl(cache) -> float:
        torch.manual_seed(0)
        peft_model = get_peft_model(model, lora_config(len(decoder_layers(model)), 8, 16, 0.0,
                                                       ["q_proj", "v_proj", "o_proj", "up_proj"]))
        try:
            opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
            batch = student_batch(train, cache, pad, k)
            peft_model.train()
            for _ in range(12):
                batch.kl(batch.logits(peft_model), 2.0).backward()
                opt.step()
                opt.zero_grad()
            peft_model.eval()
            with torch.no_grad():
                return held_exact.kl(held_exact.logits(peft_model), 2.0).item()
        finally:
            peft_model.unload()
            model.eval()

    with torch.no_grad():
        kl0 = held_exact.kl(held_exact.logits(model), 2.0).item()
    from_torch, from_vllm = trained_kl(exact), trained_kl(on_vllm)
    print(f"held-out KL: initial {kl0:.4f}, trained on the torch teacher {from_torch:.4f}, on vLLM's {from_vllm:.4f}")
    assert from_torch < kl0 and from_vllm < kl0
    assert abs(from_torch - from_vllm) <= 0.25 * kl0, (kl0, from_torch, from_vllm)
