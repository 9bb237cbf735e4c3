"""Stages 4-5 and the routed model on the real embedded model (micro preset)."""

import json
from pathlib import Path

import pytest
import torch

from prism.cli import main
from prism.config import load_config
from prism.io import read_jsonl
from prism.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A micro run through all five stages, with its own model copy (the adapter is injected)."""
    from prism.model import load_model

    out = tmp_path_factory.mktemp("run") / "micro"
    cfg = load_config("micro", overrides={"queries.n_per_persona": 6, "judge.kind": "program",
                                          "judge.program": "prism.judging.verifiers:french_score",
                                          "persona_dir": str(ROOT / "examples" / "contexts" / "french.yaml"),
                                          "personas": ["french", "math"], "distill.epochs": 2,
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
    if distill_facts["trained"]:
        assert distill_facts["kl_initial"] > 0 and distill_facts["kl_final"] < distill_facts["kl_initial"]
    cfg = json.loads((finished_run / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32 and 0 not in cfg["layers_to_transform"]
    assert (finished_run / "adapter" / "adapter_model.safetensors").is_file()
    base = load_model()
    peft_model = PeftModel.from_pretrained(base.model, str(finished_run / "adapter"))  # plain PEFT loads it
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    gate = Gate.load(finished_run / "gate")
    assert gate.spec.pooling in ("mean", "last")


def test_routed_chat_reports_the_gate_route_once_per_conversation(finished_run):
    from prism.routed import PrismModel

    model = PrismModel.load(finished_run)
    msgs = [{"role": "user", "content": "What is the derivative of x squared?"}]
    reply = model.chat(msgs, max_new_tokens=12)
    assert reply.text and reply.completion_tokens > 0 and reply.prompt_tokens > 0
    separate = model.route([msgs])[0]
    assert reply.route.adapter == separate.adapter
    assert reply.route.probability == pytest.approx(separate.probability, abs=1e-4)
    # Multi-turn: routed once, from the first user turn.
    convo = msgs + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And of x cubed?"}]
    assert model.route([convo])[0].probability == pytest.approx(separate.probability, abs=1e-4)
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


def test_generate_cli_json(finished_run, capsys):
    code = main(["generate", str(finished_run), "--prompt", "Say hello.", "--max-new-tokens", "8", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["text"] and out["route"]["route"] in ("adapter", "base") and out["usage"]["completion_tokens"] > 0


def test_unfinished_run_is_refused(tmp_path, embedded):
    from prism.routed import PrismModel
    from prism.errors import RunError

    run_pipeline(load_config("micro"), tmp_path / "r", until="queries", quiet=True, model=embedded)
    with pytest.raises(RunError, match="stage 'gate' is not finished"):
        PrismModel.load(tmp_path / "r")


def test_chat_cli_prints_each_reply_with_its_route(finished_run):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "prism.cli", "chat", str(finished_run), "--max-new-tokens", "6"],
        input="Hello there!\nWhat is 2+2?\n/reset\n/quit\n", capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("prism> ") == 2
    assert proc.stdout.count("[route: ") == 2
    assert "(new conversation)" in proc.stderr
