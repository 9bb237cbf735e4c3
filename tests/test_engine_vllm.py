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


def test_eval_generates_on_vllm_with_each_routes_adapter(local, run_dir, embedded, benchmarks_dir, tmp_path):
    """`prism eval` with its replies on vLLM (the serving fixture's server: the run's adapter loaded as
    a named LoRA, chosen per route): the routes equal the torch eval's, the replies are close to
    torch's greedy ones (token agreement reported; bfloat16 against float32)."""
    from test_eval_e2e import token_agreement

    from prism.eval import run_eval
    from prism.export import upstream_names
    from prism.model.vllm import VllmEngine
    from prism.run import RunDir

    engine = VllmEngine(local.app.state.vllm, adapters=upstream_names(RunDir(run_dir).finished_adapters()))
    overrides = {"data": str(benchmarks_dir), "systems": ["base", "ungated", "prism"],
                 "benchmarks": ["safety", "xstest"], "limits": {"harmbench": 2, "jailbreak": 1, "pku": 2, "xstest": 4}}
    on_vllm = run_eval(tmp_path / "vllm", run_dir=run_dir, preset="micro", quiet=True, overrides=overrides,
                       engine=engine)
    on_torch = run_eval(tmp_path / "torch", run_dir=run_dir, preset="micro", quiet=True, overrides=overrides)
    got = json.loads((tmp_path / "vllm" / "raw.json").read_text())
    want = json.loads((tmp_path / "torch" / "raw.json").read_text())
    agreement = {}
    for system in ("base", "ungated", "prism"):
        for bench in ("safety", "xstest"):
            assert got[bench]["systems"][system]["routes"] == want[bench]["systems"][system]["routes"]
        agreement[system] = token_agreement(embedded, *[[t for b in ("safety", "xstest")
                                                         for t in r[b]["systems"][system]["texts"]] for r in (want, got)])
    print(f"eval replies, vLLM vs torch greedy token agreement: {agreement}")
    assert all(a >= 0.4 for a in agreement.values()), agreement
    assert on_vllm["systems"].keys() == on_torch["systems"].keys()


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
    # The likelihood judge scores in torch on a CPU (faster here than vLLM's prompt log-probabilities).
    assert manifest["stages"]["verdicts"]["scored_on"] == "torch"
    distill = manifest["stages"]["distill"]
    assert distill["teacher"] == "vllm top-k log-probabilities" and distill["kl_final"] < distill["kl_initial"]
    assert "--enforce-eager" in manifest["config"]["vllm_args"]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    queries = (out / "queries.jsonl").read_text().splitlines()
    assert len(answers) == len(queries) > 0 and all(a["answer_base"] and a["answer_persona"] for a in answers)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    leftover = [p for p in os.popen("ps -eo args").read().splitlines() if "vllm.entrypoints" in p]
    assert len(leftover) <= 1, leftover  # only the module's serving fixture, if any


@pytest.fixture(scope="module")
def bare_engine():
    """A vLLM server without LoRA, as `prism run --engine vllm` starts it for stages 1-3 and the
    teacher: with --enable-lora, vLLM 0.32's CPU build crashes on batched prompt log-probabilities
    (punica add_lora_logits)."""
    from prism.model.vllm import VllmEngine

    engine = VllmEngine.for_model("embedded", args=["--enforce-eager"], max_logprobs=64)
    yield engine
    engine.close()


