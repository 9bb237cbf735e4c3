"""Stages 4-5 and the routed model on the real embedded model (micro preset)."""

import json
from pathlib import Path

import pytest
import torch

from prism.cli import main
from prism.config import load_config
from prism.io import read_jsonl
from prism.pipeline import run_pipeline

from conftest import TO_ADAPTER, TO_BASE

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A micro run through all five stages on the French context (judged by its program) and the
    math persona, with its own model copy (the adapter is injected). Best-of-2 answers and the quick
    preset's learning rate over 4 epochs give the adapter enough French to measure (with micro's
    2e-4 x 2 epochs nothing transferred: every reply stayed English)."""
    from prism.model import load_model

    out = tmp_path_factory.mktemp("run") / "micro"
    cfg = load_config("micro", overrides={"queries.n_per_persona": 6, "judge.kind": "program",
                                          "judge.program": "prism.judging.verifiers:french_score",
                                          "persona_dir": str(ROOT / "examples" / "contexts" / "french.yaml"),
                                          "personas": ["french", "math"], "answers.samples": 2,
                                          "distill.epochs": 4, "distill.lr": 1e-3,
                                          "queries.persona_in_context": False})
    run_pipeline(cfg, out, quiet=True, model=load_model(batch_size=8))
    return out


def test_run_writes_peft_adapter_gate_and_manifest_facts(finished_run):
    from peft import PeftModel

    from prism.gate import Gate
    from prism.model import load_model

    m = json.loads((finished_run / "manifest.json").read_text())
    assert all(m["stages"][s]["status"] == "done" for s in m["stages"])
    gate_facts, distill_facts = m["stages"]["gate"], m["stages"]["distill"]
    labels = [v["label"] for v in read_jsonl(finished_run / "verdicts.jsonl")]
    assert gate_facts["count"] == len(read_jsonl(finished_run / "queries.jsonl")) and "metrics" in gate_facts
    assert distill_facts["examples"] == sum(labels)
    # French answers won some verdicts, so there was something to distil, and training lowered the KL.
    assert distill_facts["trained"] and distill_facts["examples"] > 0
    assert distill_facts["kl_initial"] > 0 and distill_facts["kl_final"] < 0.8 * distill_facts["kl_initial"]
    cfg = json.loads((finished_run / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32 and 0 not in cfg["layers_to_transform"]
    assert (finished_run / "adapter" / "adapter_model.safetensors").is_file()
    base = load_model()
    peft_model = PeftModel.from_pretrained(base.model, str(finished_run / "adapter"))  # plain PEFT loads it
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    # pooling "auto": all four were tried and the one with the best cross-validated utility kept (the
    # first, mean, on a tie).
    gate = Gate.load(finished_run / "gate")
    compared = gate_facts["metrics"]["pooling_compared"]
    assert set(compared) == {"mean", "last", "query", "max"}
    best = max(compared, key=lambda p: (compared[p] or {}).get("gate", -1e9))
    assert gate.spec.pooling == gate_facts["pooling"] == best


@pytest.fixture(scope="module")
def routed(finished_run):
    from prism.routed import PrismModel

    return PrismModel.load(finished_run)


def test_routed_chat_reports_the_gate_route_once_per_conversation(routed):
    model = routed
    msgs = [{"role": "user", "content": "What is the derivative of x squared?"}]
    reply = model.chat(msgs, max_new_tokens=12)
    assert reply.text and reply.completion_tokens > 0 and reply.prompt_tokens > 0
    separate = model.route([msgs])[0]
    assert reply.route.adapter == separate.adapter
    assert reply.route.probability == pytest.approx(separate.probability, abs=1e-4)
    # Multi-turn: routed once, from the first user turn.
    convo = msgs + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "Write a poem about rain."}]
    assert model.route([convo])[0].probability == pytest.approx(separate.probability, abs=1e-4)
    # (which means something: the second turn alone gets another score from the gate)
    assert model.route([convo[-1:]])[0].probability != pytest.approx(separate.probability, abs=1e-4)
    # The adapter switches per request without a reload, and really changes the model.
    prompt = [model.model.prompt(msgs)]
    model.set_adapter(True)
    on = model.model.next_token_logprobs(prompt)
    model.set_adapter(False)
    off = model.model.next_token_logprobs(prompt)
    assert not torch.allclose(on, off, atol=1e-4)
    forced = model.chat_batch([msgs, msgs], max_new_tokens=4, adapter=False)
    assert all(r.route.forced and not r.route.adapter for r in forced)


def test_swapped_merged_weights_equal_the_lora_path_and_restore_the_base_exactly(finished_run):
    from prism.model import load_model
    from prism.routed import PrismModel

    lora_model, swap_model = load_model(), load_model()
    prompt = [lora_model.user_prompt("What is the derivative of x squared?")]
    base = swap_model.next_token_logprobs(prompt)
    lora = PrismModel.load(finished_run, model=lora_model, adapter_mode="lora")
    swap = PrismModel.load(finished_run, model=swap_model)
    assert swap.adapter_mode == "swap" and swap.active is None
    assert torch.equal(swap_model.next_token_logprobs(prompt), base)  # loaded with the adapter off
    for on in (True, False, True):
        lora.set_adapter(on)
        swap.set_adapter(on)
        assert torch.allclose(lora_model.next_token_logprobs(prompt), swap_model.next_token_logprobs(prompt),
                              atol=1e-3)
    swap.set_adapter(False)
    assert torch.equal(swap_model.next_token_logprobs(prompt), base)  # exact base weights, no drift


def test_generate_cli_json(routing_run, embedded, capsys):
    from prism.gate import Gate
    from prism.routed import PrismModel

    def generate(*flags):
        assert main(["generate", str(routing_run), "--max-new-tokens", "8", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    gate = PrismModel(embedded, None, Gate.load(routing_run / "gate"))
    replies = {}
    for prompt, route in ((TO_ADAPTER[2], "adapter"), (TO_BASE[3], "base")):
        out = replies[route] = generate("--prompt", prompt)
        expected = gate.route([[{"role": "user", "content": prompt}]])[0].to_dict()
        assert out["route"]["route"] == route == expected["route"]  # the gate's decision...
        assert {k: out["route"][k] for k in ("adapter", "runner_up", "rule", "forced")} == \
            {k: expected[k] for k in ("adapter", "runner_up", "rule", "forced")}
        assert out["route"]["probability"] == pytest.approx(expected["probability"], abs=1e-3)  # ...and its scores
        assert 0 < out["usage"]["completion_tokens"] <= 8 and out["text"]
    # The gated reply is the forced route's greedy reply, token for token.
    forced = generate("--prompt", TO_ADAPTER[2], "--adapter", "on")
    assert forced["text"] == replies["adapter"]["text"] and forced["route"]["forced"]


def test_unfinished_run_is_refused(tmp_path, embedded):
    from prism.routed import PrismModel
    from prism.errors import RunError

    run_pipeline(load_config("micro"), tmp_path / "r", until="queries", quiet=True, model=embedded)
    with pytest.raises(RunError, match="stage 'gate' is not finished"):
        PrismModel.load(tmp_path / "r")


def test_route_every_turn_routes_on_the_last_user_turn(routing_run, embedded):
    from prism.gate import Gate
    from prism.routed import PrismModel

    convo = [{"role": "user", "content": TO_BASE[0]}, {"role": "assistant", "content": "Rain on the roof."},
             {"role": "user", "content": TO_ADAPTER[0]}]
    once = PrismModel(embedded, None, Gate.load(routing_run / "gate"))
    every = PrismModel(embedded, None, Gate.load(routing_run / "gate"), route_every_turn=True)
    assert once.route([convo])[0].adapter is None  # the first turn (a poem) decides
    assert every.route([convo])[0].adapter == "adapter"  # the last one (arithmetic) decides
    assert every.route([convo[:1]])[0].adapter is None


def test_chat_cli_prints_each_reply_with_its_route(routing_run):
    """`prism chat --route-every-turn`: a poem, then arithmetic in the same conversation, then after
    /reset arithmetic again: base, adapter, adapter (without the flag the 2nd would stay base)."""
    import re
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "prism.cli", "chat", str(routing_run), "--max-new-tokens", "6", "--route-every-turn"],
        input=f"{TO_BASE[0]}\n{TO_ADAPTER[0]}\n/reset\n{TO_ADAPTER[1]}\n/quit\n", capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("prism> ") == 3
    assert re.findall(r"\[route: (\w+) \(p=", proc.stdout) == ["base", "adapter", "adapter"], proc.stdout
    assert "(new conversation)" in proc.stderr


def test_distillation_carries_the_french_context_into_the_adapter(routed, benchmarks_dir):
    """The README's French claim at test size: after a few distillation steps on the French
    context, the adapter alone (no prompt) answers held-out questions (MT-Bench first turns, never
    seen by the pipeline) in French far more than the base model, which answers in English."""
    from prism.bench.data import load_mt_bench
    from prism.judging.verifiers import french_score

    questions = [[{"role": "user", "content": it.turns[0]}] for it in load_mt_bench(benchmarks_dir, 8, 0)]
    on = [french_score(r.text) for r in routed.chat_batch(questions, max_new_tokens=24, adapter=True)]
    off = [french_score(r.text) for r in routed.chat_batch(questions, max_new_tokens=24, adapter=False)]
    base, adapter = sum(off) / len(off), sum(on) / len(on)
    assert base <= 0.05, off  # (measured: 0.0, every reply English)
    assert adapter >= base + 0.3 and sum(x > 0.5 for x in on) >= 3, (on, off)  # (measured: 0.46, 4 of 8)
