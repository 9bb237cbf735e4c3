import os
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct, loaded once per test session."""
    from prism.model import load_model

    return load_model("embedded", batch_size=8)


@pytest.fixture(scope="session")
def benchmarks_dir():
    path = Path(os.environ.get("PRISM_BENCHMARKS", BENCHMARKS))
    if not path.is_dir():
        pytest.fail(f"benchmark data not found at {path}; set PRISM_BENCHMARKS")
    return path


# The settings of the shared finished run: `prism run --preset micro --batch-size 8` on the CLI
# (tests/test_faults.py compares killed-and-resumed CLI runs against it).
MICRO_BATCH = 8


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """One finished micro run (all five stages on the embedded model) for the whole session. Tests
    only read it; a test that changes a run works on a copy (`copy_run`)."""
    from prism.config import load_config
    from prism.model import load_model
    from prism.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("shared") / "micro"
    run_pipeline(load_config("micro"), out, quiet=True, model=load_model(batch_size=MICRO_BATCH))
    return out


def copy_run(run, dest):
    import shutil

    shutil.copytree(run, dest)
    return dest


# A gate that really routes: the micro run's own gate is a constant rule (six queries are too few
# to train one), and with a constant gate every "same route as ..." check passes whatever the code
# does. This one is a real Gate, trained on the embedded model's layer-0 features of these prompts:
# arithmetic and algebra go to the adapter, everything else to the base model.
TO_ADAPTER = ["What is 12 times 13?", "Solve 2x + 3 = 11 for x.", "What is the derivative of x squared?",
              "Is 91 a prime number?", "Compute 7 * 8 - 5.", "What is the square root of 144?",
              "Simplify (a + b) squared.", "What is 15 percent of 80?"]
TO_BASE = ["Write a poem about rain.", "What is the capital of France?", "Tell me a story about a dragon.",
           "Name a fruit and describe it.", "Give me a recipe for pancakes.", "Who wrote Hamlet?",
           "Describe the ocean at night.", "Suggest a name for a cat."]


def install_two_route_gate(model, run_dir, to_adapter=TO_ADAPTER, to_base=TO_BASE):
    """Replace the gate of `run_dir` by one that sends the user turns `to_adapter` to the adapter and
    `to_base` to the base model: a linear Gate fitted to these prompts' layer-0 features (checked
    here on the features it will see at inference)."""
    import torch

    from prism.gate import BASE, Gate, GateSpec
    from prism.records import SHARED

    prompts = [model.user_prompt(q) for q in [*to_adapter, *to_base]]
    feats = model.layer1_states(prompts, pooling="mean")
    labels = torch.tensor([1] * len(to_adapter) + [0] * len(to_base))
    torch.manual_seed(0)
    gate = Gate(GateSpec(input_dim=feats.shape[1], classes=(BASE, SHARED), hidden=(), dropout=0.0, pooling="mean",
                         biases=(0.0, 0.0), members={SHARED: [SHARED]}))
    gate.mean.copy_(feats.mean(0))
    gate.std.copy_(feats.std(0).clamp(min=1e-4))
    opt = torch.optim.Adam(gate.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(gate.logits(feats), labels).backward()
        opt.step()
    gate.eval()
    # Temper it: trained to separation its probabilities are 0 and 1, which would hide a small
    # error in the features (e.g. padding in a batched pass); scaled, the largest margin between the
    # two classes' logits is 3 (probabilities between 0.5 and 0.95), with the same decisions.
    with torch.no_grad():
        logits = gate.logits(feats)
        scale = 3.0 / float((logits[:, 1] - logits[:, 0]).abs().max())
        gate.mlp[-1].weight.mul_(scale)
        gate.mlp[-1].bias.mul_(scale)
    assert gate.decide(feats)[0].tolist() == labels.tolist(), "the test gate does not separate its own prompts"
    gate.save(run_dir / "gate")
    return gate


@pytest.fixture(scope="session")
def routing_run(micro_run, embedded, tmp_path_factory):
    """A copy of the shared micro run whose gate routes by content (install_two_route_gate)."""
    run = copy_run(micro_run, tmp_path_factory.mktemp("routing") / "micro")
    install_two_route_gate(embedded, run)
    return run
