"""The gate: a classifier over the layer-1 hidden state of a prompt that picks the base model or one
of the adapters, and the decision rule that turns its probabilities into a route.

Classes are "base" first, then one per adapter group. The rule adds a bias to each class's
log-probability and takes the largest. The biases are chosen to maximise the expected utility of
the routed system on cross-validated predictions, where the utility of a route is what its
context gained on that query (stage 3) minus a switching cost, and the base model's is 0. The
rule is scored the same way, each fold routed by biases fitted on the other folds, and compared
with the constant rules (always one class, e.g. route-none or route-all): a gate that does not
beat the best constant by a standard error is replaced by it (`spec.constant`).

Saved as `gate.safetensors` (weights and the feature standardisation) plus `gate_config.json`.
Binary gates written before classes existed (one sigmoid output and a threshold) load as two
classes with the same decisions.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from prism.io import atomic_write_json, atomic_write_tensors
from prism.version import __version__

log = logging.getLogger(__name__)

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate_config.json"
BASE = "base"


@dataclass
class GateSpec:
    input_dim: int
    classes: tuple[str, ...] = (BASE, "adapter")
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    pooling: str = "mean"
    layer: int = 1  # hidden state after this many decoder layers
    biases: tuple[float, ...] = ()  # added to each class's log-probability; () = none
    constant: str | None = None  # a class chosen for every prompt: the gate did not earn its place
    members: dict = field(default_factory=dict)  # class -> its adapters ({}: each class is one adapter)
    metrics: dict = field(default_factory=dict)
    single_logit: bool = False  # a binary gate of the old format: one logit z, classes (base, adapter)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(classes=list(self.classes), hidden=list(self.hidden), biases=list(self.biases))
        return d

    @classmethod
    def from_dict(cls, raw: dict) -> "GateSpec":
        raw = {k: v for k, v in raw.items() if k != "prism_version"}
        if "classes" not in raw:  # the old binary format: a sigmoid score against a threshold
            t = min(max(float(raw.pop("threshold", 0.5)), 1e-6), 1 - 1e-6)
            score = raw.pop("constant", None)
            raw.update(classes=(BASE, "adapter"), single_logit=True, biases=(0.0, -math.log(t / (1 - t))),
                       constant=None if score is None else ("adapter" if score >= t else BASE))
        return cls(**{**raw, "classes": tuple(raw["classes"]), "hidden": tuple(raw["hidden"]),
                      "biases": tuple(raw.get("biases") or ())})


class Gate(nn.Module):
    def __init__(self, spec: GateSpec):
        super().__init__()
        self.spec = spec
        dims = [spec.input_dim, *spec.hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.GELU(), nn.Dropout(spec.dropout)]
        layers.append(nn.Linear(dims[-1], 1 if spec.single_logit else len(spec.classes)))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(spec.input_dim))
        self.register_buffer("std", torch.ones(spec.input_dim))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        out = self.mlp((features.float() - self.mean) / self.std)
        return torch.cat([torch.zeros_like(out), out], dim=-1) if self.spec.single_logit else out

    @torch.no_grad()
    def probs(self, features: torch.Tensor) -> torch.Tensor:
        """P(class) for each row of features: (n, classes)."""
        was = self.training
        self.eval()
        out = torch.softmax(self.logits(features), dim=-1)
        self.train(was)
        return out

    def decide(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen class index, class probabilities) per row, by the decision rule."""
        p = self.probs(features)
        if self.spec.constant is not None:
            return torch.full((len(p),), self.spec.classes.index(self.spec.constant)), p
        return apply_rule(p, self.spec.biases), p

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        atomic_write_tensors(d / GATE_WEIGHTS, {k: v.detach().cpu() for k, v in self.state_dict().items()})
        atomic_write_json(d / GATE_CONFIG, {**self.spec.to_dict(), "prism_version": __version__})

    @classmethod
    def load(cls, directory: str | Path) -> "Gate":
        d = Path(directory)
        if not (d / GATE_CONFIG).is_file() or not (d / GATE_WEIGHTS).is_file():
            raise FileNotFoundError(f"{d} holds no gate ({GATE_CONFIG} and {GATE_WEIGHTS} expected)")
        gate = cls(GateSpec.from_dict(json.loads((d / GATE_CONFIG).read_text())))
        gate.load_state_dict(load_file(str(d / GATE_WEIGHTS)))
        return gate.eval()


# ----- the decision rule (pure) ----------------------------------------------------------------
def apply_rule(probs: torch.Tensor, biases: Sequence[float] = ()) -> torch.Tensor:
    """The class with the largest log-probability plus bias (ties: the earlier class, base first)."""
    scores = probs.clamp_min(1e-12).log()
    if len(biases):
        scores = scores + torch.tensor(biases, dtype=scores.dtype)
    return scores.argmax(-1)


