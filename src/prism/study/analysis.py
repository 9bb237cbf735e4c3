"""Statistics of the study: every effect is a paired difference over the same items.

Scores are on 0-100 (MT-Bench rating x10, MMLU accuracy, refusal rate), so one colour scale
serves every benchmark. An effect is "significant" when its 95% paired-bootstrap CI excludes zero
and the exact sign-flip test agrees (p < 0.05); with this many tests some will pass by chance, so
`mark_significance` also applies Benjamini-Hochberg over all of them.
"""

from __future__ import annotations

from typing import Any, Sequence

from prism.bench.data import MMLU_SUPER, MT_BENCH_CATEGORIES, SAFETY_SETS
from prism.bench.stats import mean_ci, paired_diff_ci

BENCH_ORDER = {"mtbench": MT_BENCH_CATEGORIES, "mmlu": MMLU_SUPER, "safety": SAFETY_SETS}
BENCH_NAMES = {"mtbench": "MT-Bench", "mmlu": "MMLU", "safety": "Safety refusal"}


def sub_order(subs: set[str]) -> list[str]:
    """Sub-scores ('bench/category') in the paper's order, unknown ones last."""
    known = [f"{b}/{c}" for b, cats in BENCH_ORDER.items() for c in cats]
    return [s for s in known if s in subs] + sorted(subs - set(known))


class Scores:
    """condition label -> item -> score, with each item's benchmark and category."""

    def __init__(self, rows: Sequence[dict]):
        self.by_cond: dict[str, dict[str, float | None]] = {}
        self.meta: dict[str, tuple[str, str]] = {}
        self.used: dict[tuple[str, str], str | None] = {}
        for r in rows:
            self.by_cond.setdefault(r["condition"], {})[r["item"]] = r["score"]
            self.meta[r["item"]] = (r["benchmark"], r["category"])
            self.used[(r["condition"], r["item"])] = r["persona_used"]

    def items(self, bench: str | None = None, sub: str | None = None) -> list[str]:
        return [i for i, (b, c) in self.meta.items()
                if (bench is None or b == bench) and (sub is None or f"{b}/{c}" == sub)]

    def subs(self) -> list[str]:
        return sub_order({f"{b}/{c}" for b, c in self.meta.values()})

    def benches(self) -> list[str]:
        return [b for b in BENCH_ORDER if any(m[0] == b for m in self.meta.values())]

    def has(self, label: str) -> bool:
        return label in self.by_cond

    def diff(self, a: str, b: str, items: list[str], n_boot: int, seed: int) -> dict:
        """Paired mean of score(a) - score(b) over items scored under both conditions."""
        sa, sb = self.by_cond.get(a, {}), self.by_cond.get(b, {})
        common = [i for i in items if sa.get(i) is not None and sb.get(i) is not None]
        return paired_diff_ci([sa[i] for i in common], [sb[i] for i in common], n_boot, seed)

    def mean(self, a: str, items: list[str], n_boot: int, seed: int) -> dict:
        sa = self.by_cond.get(a, {})
        return mean_ci([sa[i] for i in items if sa.get(i) is not None], n_boot, seed)


def label(persona: str, length: str | None = None, placement: str | None = None) -> str:
    return "none" if persona == "none" else f"{persona}/{length}/{placement}"