def test_vllm_scores_tokens_as_torch_does_and_judges_alike(embedded, bare_engine):
    """Stage 3's likelihood judge on vLLM's prompt log-probabilities: the scored tokens'
    log-probabilities within bfloat16 noise of torch's float32 ones (mean gap < 0.15 nats), the same greedy flags and top
    alternatives at nearly every position, and the judge's verdicts on known-answer pairs equal."""
    from prism.judging import check_judge
    from prism.judging.pairwise import LikelihoodJudge
    from prism.model.remote import RemoteGenerationModel

    pieces = [(embedded.token_ids(embedded.user_prompt(q)), embedded.token_ids(a)) for q, a in QA]
    pieces.append((pieces[0][0][:1], pieces[0][1][:1]))  # one context token, one scored token
    want = embedded.score_tokens(pieces, top=3)
    got = bare_engine.score_tokens(pieces, top=3)
    tokens = sum(len(w.logprobs) for w in want)
    assert [len(g.logprobs) for g in got] == [len(w.logprobs) for w in want]
    gaps = [abs(a - b) for g, w in zip(got, want) for a, b in zip(g.logprobs, w.logprobs)]
    mean, worst = sum(gaps) / len(gaps), max(gaps)
    same_greedy = sum(a == b for g, w in zip(got, want) for a, b in zip(g.greedy, w.greedy))
    same_top1 = sum(a[0][0] == b[0][0] for g, w in zip(got, want) for a, b in zip(g.top, w.top))
    print(f"vLLM vs torch scoring: token log-prob gap mean {mean:.3f}, worst {worst:.3f}, greedy flags {same_greedy}/{tokens}, "
          f"top-1 {same_top1}/{tokens}")
    assert mean < 0.15 and worst < 1.5 and same_greedy >= 0.9 * tokens and same_top1 >= 0.9 * tokens
    assert all(len(t) == 3 for g in got for t in g.top)
    with pytest.raises(ValueError, match="context token"):
        bare_engine.score_tokens([([], [1])])

    # Known answers: the answer to this question (right) against the answer to the next one (wrong).
    triples = [(q, a, QA[(i + 1) % len(QA)][1]) for i, (q, a) in enumerate(QA)]
    on_torch = check_judge(LikelihoodJudge(embedded), triples)
    on_vllm_model = RemoteGenerationModel(embedded, bare_engine, score_on_generator=True)
    on_vllm = check_judge(LikelihoodJudge(on_vllm_model), triples)
    print(f"likelihood judge on known pairs: torch {on_torch.accuracy:.2f}, vLLM {on_vllm.accuracy:.2f}")
    assert on_vllm.accuracy >= on_torch.accuracy - 0.125 and on_vllm.passed == on_torch.passed
    assert on_vllm_model.work_chunk == bare_engine.concurrency > embedded.work_chunk


FRENCH = "Always answer in French. Réponds toujours en français."
QA = [("What is the capital of Italy?", "La capitale de l'Italie est Rome."),
      ("How many legs does a spider have?", "Une araignée a huit pattes."),
      ("Name a primary colour.", "Le rouge est une couleur primaire."),
      ("What do bees make?", "Les abeilles fabriquent du miel."),
      ("Where does the sun rise?", "Le soleil se lève à l'est."),
      ("What do cows drink?", "Les vaches boivent de l'eau."),
      ("What colour is the sky?", "Le ciel est bleu."),
      ("How many days are in a week?", "Il y a sept jours dans une semaine.")]


def test_vllm_teacher_agrees_with_torch_and_distils_as_well(embedded, bare_engine):
    """Stage 5's teacher pass on vLLM (prompt log-probabilities, bfloat16) against torch's (float32
    logits) on the same examples: the top-1 token agrees at >= 95% of positions (the mean KL between
    the two teachers' top-k distributions is printed), and a LoRA trained from either cache reaches
    the same held-out KL against torch's exact teacher, within 25% of the initial KL."""
    import torch
    from peft import get_peft_model

    from prism.distill import build_example, lora_config, student_batch, teacher_topk
    from prism.model.batching import decoder_layers

    model, pad, k = embedded.model, embedded.tokenizer.pad_token_id, 64
    examples = [build_example(embedded, f"q{i}", q, a, FRENCH, "system", 128) for i, (q, a) in enumerate(QA)]
    exact = teacher_topk(model, examples, k, 4, pad)
    on_vllm = bare_engine.teacher_topk(examples, k)
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
