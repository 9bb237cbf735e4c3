"""The gate: the classifier, the decision rule chosen on cross-validated predictions, the fallback
to a constant rule, (K+1)-way routing, and save/load (including the old binary format)."""

import json

import pytest
import torch

from prism.gate import (BASE, Gate, GateSpec, apply_rule, choose_rule, class_weights, fit_biases, fit_gate,
                        stratified_folds, train_classifier)

CLASSES = (BASE, "memory", "zorblax", "vellmoor")


def _blobs(n_per=30, dim=16, classes=4, sep=3.0, seed=0):
    """Rows of `classes` Gaussian blobs, class c centred on sep * e_c."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per)
    x = torch.randn(len(y), dim, generator=g)
    x[torch.arange(len(y)), y] += sep
    return x, y.tolist()


def _utility(labels, gain=1.0, cost=0.05, classes=4):
    """A row's own class gains `gain`; any other adapter costs `cost`; base is 0."""
    u = torch.full((len(labels), classes), -cost)
    u[:, 0] = 0.0
    for i, y in enumerate(labels):
        if y:
            u[i, y] = gain - cost
    return u


def test_fit_biases_finds_the_utility_maximising_threshold_for_two_classes():
    # P(adapter) rises with the row index; the adapter helps exactly the rows 6..9.
    p = torch.tensor([[1 - a, a] for a in torch.linspace(0.05, 0.95, 10).tolist()])
    u = torch.zeros(10, 2)
    u[:, 1] = torch.tensor([-1.0] * 6 + [1.0] * 4)
    b = fit_biases(p, u)
    routed = apply_rule(p, b)
    assert routed.tolist() == [0] * 6 + [1] * 4
    assert float(u[torch.arange(10), routed].mean()) == pytest.approx(0.4)
    # The same rule without biases (argmax at 0.5) would route rows 5..9 and lose one point.
    assert apply_rule(p).tolist() == [0] * 5 + [1] * 5


def test_a_linear_gate_is_fitted_to_the_regularised_optimum():
    """No hidden layer: logistic regression run to convergence, not stopped early. At the fit the
    gradient of the objective (class-weighted cross-entropy summed over rows + l2/2 |W|^2) vanishes,
    and a stronger penalty gives smaller weights. Few rows, many features: where stopping early on
    an inner split left the memory gate at a held-out AUC of 0.79 (runs/memF), this reached 0.92."""
    x, y = _blobs(n_per=12, dim=64, classes=3, sep=1.5, seed=3)
    y = y[:-8]  # unbalanced: the last class has 4 rows
    x = x[: len(y)]
    spec = GateSpec(input_dim=64, classes=("base", "a", "b"), hidden=())
    weights = {}
    for l2 in (0.1, 10.0):
        gate = train_classifier(x, y, spec, l2=l2)
        weights[l2] = float(gate.mlp[-1].weight.detach().norm())
        params = [p.detach().clone().requires_grad_(True) for p in gate.mlp[-1].parameters()]
        z = (x - gate.mean) / gate.std
        loss = torch.nn.functional.cross_entropy(z @ params[0].T + params[1], torch.tensor(y), reduction="sum",
                                                 weight=class_weights(torch.tensor(y), 3))
        loss = loss + 0.5 * l2 * params[0].pow(2).sum()
        grads = torch.autograd.grad(loss, params)
        assert max(float(g.abs().max()) for g in grads) < 1e-3, l2
        # It separates its own training rows (the blobs are apart in 3 of 64 dimensions).
        assert (gate.probs(x).argmax(-1) == torch.tensor(y)).float().mean() > 0.9
    assert weights[10.0] < weights[0.1]


def test_an_informative_gate_is_kept_and_beats_every_constant():
    x, y = _blobs()
    gate = fit_gate(x, y, _utility(y), CLASSES, hidden=(), folds=5, seed=0, lr=3e-2, max_epochs=300)
    m = gate.spec.metrics
    assert gate.spec.constant is None and not m["constant"]
    assert m["cv_utility"]["gate"] > m["cv_utility"]["best_constant"] + m["cv_utility"]["se"]
    assert m["cv_utility"]["gate"] > max(m["constant_utility"].values())
    choice, probs = gate.decide(x)
    assert float((choice == torch.tensor(y)).float().mean()) >= 0.9  # routes every class, base included
    assert probs.shape == (len(y), 4) and torch.allclose(probs.sum(-1), torch.ones(len(y)))