def fit_biases(probs: torch.Tensor, utility: torch.Tensor, sweeps: int = 3) -> tuple[float, ...]:
    """Biases (base fixed at 0) that maximise the mean utility of the routed rows. Two classes: an
    exact search over thresholds; more: coordinate ascent, one class's bias at a time, over the
    values where a row's decision changes. Among equal utilities the smallest |bias| wins."""
    n, c = probs.shape
    logp = probs.clamp_min(1e-12).log()
    biases = [0.0] * c

    def value(b: list[float]) -> float:
        return float(utility[torch.arange(n), apply_rule(probs, b)].mean())

    for _ in range(sweeps if c > 2 else 1):
        for k in range(1, c):
            others = logp + torch.tensor(biases)
            others[:, k] = -math.inf
            edge = (others.max(-1).values - logp[:, k]).tolist()  # bias at which row i flips to class k
            finite = sorted({e for e in edge if math.isfinite(e)})
            candidates = [-50.0, 50.0, 0.0] + [(a + b) / 2 for a, b in zip(finite, finite[1:])]
            candidates += [finite[0] - 1.0, finite[-1] + 1.0] if finite else []
            best = max(candidates, key=lambda b: (value(biases[:k] + [b] + biases[k + 1:]), -abs(b)))
            biases[k] = best
    return tuple(round(b, 6) for b in biases)


def rule_utilities(probs: torch.Tensor, utility: torch.Tensor, folds: Sequence[int]) -> dict:
    """Per-row utilities of the gate's rule and of the best constant, each cross-fitted: the rows of
    a fold are routed by biases (or the constant) chosen on the other folds only."""
    folds_t = torch.tensor(folds)
    n = len(folds)
    gate_u, const_u = torch.zeros(n), torch.zeros(n)
    for f in sorted(set(folds)):
        test, train = folds_t == f, folds_t != f
        b = fit_biases(probs[train], utility[train])
        gate_u[test] = utility[test][torch.arange(int(test.sum())), apply_rule(probs[test], b)]
        best_const = int(utility[train].mean(0).argmax())
        const_u[test] = utility[test][:, best_const]
    return {"gate": gate_u, "constant": const_u}


def choose_rule(probs: torch.Tensor, utility: torch.Tensor, folds: Sequence[int], classes: Sequence[str]) -> dict:
    """The decision rule for the final gate, and the evidence for it: the gate's biases fitted on
    all cross-validated predictions, kept only if its cross-fitted utility beats the best
    constant's by at least one standard error of their paired difference."""
    u = rule_utilities(probs, utility, folds)
    diff = u["gate"] - u["constant"]
    se = float(diff.std(unbiased=True) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf
    constants = {name: round(float(utility[:, k].mean()), 4) for k, name in enumerate(classes)}
    best = max(constants, key=lambda name: (constants[name], name == BASE))
    keep = float(diff.mean()) > se
    return {
        "biases": fit_biases(probs, utility), "constant": None if keep else best,
        "cv_utility": {"gate": round(float(u["gate"].mean()), 4), "best_constant": round(float(u["constant"].mean()), 4),
                       "difference": round(float(diff.mean()), 4), "se": round(se, 4)},
        "constant_utility": constants, "best_constant": best,
    }


# ----- training the classifier --------------------------------------------------------------
def stratified_folds(labels: Sequence[int], k: int, seed: int) -> list[int]:
    """A fold id per row, each class spread evenly over the folds."""
    rng = random.Random(seed)
    folds = [0] * len(labels)
    for cls_ in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == cls_]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            folds[i] = j % k
    return folds


def train_classifier(features: torch.Tensor, labels: Sequence[int], spec: GateSpec, *, lr: float = 1e-3,
                     weight_decay: float = 1e-2, max_epochs: int = 200, patience: int = 20, holdout: float = 0.25,
                     l2: float = 1.0, seed: int = 0) -> Gate:
    """A gate fitted with class-weighted cross-entropy: a linear one (no hidden layer) to
    convergence with an L2 penalty `l2`, an MLP stopped early on an inner stratified split."""
    torch.manual_seed(seed)
    gate = Gate(spec)
    x = features.float()
    y = torch.tensor(labels, dtype=torch.long)
    if not spec.hidden:
        return _fit_linear(gate, x, y, l2)
    inner = stratified_folds(labels, max(2, round(1 / holdout)), seed)
    val = torch.tensor([f == 0 for f in inner]) if len(set(labels)) > 1 and len(labels) >= 8 else torch.zeros(len(y), dtype=torch.bool)
    tr = ~val
    gate.mean.copy_(x[tr].mean(0))
    gate.std.copy_(x[tr].std(0).clamp(min=1e-4) if int(tr.sum()) > 1 else torch.ones(x.shape[1]))
    weight = class_weights(y[tr], len(spec.classes))
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, bad = math.inf, None, 0
    for _ in range(max_epochs):
        gate.train()
        opt.zero_grad()
        loss_fn(gate.logits(x[tr]), y[tr]).backward()
        opt.step()
        if not val.any():
            continue
        gate.eval()
        with torch.no_grad():
            v = float(nn.functional.cross_entropy(gate.logits(x[val]), y[val], weight=weight))
        if v < best - 1e-4:
            best, bad, best_state = v, 0, {k: t.clone() for k, t in gate.state_dict().items()}
        elif (bad := bad + 1) >= patience:
            break
    if best_state is not None:
        gate.load_state_dict(best_state)
    return gate.eval()


