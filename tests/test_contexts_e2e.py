"""Several contexts, several adapters, one gate, on the real embedded model: a micro run with two
users' memories (one gate class, chosen by name) and a product sheet, then the routed model, the
server's model ids, and the context suite end to end."""

import json

import openai
import pytest
import torch

from prism.config import load_config
from prism.eval import run_eval
from prism.gate import Gate
from prism.pipeline import run_pipeline
from prism.serve.server import BackgroundServer

pytestmark = pytest.mark.slow
CONTEXTS = ["memory_maya", "memory_ben", "zorblax"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from prism.model import load_model

    out = tmp_path_factory.mktemp("ctx") / "run"
    cfg = load_config("micro-contexts", overrides={"personas": CONTEXTS})
    run_pipeline(cfg, out, quiet=True, model=load_model(batch_size=8))
    return out


@pytest.fixture(scope="module")
def routed(run_dir):
    from prism.routed import PrismModel

    return PrismModel.load(run_dir)


def test_one_adapter_per_context_and_a_gate_with_one_class_per_group(run_dir, routed):
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["adapters"] == CONTEXTS
    for name in CONTEXTS:
        assert (run_dir / "adapters" / name / "adapter_model.safetensors").is_file()
    gate = Gate.load(run_dir / "gate")
    assert gate.spec.classes == ("base", "memory", "zorblax")
    assert gate.spec.members == {"memory": ["memory_maya", "memory_ben"], "zorblax": ["zorblax"]}
    facts = m["stages"]["gate"]
    assert facts["general_queries"] == 6 and facts["labels"] == "source"
    assert facts["rule"] in ("gate", "constant") and "cv_utility" in facts["metrics"] or facts["metrics"]["constant"]
    # Saved and loaded: the same routes, the same adapters.
    assert routed.adapters == CONTEXTS and routed.members == gate.spec.members
    # Stage 1 kept only the contexts' questions that name one of their facts.
    from prism.contexts import ContextRegistry

    registry = ContextRegistry.load("suite:contexts")
    queries = [json.loads(line) for line in (run_dir / "queries.jsonl").read_text().splitlines()]
    own = [q for q in queries if q["persona"] in CONTEXTS]
    assert len(own) == 3 * 6 and all(registry.get(q["persona"]).fact_for(q["text"]) for q in own)


def test_each_adapter_is_its_own_function_and_off_is_the_exact_base(routed):
    prompt = [routed.model.user_prompt("What is my dog's name?")]
    routed.set_adapter(None)
    base = routed.model.next_token_logprobs(prompt)
    outs = {}
    for name in CONTEXTS:
        routed.set_adapter(name)
        outs[name] = routed.model.next_token_logprobs(prompt)
    routed.set_adapter(None)
    assert torch.equal(routed.model.next_token_logprobs(prompt), base)
    assert not torch.allclose(outs["memory_maya"], outs["memory_ben"], atol=1e-4)
    assert not torch.allclose(outs["memory_maya"], base, atol=1e-4)


def test_routes_name_the_adapter_its_probability_and_the_runner_up(routed):
    questions = ["What is my dog's name?", "How much does the Zorblax 3000 cost?", "What is the capital of France?"]
    free = routed.route([[{"role": "user", "content": q}] for q in questions])
    for r in free:
        assert r.runner_up in ("base", "memory", "zorblax") and r.runner_up != routed.class_of(r.adapter) \
            if r.adapter else r.runner_up != "base"
        # The classifier's probabilities; the chosen class can have the lower one (decision biases,
        # a constant rule), so only their range is fixed.
        assert 0 <= r.runner_up_probability <= 1 and 0 <= r.probability <= 1
        assert r.rule in ("gate", "constant", "needs a context name")
        # Two memories share the class: without a name the request cannot be served by one of them.
        assert r.adapter != "memory_ben" and (r.adapter != "memory_maya" or r.rule == "gate")
        # The route names the class the gate chose, also when no adapter of it could serve.
        assert r.gate_class == ("memory" if r.rule == "needs a context name" else
                                routed.class_of(r.adapter) if r.adapter else "base")
    named = routed.route([[{"role": "user", "content": q}] for q in questions], ["memory_ben"] * 3)
    assert all(r.adapter in (None, "memory_ben") for r in named)  # memory-or-base within the named memory
    forced = routed.chat([{"role": "user", "content": questions[1]}], max_new_tokens=4, adapter="zorblax")
    assert forced.route.adapter == "zorblax" and forced.route.forced


def test_the_server_offers_an_id_per_adapter_and_a_context_field(run_dir, routed):
    from prism.serve.app import ServeOptions, create_app

    with BackgroundServer(create_app(routed, ServeOptions(max_batch=4))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        ids = [m.id for m in client.models.list()]
        assert ids == ["prism-base", "prism-memory_maya", "prism-memory_ben", "prism-zorblax", "prism"]
        msgs = [{"role": "user", "content": "What is my dog's name?"}]
        forced = client.chat.completions.create(model="prism-memory_ben", messages=msgs, max_tokens=4, temperature=0)
        assert forced.prism["route"] == "memory_ben" and forced.prism["forced"]
        named = client.chat.completions.create(model="prism", messages=msgs, max_tokens=4, temperature=0,
                                               extra_body={"context": "memory_maya"})
        assert named.prism["route"] in ("memory_maya", "base") and not named.prism["forced"]
        with pytest.raises(openai.BadRequestError, match="context"):
            client.chat.completions.create(model="prism", messages=msgs, max_tokens=4,
                                           extra_body={"context": "memory_zoe"})
        with pytest.raises(openai.NotFoundError, match="prism-zorblax"):
            client.chat.completions.create(model="prism-adapter", messages=msgs, max_tokens=4)


def test_the_context_suite_end_to_end(run_dir, routed, tmp_path, benchmarks_dir):
    res = run_eval(tmp_path / "suite", run_dir=run_dir, chat_model=routed.model, preset="micro",
                   overrides={"suite": "contexts", "data": str(benchmarks_dir)}, quiet=True)
    assert set(res["systems"]) == {"base", "prompted", "prism", "oracle"}  # always_on: runs with one adapter only
    assert res["items"] == 3 * 6 + 6 + 3
    for system in res["systems"].values():
        assert set(system["recall"]) == set(CONTEXTS) and system["general_leak"]["n"] == 9
    base, prompted = res["systems"]["base"], res["systems"]["prompted"]
    assert base["general_as_base"]["mean"] == 1.0
    # The context in the prompt answers questions about it; the base model cannot.
    assert sum(prompted["recall"][c]["mean"] for c in CONTEXTS) > sum(base["recall"][c]["mean"] for c in CONTEXTS)
    assert set(res["routing"]) == {"base", "memory", "zorblax"}
    cost = res["cost"]
    assert set(cost) == {*CONTEXTS, "tool_registry"} and cost["tool_registry"]["context_tokens"] > 1900
    assert all(c["tokens_saved"] > 0 and c["ttft_prompted_ms"] > 0 for c in cost.values())
    md = (tmp_path / "suite" / "suite.md").read_text()
    assert "recall memory_ben" in md and "Routing accuracy" in md