def analyse(result: dict, cfg) -> dict[str, Any]:
    """All the effects the report shows, for one model's scored grid."""
    s = Scores(result["rows"])
    nb, seed = cfg.n_boot, cfg.seed
    L0, P0 = cfg.reference_length, cfg.reference_placement
    matched0, random0 = label("matched", L0, P0), label("random", L0, P0)
    subs, benches = s.subs(), s.benches()
    out: dict[str, Any] = {"model": result["model"], "reference": {"length": L0, "placement": P0},
                           "subs": subs, "benchmarks": benches, "n_items": {b: len(s.items(b)) for b in benches}}
    # Absolute scores of the baseline and the matched expert, for the tables.
    out["absolute"] = {cond: {sub: s.mean(cond, s.items(sub=sub), nb, seed) for sub in subs}
                       for cond in ("none", matched0, random0) if s.has(cond)}
    # Figure 2a: every persona on every task at the reference cell, vs no persona.
    out["heatmap"] = {p: {sub: s.diff(label(p, L0, P0), "none", s.items(sub=sub), nb, seed) for sub in subs}
                      for p in result["personas"] if s.has(label(p, L0, P0))}
    out["matched_persona"] = {sub: result["persona_map"].get(sub.split("/", 1)[1]) for sub in subs}
    # Figure 2b/c: the matched expert against no persona and against a random other persona.
    out["expert"] = {sub: {"vs_none": s.diff(matched0, "none", s.items(sub=sub), nb, seed),
                           "vs_random": s.diff(matched0, random0, s.items(sub=sub), nb, seed) if s.has(random0) else None,
                           "random_vs_none": s.diff(random0, "none", s.items(sub=sub), nb, seed) if s.has(random0) else None}
                     for sub in subs}
    out["expert_by_benchmark"] = {b: {"vs_none": s.diff(matched0, "none", s.items(b), nb, seed),
                                      "vs_random": s.diff(matched0, random0, s.items(b), nb, seed) if s.has(random0) else None,
                                      "random_vs_none": s.diff(random0, "none", s.items(b), nb, seed) if s.has(random0) else None}
                                  for b in benches}
    # Figure 1a-c: the matched expert at each length and placement, vs no persona, per benchmark.
    cells = [(L, P) for L in cfg.lengths for P in cfg.placements if s.has(label("matched", L, P))]
    out["length_placement"] = {b: {f"{L}/{P}": s.diff(label("matched", L, P), "none", s.items(b), nb, seed)
                                   for L, P in cells} for b in benches}
    # Direct contrasts: is the longest persona different from the shortest, the system turn from the user turn?
    contrasts: dict[str, dict] = {}
    lens = [L for L in ("long", "short", "minimal") if L in cfg.lengths]
    for b in benches:
        for P in cfg.placements:
            for i, La in enumerate(lens):
                for Lb in lens[i + 1:]:
                    a, c = label("matched", La, P), label("matched", Lb, P)
                    if s.has(a) and s.has(c):
                        contrasts[f"{BENCH_NAMES[b]}: {La} vs {Lb} persona ({P} turn)"] = s.diff(a, c, s.items(b), nb, seed)
        if "system" in cfg.placements and "user" in cfg.placements:
            for L in cfg.lengths:
                a, c = label("matched", L, "system"), label("matched", L, "user")
                if s.has(a) and s.has(c):
                    contrasts[f"{BENCH_NAMES[b]}: system vs user turn ({L} persona)"] = s.diff(a, c, s.items(b), nb, seed)
    out["contrasts"] = contrasts
    out["judge_sanity"] = result.get("judge_sanity")
    out["supports_system_role"] = result.get("supports_system_role")
    return out


def model_summary(analyses: list[dict]) -> dict[str, dict[str, dict]]:
    """Figure 1d: model -> benchmark -> matched expert vs no persona at the reference cell."""
    return {a["model"]: {b: v["vs_none"] for b, v in a["expert_by_benchmark"].items()} for a in analyses}


def significant(ci: dict | None, alpha: float = 0.05) -> bool:
    """The 95% bootstrap CI excludes 0 and the sign-flip test agrees (p < alpha); the second
    condition keeps a handful of same-signed items from counting as an effect."""
    return bool(ci and ci.get("diff") is not None and (ci["lo"] > 0 or ci["hi"] < 0)
                and ci.get("p") is not None and ci["p"] < alpha)


def benjamini_hochberg(pvalues: Sequence[float], q: float = 0.05) -> list[bool]:
    """Which hypotheses are rejected at false-discovery rate q (step-up procedure)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    cutoff = -1
    for rank, i in enumerate(order, start=1):
        if pvalues[i] <= q * rank / m:
            cutoff = rank
    keep = [False] * m
    for rank, i in enumerate(order, start=1):
        keep[i] = rank <= cutoff
    return keep


def all_tests(a: dict) -> list[dict]:
    """Every effect of one model's analysis as a flat list (family, what, ci)."""
    model = a["model"]
    ref = f"{a['reference']['length']}, {a['reference']['placement']}"
    tests = []

    def add(family, what, ci):
        if ci and ci.get("diff") is not None:
            tests.append({"model": model, "family": family, "what": what, **ci})

    for b, v in a["expert_by_benchmark"].items():
        add("expert vs none", f"{BENCH_NAMES[b]}: matched expert vs no persona ({ref})", v["vs_none"])
        add("expert vs random", f"{BENCH_NAMES[b]}: matched expert vs a random other persona ({ref})", v["vs_random"])
        add("random vs none", f"{BENCH_NAMES[b]}: random other persona vs no persona ({ref})", v["random_vs_none"])
    for sub, v in a["expert"].items():
        add("expert vs none (category)", f"{sub}: matched expert ({a['matched_persona'].get(sub)}) vs no persona",
            v["vs_none"])
        add("expert vs random (category)", f"{sub}: matched expert vs a random other persona", v["vs_random"])
    for b, cells in a["length_placement"].items():
        for cell, ci in cells.items():
            L, P = cell.split("/")
            add("length/placement", f"{BENCH_NAMES[b]}: matched expert, {L} persona in the {P} turn, vs no persona", ci)
    for what, ci in a["contrasts"].items():
        add("contrast", what, ci)
    for p, row in a["heatmap"].items():
        for sub, ci in row.items():
            add("persona x task", f"{sub}: persona {p} vs no persona", ci)
    return tests


def mark_significance(tests: list[dict], q: float = 0.05) -> list[dict]:
    """Flag each effect: CI excludes 0 (`significant`), and also survives Benjamini-Hochberg over
    all the tests given (`significant_fdr`): pass every model's tests at once."""
    keep = benjamini_hochberg([t["p"] for t in tests], q) if tests else []
    for t, k in zip(tests, keep):
        t["significant"] = significant(t)
        t["significant_fdr"] = bool(k and t["significant"])
    return tests