def class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Each class weighted by n / (classes x its count): every class counts as much in the loss."""
    counts = torch.bincount(y, minlength=n_classes).float()
    return torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))


def _fit_linear(gate: Gate, x: torch.Tensor, y: torch.Tensor, l2: float) -> Gate:
    """Logistic regression on standardised features, fitted to convergence (full-batch L-BFGS):
    class-weighted cross-entropy summed over rows + l2/2 * |W|^2 (the bias free). Measured on the
    memory context's held-out user questions (runs/memF): AUC 0.92, where the same linear gate
    stopped early by AdamW on an inner split reached 0.79 (it stops long before it converges)."""
    gate.mean.copy_(x.mean(0))
    gate.std.copy_(x.std(0).clamp(min=1e-4) if len(x) > 1 else torch.ones(x.shape[1]))
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(y, len(gate.spec.classes)), reduction="sum")
    linear = gate.mlp[-1]
    opt = torch.optim.LBFGS(gate.parameters(), lr=1.0, max_iter=1000, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(gate.logits(x), y) + 0.5 * l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    gate.train()
    opt.step(closure)
    return gate.eval()


def fit_gate(features: torch.Tensor, labels: Sequence[int], utility: torch.Tensor, classes: Sequence[str], *,
             hidden: tuple[int, ...] = (128, 64), dropout: float = 0.1, pooling: str = "mean", folds: int = 5,
             min_examples: int = 8, seed: int = 0, **train_kw) -> Gate:
    """The gate for `features` (n, d) with training `labels` (class indices) and `utility` (n,
    classes: the utility of each route per row, base 0): k-fold predictions, the decision rule
    chosen on them, then the classifier refitted on everything."""
    n = len(labels)
    spec = GateSpec(input_dim=features.shape[1], classes=tuple(classes), hidden=tuple(hidden), dropout=dropout,
                    pooling=pooling)
    counts = {c: int(sum(y == i for y in labels)) for i, c in enumerate(classes)}
    k = min(folds, min((v for v in counts.values() if v), default=0))
    if n < min_examples or sum(v > 0 for v in counts.values()) < 2 or k < 2:
        best = max(classes, key=lambda c: (float(utility[:, classes.index(c)].mean()) if n else 0.0, c == BASE))
        spec.constant = best
        spec.metrics = {"n": n, "class_counts": counts, "constant": True, "reason": "too few examples or one class",
                        "constant_utility": {c: round(float(utility[:, i].mean()), 4) if n else 0.0
                                             for i, c in enumerate(classes)}}
        log.warning("gate: %d examples (%s) are too few or one-sided to train; using the constant rule %r",
                    n, counts, best)
        torch.manual_seed(seed)  # its unused weights too: the same run writes the same file
        return Gate(spec)
    fold_ids = stratified_folds(labels, k, seed)
    oof = torch.zeros(n, len(classes))
    for f in range(k):
        test = [i for i in range(n) if fold_ids[i] == f]
        train = [i for i in range(n) if fold_ids[i] != f]
        g = train_classifier(features[train], [labels[i] for i in train], spec, seed=seed + f, **train_kw)
        oof[test] = g.probs(features[test])
    rule = choose_rule(oof, utility, fold_ids, classes)
    gate = train_classifier(features, labels, spec, seed=seed, **train_kw)
    gate.spec.biases, gate.spec.constant = rule["biases"], rule["constant"]
    y = torch.tensor(labels)
    pred = oof.argmax(-1)
    gate.spec.metrics = {
        "n": n, "class_counts": counts, "folds": k, "constant": rule["constant"] is not None,
        "cv_accuracy": round(float((pred == y).float().mean()), 4),
        "cv_balanced_accuracy": round(balanced_accuracy(pred, y), 4),
        "majority_baseline": round(max(counts.values()) / n, 4),
        **{key: rule[key] for key in ("cv_utility", "constant_utility", "best_constant")},
        "cv_routed_share": {c: round(float((apply_rule(oof, rule["biases"]) == i).float().mean()), 4)
                            for i, c in enumerate(classes)},
    }
    if rule["constant"] is not None:
        gate.spec.metrics["reason"] = (f"the gate's cross-validated utility ({rule['cv_utility']['gate']}) does not beat "
                                       f"the best constant ({rule['cv_utility']['best_constant']}) by a standard error")
    return gate


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    accs = [(pred[y == c] == c).float().mean().item() for c in y.unique().tolist()]
    return sum(accs) / len(accs) if accs else float("nan")


def gate_summary(gate: Gate) -> str:
    """One line for the logs: what the gate decided and why."""
    m = gate.spec.metrics
    if gate.spec.constant is not None:
        return f"constant rule {gate.spec.constant!r} ({m.get('reason', '')})"
    u = m["cv_utility"]
    return (f"gate kept: cross-validated utility {u['gate']} vs best constant {m['best_constant']!r} "
            f"{u['best_constant']} (+{u['difference']}, se {u['se']}); cv accuracy {m['cv_accuracy']} "
            f"(majority {m['majority_baseline']})")


