import json

import pytest
import torch

from prism.gate import Gate, balanced_accuracy, train_gate


def _blobs(n=80, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([i % 2 for i in range(n)])
    x = torch.randn(n, dim, generator=g) + 1.5 * y[:, None] * torch.ones(dim) / dim**0.5 * 3
    return x, y.tolist()


def test_gate_learns_a_separable_problem_and_reports_holdout_metrics():
    x, y = _blobs()
    gate = train_gate(x, y, hidden=(32, 16), max_epochs=200, seed=0)
    m = gate.spec.metrics
    assert m["holdout"] == 20 and m["train"] == 60
    assert m["holdout_accuracy"] >= 0.85
    assert 0.0 < gate.spec.threshold < 1.0
    on, score = gate.decide(x)
    assert ((on.long() == torch.tensor(y)).float().mean()) >= 0.85
    assert score.min() >= 0 and score.max() <= 1


def test_class_imbalance_is_balanced():
    x, y = _blobs(n=100)
    keep = [i for i in range(100) if y[i] == 0 or i % 10 == 1]  # 50 negatives, 5 positives
    gate = train_gate(x[keep], [y[i] for i in keep], hidden=(32,), seed=0)
    pred = gate.decide(x[keep])[0].long()
    assert pred.sum() > 0  # a majority-class gate would never fire
    assert balanced_accuracy(pred, torch.tensor([y[i] for i in keep])) > 0.7


@pytest.mark.parametrize("labels,expect_on", [([1] * 10, True), ([0] * 10, False), ([1, 0, 1], True)])
def test_degenerate_training_sets_give_a_constant_gate_with_a_warning(labels, expect_on, caplog):
    x = torch.randn(len(labels), 8)
    gate = train_gate(x, labels, min_examples=8)
    assert gate.spec.constant is not None and gate.spec.metrics["constant"]
    assert "constant gate" in caplog.text
    on, _ = gate.decide(torch.randn(5, 8))
    assert bool(on.all()) == expect_on and bool(on.any()) == expect_on


def test_save_load_round_trip(tmp_path):
    x, y = _blobs()
    gate = train_gate(x, y, hidden=(32, 16), seed=0, pooling="last")
    gate.save(tmp_path / "gate")
    cfg = json.loads((tmp_path / "gate" / "gate_config.json").read_text())
    assert cfg["pooling"] == "last" and cfg["hidden"] == [32, 16] and cfg["prism_version"]
    loaded = Gate.load(tmp_path / "gate")
    assert torch.allclose(loaded.score(x), gate.score(x))
    assert loaded.spec.threshold == gate.spec.threshold
    with pytest.raises(FileNotFoundError, match="holds no gate"):
        Gate.load(tmp_path)
