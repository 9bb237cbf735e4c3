"""Bootstrap confidence intervals and paired differences (pure functions)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean and percentile-bootstrap CI of `values` (NaNs dropped)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    a = (1 - level) / 2
    return {"mean": float(x.mean()), "lo": float(np.quantile(boots, a)), "hi": float(np.quantile(boots, 1 - a)),
            "n": int(len(x))}


def paired_diff_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> dict:
    """Mean of a - b over paired items, with a bootstrap CI that resamples items (pairs kept)
    and a two-sided sign-flip permutation p-value for 'no difference'. The permutation test is
    exact for small n, where the bootstrap alone is overconfident (two items that agree in sign
    give a bootstrap CI that excludes 0, but p = 0.5)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    d = np.asarray([x - y for x, y in zip(a, b) if x is not None and y is not None
                    and not math.isnan(x) and not math.isnan(y)], dtype=float)
    if len(d) == 0:
        return {"diff": None, "lo": None, "hi": None, "p": None, "n": 0}
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    a_ = (1 - level) / 2
    return {"diff": float(d.mean()), "lo": float(np.quantile(boots, a_)), "hi": float(np.quantile(boots, 1 - a_)),
            "p": sign_flip_p(d), "n": int(len(d))}


def pooled_mean_ci(parts: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                   paired: bool = False) -> dict:
    """The mean of the parts' means (e.g. the paper's Overall over sub-scores), with a bootstrap CI
    that resamples items within each part. `paired`: the parts hold paired differences, and a
    two-sided bootstrap p-value is added."""
    arrays = [np.asarray(p, dtype=float) for p in parts if len(p)]
    name = "diff" if paired else "mean"
    if not arrays:
        return {name: None, "lo": None, "hi": None, **({} if paired else {"n": 0})}
    rng = np.random.default_rng(seed)
    boots = np.mean([a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(1) for a in arrays], axis=0)
    a_ = (1 - level) / 2
    out = {name: float(np.mean([a.mean() for a in arrays])), "lo": float(np.quantile(boots, a_)),
           "hi": float(np.quantile(boots, 1 - a_))}
    if paired:
        out["p"] = float(min(1.0, 2 * min((boots <= 0).mean(), (boots >= 0).mean())))
    else:
        out["n"] = len(arrays)
    return out


def sign_flip_p(d: np.ndarray, exact_up_to: int = 16) -> float:
    """Two-sided p-value of mean(d) = 0 under random sign flips of the paired differences: every
    flip for n <= exact_up_to; beyond that the flip statistic's normal limit, z = |sum d| /
    sqrt(sum d^2), which has no Monte Carlo floor (a false-discovery correction over hundreds of
    tests needs p-values below 1/n_resamples)."""
    n = len(d)
    if n <= exact_up_to:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        return float((np.abs((signs * d).sum(1)) >= abs(d.sum()) - 1e-9).mean())
    ss = float((d**2).sum())
    if ss == 0:
        return 1.0
    return float(math.erfc(abs(float(d.sum())) / math.sqrt(2 * ss)))


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    def ranks(v):
        v = np.asarray(v, float)
        order = v.argsort()
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for val in np.unique(v):  # average ranks for ties
            r[v == val] = r[v == val].mean()
        return r

    if len(x) < 3:
        return None
    return pearson(ranks(x), ranks(y))
