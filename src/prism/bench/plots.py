"""Figure helpers shared by the eval and study reports: matplotlib without a display, CI error
bars, saving and closing."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def error_bars(cis, positions, key: str = "diff") -> tuple[list, list, list[list]]:
    """(positions, values, [below, above]) of the CIs that have a value; `key`: "diff" or "mean"."""
    xs, ys, lo, hi = [], [], [], []
    for x, ci in zip(positions, cis):
        if ci and ci.get(key) is not None:
            xs.append(x)
            ys.append(ci[key])
            lo.append(ci[key] - ci["lo"])
            hi.append(ci["hi"] - ci[key])
    return xs, ys, [lo, hi]


def save(fig, path: Path, dpi: int = 130, rect=None) -> Path:
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