def test_an_uninformative_gate_falls_back_to_the_best_constant_although_it_looks_better_in_sample():
    torch.manual_seed(0)
    n = 120
    labels = [i % 2 for i in range(n)]
    probs = torch.softmax(torch.randn(n, 2) * 2, -1)  # predictions that know nothing
    u = torch.zeros(n, 2)
    u[:, 1] = torch.tensor([0.3 if y else -0.2 for y in labels])  # mean 0.05: route-all is best
    in_sample = float(u[torch.arange(n), apply_rule(probs, fit_biases(probs, u))].mean())
    assert in_sample > float(u[:, 1].mean())  # tuned on the rows it is scored on, noise looks useful
    rule = choose_rule(probs, u, stratified_folds(labels, 5, 0), (BASE, "adapter"))
    assert rule["constant"] == "adapter"  # cross-fitted, it does not beat route-all: fall back to it
    assert rule["cv_utility"]["gate"] <= rule["cv_utility"]["best_constant"] + rule["cv_utility"]["se"]


@pytest.mark.parametrize("gains,expect", [([1.0] * 40, "adapter"),  # French: the context helps everywhere
                                          ([-1.0] * 40, BASE)])  # it hurts everywhere: leave the base model
def test_a_context_whose_right_rule_is_constant_gets_that_constant(gains, expect, caplog):
    x, y = _blobs(n_per=20, classes=2)
    u = torch.zeros(40, 2)
    u[:, 1] = torch.tensor(gains) - 0.05
    gate = fit_gate(x, y, u, (BASE, "adapter"), hidden=(), seed=0, max_epochs=100)
    assert gate.spec.constant == expect
    choice, _ = gate.decide(torch.randn(7, 16))
    assert choice.tolist() == [(BASE, "adapter").index(expect)] * 7


def test_one_sided_or_tiny_training_sets_give_the_best_constant_with_a_warning(caplog):
    x = torch.randn(10, 8)
    u = torch.zeros(10, 2)
    u[:, 1] = 0.5
    gate = fit_gate(x, [1] * 10, u, (BASE, "adapter"), seed=0)
    assert gate.spec.constant == "adapter" and gate.spec.metrics["constant"]
    assert "constant rule" in caplog.text
    gate = fit_gate(x[:3], [0, 1, 0], u[:3] * -1, (BASE, "adapter"), min_examples=8)
    assert gate.spec.constant == BASE


def test_save_load_round_trip_with_classes_members_and_biases(tmp_path):
    x, y = _blobs()
    gate = fit_gate(x, y, _utility(y), CLASSES, hidden=(8,), pooling="last", seed=0, max_epochs=80)
    gate.spec.members = {"memory": ["memory_maya", "memory_ben"], "zorblax": ["zorblax"], "vellmoor": ["vellmoor"]}
    gate.save(tmp_path / "gate")
    cfg = json.loads((tmp_path / "gate" / "gate_config.json").read_text())
    assert cfg["classes"] == list(CLASSES) and cfg["pooling"] == "last" and cfg["prism_version"]
    loaded = Gate.load(tmp_path / "gate")
    assert loaded.spec.members == gate.spec.members and loaded.spec.biases == gate.spec.biases
    assert torch.equal(loaded.decide(x)[0], gate.decide(x)[0])
    assert torch.allclose(loaded.probs(x), gate.probs(x))
    with pytest.raises(FileNotFoundError, match="holds no gate"):
        Gate.load(tmp_path)


def test_a_binary_gate_of_the_old_format_loads_with_the_same_decisions(tmp_path):
    spec = GateSpec(input_dim=4, hidden=(), single_logit=True)
    old = Gate(spec)
    torch.nn.init.normal_(old.mlp[0].weight)
    x = torch.randn(50, 4)
    z = old.mlp(x).squeeze(-1)
    threshold = 0.6
    expected = (torch.sigmoid(z) >= threshold).long()
    d = tmp_path / "gate"
    old.save(d)
    raw = json.loads((d / "gate_config.json").read_text())
    for key in ("classes", "biases", "single_logit", "members"):  # what a gate written before classes lacks
        raw.pop(key)
    raw.update(threshold=threshold, constant=None)
    (d / "gate_config.json").write_text(json.dumps(raw))
    loaded = Gate.load(d)
    assert loaded.spec.classes == (BASE, "adapter")
    assert torch.equal(loaded.decide(x)[0], expected)
    raw.update(constant=0.8)
    (d / "gate_config.json").write_text(json.dumps(raw))
    assert Gate.load(d).decide(x)[0].tolist() == [1] * 50


def test_max_pooling_ignores_padding_and_gives_zeros_for_an_empty_row():
    from prism.model.batching import pool

    hidden = torch.tensor([[[9.0, 9.0], [1.0, -2.0], [3.0, -1.0]], [[5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 0]])  # row 0 left-padded; row 1 has nothing to pool
    assert pool(hidden, mask, "max").tolist() == [[3.0, -1.0], [0.0, 0.0]]
    assert pool(hidden, mask, "query").tolist() == [[2.0, -1.5], [0.0, 0.0]]
