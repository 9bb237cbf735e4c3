"""The gate: a small MLP over the layer-1 hidden state of a prompt that says whether the
persona adapter should be used for it.

Saved as `gate.safetensors` (weights and the feature standardisation) plus `gate_config.json`.
A degenerate training set (one class only, or too few examples) gives a constant gate.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from prism.io import atomic_write_json, atomic_write_tensors
from prism.version import __version__

log = logging.getLogger(__name__)

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate_config.json"


@dataclass
class GateSpec:
    input_dim: int
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    pooling: str = "mean"
    layer: int = 1  # hidden state after this many decoder layers
    threshold: float = 0.5
    constant: float | None = None  # a constant score when the gate could not be trained
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


class Gate(nn.Module):
    def __init__(self, spec: GateSpec):
        super().__init__()
        self.spec = spec
        dims = [spec.input_dim, *spec.hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.GELU(), nn.Dropout(spec.dropout)]
        layers.append(nn.Linear(dims[-1], 1))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(spec.input_dim))
        self.register_buffer("std", torch.ones(spec.input_dim))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.float() - self.mean) / self.std
        return self.mlp(x).squeeze(-1)

    @torch.no_grad()
    def score(self, features: torch.Tensor) -> torch.Tensor:
        """P(adapter helps) for each row of features."""
        if self.spec.constant is not None:
            return torch.full((features.shape[0],), float(self.spec.constant))
        was = self.training
        self.eval()
        out = torch.sigmoid(self.logits(features))
        self.train(was)
        return out

    def decide(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.score(features)
        return s >= self.spec.threshold, s

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_tensors(d / GATE_WEIGHTS, {k: v.detach().cpu() for k, v in self.state_dict().items()})
        atomic_write_json(d / GATE_CONFIG, {**self.spec.to_dict(), "prism_version": __version__})

    @classmethod
    def load(cls, directory: str | Path) -> "Gate":
        d = Path(directory)
        if not (d / GATE_CONFIG).is_file() or not (d / GATE_WEIGHTS).is_file():
            raise FileNotFoundError(f"{d} holds no gate ({GATE_CONFIG} and {GATE_WEIGHTS} expected)")
        raw = json.loads((d / GATE_CONFIG).read_text())
        raw.pop("prism_version", None)
        raw["hidden"] = tuple(raw["hidden"])
        gate = cls(GateSpec(**raw))
        gate.load_state_dict(load_file(str(d / GATE_WEIGHTS)))
        return gate.eval()


def _stratified_split(labels: list[int], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    train, test = [], []
    for cls_ in (0, 1):
        idx = [i for i, y in enumerate(labels) if y == cls_]
        rng.shuffle(idx)
        k = max(1, round(len(idx) * holdout)) if len(idx) > 1 else 0
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    accs = [(pred[y == c] == c).float().mean().item() for c in (0, 1) if (y == c).any()]
    return sum(accs) / len(accs) if accs else float("nan")


def train_gate(
    features: torch.Tensor,
    labels: list[int],
    *,
    hidden: tuple[int, ...] = (128, 64),
    dropout: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    max_epochs: int = 200,
    patience: int = 20,
    holdout: float = 0.25,
    min_examples: int = 8,
    pooling: str = "mean",
    seed: int = 0,
) -> Gate:
    """Train on a stratified split with class-weighted BCE, early-stop on the held-out loss, and
    pick the threshold that maximises held-out balanced accuracy."""
    n, dim = features.shape
    n_pos = sum(labels)
    spec = GateSpec(input_dim=dim, hidden=tuple(hidden), dropout=dropout, pooling=pooling)
    if n < min_examples or n_pos in (0, n) or min(n_pos, n - n_pos) < 2:
        share = n_pos / n if n else 0.0
        spec.constant = share
        spec.metrics = {"n": n, "positives": n_pos, "constant": True}
        log.warning("gate: %d examples with %d positives is too few or one-sided to train; using a constant gate "
                    "(score %.2f: adapter %s)", n, n_pos, share, "always on" if share >= 0.5 else "always off")
        return Gate(spec)
    torch.manual_seed(seed)
    gate = Gate(spec)
    x = features.float()
    y = torch.tensor(labels, dtype=torch.float32)
    train_idx, test_idx = _stratified_split(labels, holdout, seed)
    xt, yt, xv, yv = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    gate.mean.copy_(xt.mean(0))
    gate.std.copy_(xt.std(0).clamp(min=1e-4))
    pos_weight = ((len(yt) - yt.sum()) / yt.sum().clamp(min=1)).detach()  # class balance
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, bad, best_epoch = float("inf"), None, 0, 0
    for epoch in range(max_epochs):
        gate.train()
        opt.zero_grad()
        loss = loss_fn(gate.logits(xt), yt)
        loss.backward()
        opt.step()
        gate.eval()
        with torch.no_grad():
            val = nn.functional.binary_cross_entropy_with_logits(gate.logits(xv), yv, pos_weight=pos_weight).item()
        if val < best - 1e-4:
            best, bad = val, 0
            best_state = {k: v.clone() for k, v in gate.state_dict().items()}
            best_epoch = epoch
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is None:
        raise ValueError("gate training diverged (the held-out loss was never finite); check the features")
    gate.load_state_dict(best_state)
    gate.eval()
    sv = gate.score(xv)
    ordered = sorted({float(t) for t in sv})
    # Thresholds halfway between neighbouring held-out scores, so rounding cannot flip an example.
    candidates = sorted({0.5, *[(a + b) / 2 for a, b in zip(ordered, ordered[1:])]})
    threshold = max(candidates, key=lambda t: (balanced_accuracy((sv >= t).long(), yv.long()), -abs(t - 0.5)))
    spec.threshold = round(float(threshold), 6)
    st = gate.score(xt)
    spec.metrics = {
        "n": n, "positives": n_pos, "train": len(train_idx), "holdout": len(test_idx), "best_epoch": best_epoch,
        "holdout_loss": round(best, 4),
        "holdout_accuracy@0.5": round(((sv >= 0.5).float() == yv).float().mean().item(), 4),
        "holdout_accuracy": round(((sv >= threshold).float() == yv).float().mean().item(), 4),
        "holdout_balanced_accuracy": round(balanced_accuracy((sv >= threshold).long(), yv.long()), 4),
        "train_accuracy": round(((st >= threshold).float() == yt).float().mean().item(), 4),
        "majority_baseline": round(max(yv.mean().item(), 1 - yv.mean().item()), 4),
        "constant": False,
    }
    return gate
