"""The study's grid, its random control and its statistics, without a model."""

import itertools

import numpy as np
import pytest

from prism.config import ConfigError
from prism.bench.stats import paired_diff_ci, sign_flip_p
from prism.bench.data import DEFAULT_PERSONA_MAP
from prism.contexts import ContextRegistry
from prism.study.analysis import all_tests, analyse, benjamini_hochberg, mark_significance, significant
from prism.config import load_study_config
from prism.study.grid import NONE, Condition, expand_grid, persona_for, random_persona

NAMES = ContextRegistry.builtin().names()


def test_quick_grid_has_every_persona_at_the_reference_and_controls_everywhere():
    cfg = load_study_config("quick")
    grid = expand_grid(cfg, NAMES)
    assert len(grid) == len(set(grid))
    assert grid[0] == NONE
    assert len(NAMES) == 12
    # none + 12 personas at (long, system) + matched and random at 3 lengths x 2 placements
    assert len(grid) == 1 + 12 + 2 * 6
    named = [c for c in grid if c.persona in NAMES]
    assert {(c.length, c.placement) for c in named} == {("long", "system")}
    for control in ("matched", "random"):
        cells = {(c.length, c.placement) for c in grid if c.persona == control}
        assert cells == set(itertools.product(["long", "short", "minimal"], ["system", "user"]))


def test_full_grid_crosses_every_persona_with_every_length_and_placement():
    cfg = load_study_config("full")
    grid = expand_grid(cfg, NAMES)
    assert len(grid) == 1 + 12 * 6 + 2 * 6
    assert Condition("coding", "minimal", "user") in grid
    no_random = load_study_config("quick", overrides={"random_control": False, "lengths": ["short"],
                                                      "reference_length": "short", "placements": ["user"],
                                                      "reference_placement": "user"})
    assert expand_grid(no_random, ["math", "writing"]) == [
        NONE, Condition("math", "short", "user"), Condition("writing", "short", "user"),
        Condition("matched", "short", "user")]


def test_grid_and_settings_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        expand_grid(load_study_config("quick"), ["math", "random"])
    with pytest.raises(ValueError, match="at least one persona"):
        expand_grid(load_study_config("quick"), [])
    with pytest.raises(ConfigError, match="reference_length 'long' is not in lengths"):
        load_study_config("quick", overrides={"lengths": ["short"]})
    with pytest.raises(ConfigError, match="unknown study preset"):
        load_study_config("huge")
    bad = tmp_path / "study.yaml"
    bad.write_text("lenghts: [long]\n")
    with pytest.raises(ConfigError, match="lenghts"):
        load_study_config("quick", bad)
    bad.write_text("limits: {mmlu: 10, gsm8k: 5}\n")
    with pytest.raises(ConfigError, match="gsm8k"):
        load_study_config("quick", bad)


def test_random_control_is_never_the_matched_persona_and_is_fixed_per_item():
    drawn = {}
    for category, matched in DEFAULT_PERSONA_MAP.items():
        for k in range(60):
            item = f"{category}-{k}"
            for seed in (0, 1):
                p = random_persona(item, matched, NAMES, seed)
                assert p != matched and p in NAMES
                drawn.setdefault(category, set()).add(p)
            # the same item gets the same draw at every length and placement
            picks = {persona_for(Condition("random", L, P), item, category, DEFAULT_PERSONA_MAP, NAMES, 0)
                     for L in ("long", "minimal") for P in ("system", "user")}
            assert len(picks) == 1
    # and it really is spread over the other personas, not one fixed stand-in
    assert all(len(v) >= 8 for v in drawn.values())
    with pytest.raises(ValueError, match="no persona other than"):
        random_persona("x", "math", ["math"], 0)


def test_persona_for_each_kind_of_condition():
    m = DEFAULT_PERSONA_MAP
    assert persona_for(NONE, "i", "stem", m, NAMES, 0) is None
    assert persona_for(Condition("matched", "long", "system"), "i", "harmbench", m, NAMES, 0) == "safety_monitor"
    assert persona_for(Condition("matched", "long", "system"), "i", "social_sciences", m, NAMES, 0) == "humanities"
    assert persona_for(Condition("critic", "short", "user"), "i", "math", m, NAMES, 0) == "critic"
    with pytest.raises(ValueError, match="no matched persona"):
        persona_for(Condition("matched", "long", "system"), "i", "astrology", m, NAMES, 0)


def test_sign_flip_p_matches_hand_counts():
    # two items that agree in sign: 2 of the 4 sign patterns are as extreme -> p = 0.5
    assert sign_flip_p(np.array([1.0, 1.0])) == 0.5
    # six positive differences: only all-plus and all-minus are as extreme -> 2/64
    assert sign_flip_p(np.array([1.0, 2, 3, 4, 5, 6])) == pytest.approx(2 / 64)
    assert sign_flip_p(np.zeros(5)) == 1.0
    # large n uses the normal limit: close to the exact count, a clear effect tiny, a null one not
    d = np.array([100.0] * 12 + [0.0] * 28)  # 12 of 40 items move the same way: exact p = 2 / 2**12
    assert sign_flip_p(d) == pytest.approx(2 / 2**12, rel=0.2)
    assert sign_flip_p(np.array([1.0, -1.0] * 10)) == 1.0
    rng = np.random.default_rng(0)
    assert sign_flip_p(rng.normal(1.0, 1.0, 200)) < 0.01
    assert sign_flip_p(rng.normal(0.0, 1.0, 200)) > 0.01


def test_paired_difference_and_significance():
    d = paired_diff_ci([1, 1], [0, 0], n_boot=500)
    assert d["diff"] == 1 and d["lo"] == 1 and d["hi"] == 1  # the bootstrap alone would call this an effect
    assert not significant(d)  # the sign-flip test does not (p = 0.5)
    big = paired_diff_ci([10.0] * 20, [0.0] * 20, n_boot=500)
    assert significant(big) and big["p"] < 1e-4
    null = paired_diff_ci([1, 0, 1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1, 0, 1], n_boot=500)
    assert not significant(null) and null["diff"] == 0


def test_benjamini_hochberg_step_up():
    # m=5, q=0.05: thresholds 0.01, 0.02, 0.03, 0.04, 0.05. The 3rd smallest (0.03) passes, so the
    # two below it pass too even though 0.011 > 0.01.
    assert benjamini_hochberg([0.011, 0.02, 0.03, 0.2, 0.9]) == [True, True, True, False, False]
    assert benjamini_hochberg([0.02, 0.03, 0.04, 0.2, 0.9]) == [False, False, False, False, False]
    assert benjamini_hochberg([0.0, 0.0]) == [True, True]


def _synthetic_rows(effect: float = 10.0, n: int = 20, flip: float = 0.0, seed: int = 0) -> dict:
    """Scores where persona `math` adds `effect` points on MMLU stem and nothing anywhere else.
    `flip`: each (condition, item) score other than the baseline's is flipped (0 <-> 100) with this
    probability, independently: noise with no effect, so the paired differences are not all 0."""
    cfg = load_study_config("quick", overrides={"personas": ["math", "writing"], "lengths": ["long"],
                                                "placements": ["system"]})
    rng = np.random.default_rng(seed)
    items = [(f"s{i}", "mmlu", "stem") for i in range(n)] + [(f"h{i}", "mmlu", "humanities") for i in range(n)]
    base = {i: float(rng.integers(0, 2)) * 100 for i, _, _ in items}
    pmap = {**DEFAULT_PERSONA_MAP, "stem": "math", "humanities": "writing"}
    rows = []
    for cond in expand_grid(cfg, ["math", "writing"]):
        for iid, bench, cat in items:
            used = persona_for(cond, iid, cat, pmap, ["math", "writing"], 0)
            score = base[iid]
            if used is not None and rng.random() < flip:
                score = 100.0 - score
            score += effect if used == "math" and cat == "stem" else 0.0
            rows.append({"condition": cond.label, "persona": cond.persona, "length": cond.length,
                         "placement": cond.placement, "persona_used": used, "item": iid, "benchmark": bench,
                         "category": cat, "score": score, "tokens": None})
    return {"model": "synthetic", "rows": rows, "personas": ["math", "writing"], "persona_map": pmap}, cfg


def test_analysis_finds_a_planted_effect_and_nothing_else():
    result, cfg = _synthetic_rows()
    a = analyse(result, cfg)
    assert a["subs"] == ["mmlu/stem", "mmlu/humanities"]
    cell = a["heatmap"]["math"]["mmlu/stem"]
    assert cell["diff"] == pytest.approx(10.0) and significant(cell)
    assert a["heatmap"]["math"]["mmlu/humanities"]["diff"] == 0
    assert a["heatmap"]["writing"]["mmlu/stem"]["diff"] == 0
    # the matched expert for stem is math: +10 vs none, and vs random (= writing here) too
    assert a["expert"]["mmlu/stem"]["vs_none"]["diff"] == pytest.approx(10.0)
    assert a["expert"]["mmlu/stem"]["vs_random"]["diff"] == pytest.approx(10.0)
    # for humanities the random control is math, which does nothing there
    assert a["expert"]["mmlu/humanities"]["vs_random"]["diff"] == 0
    # pooled over MMLU: half the items move by 10
    assert a["expert_by_benchmark"]["mmlu"]["vs_none"]["diff"] == pytest.approx(5.0)
    tests = {t["what"]: t for t in mark_significance(all_tests(a))}
    # The planted effect is found, and survives the false-discovery correction.
    planted = tests["mmlu/stem: persona math vs no persona"]
    assert planted["significant"] and planted["significant_fdr"]
    for what in ("mmlu/humanities: persona math vs no persona", "mmlu/stem: persona writing vs no persona"):
        assert not tests[what]["significant"] and not tests[what]["significant_fdr"]


def test_analysis_of_noise_without_an_effect_reports_nothing_after_the_correction():
    # Independent flips of 30% of the persona conditions' scores: the paired differences are real
    # noise (not all exactly 0, which any code would pass), centred on no effect. With this seed one
    # of the 12 effects has p < 0.05 by chance, which the false-discovery correction must remove.
    result, cfg = _synthetic_rows(effect=0.0, flip=0.3, seed=4)
    tests = mark_significance(all_tests(analyse(result, cfg)))
    assert len(tests) == 12  # 3 by benchmark, 4 by category, 1 cell, 4 heatmap cells
    assert sum(t["diff"] != 0 for t in tests) > len(tests) // 2  # the noise reaches the differences
    assert sum(t["significant"] for t in tests) == 1  # about 5% pass by chance...
    assert not any(t["significant_fdr"] for t in tests)  # ...but none survives Benjamini-Hochberg
    # The same noise with the planted effect on top: it is found again.
    result, cfg = _synthetic_rows(effect=70.0, flip=0.3, seed=4)
    tests = {t["what"]: t for t in mark_significance(all_tests(analyse(result, cfg)))}
    assert tests["mmlu/stem: persona math vs no persona"]["significant_fdr"]


def test_mark_significance_needs_the_ci_the_p_value_and_the_correction():
    def effect(lo, hi, p):
        return {"diff": (lo + hi) / 2, "lo": lo, "hi": hi, "p": p, "n": 10}

    tests = mark_significance([effect(1, 3, 0.001), effect(1, 3, 0.035), effect(1, 3, 0.3), effect(-1, 3, 0.001),
                               effect(-3, -1, 0.01)])
    # CI excludes 0 and p < 0.05: the 1st, 2nd and 5th. BH over 5 p-values (sorted 0.001, 0.001,
    # 0.01, 0.035, 0.3 against 0.01, 0.02, 0.03, 0.04, 0.05) rejects the four smallest; the 4th
    # has a CI that straddles 0, so it is not significant either way.
    assert [t["significant"] for t in tests] == [True, True, False, False, True]
    assert [t["significant_fdr"] for t in tests] == [True, True, False, False, True]
    three = mark_significance([effect(1, 3, 0.001), effect(1, 3, 0.04), effect(1, 3, 0.3)])
    # thresholds 0.0167, 0.033, 0.05: 0.04 passes the CI and p test but not the correction
    assert [t["significant"] for t in three] == [True, True, False]
    assert [t["significant_fdr"] for t in three] == [True, False, False]
    # ... and findings.md words each case differently
    from prism.study.report import sentence

    for t, name in zip(three, ("a", "b", "c")):
        t["what"] = f"effect {name}"
    assert [sentence(t) for t in three] == [
        "effect a: +2.0 points (95% CI +1.0 to +3.0, n=10); significant after the false-discovery correction.",
        "effect b: +2.0 points (95% CI +1.0 to +3.0, n=10); CI excludes 0, but not after the false-discovery "
        "correction.",
        "effect c: +2.0 points (95% CI +1.0 to +3.0, n=10); not significant."]


def test_report_with_two_models_has_the_model_summary(tmp_path):
    from prism.study import write_outputs

    analyses = []
    for name, effect in (("model-a", 10.0), ("model-b", 0.0)):
        result, cfg = _synthetic_rows(effect)
        result["model"] = name
        analyses.append(analyse(result, cfg))
    results = write_outputs(tmp_path, analyses, cfg, {"models": ["model-a", "model-b"]})
    assert results["summary"]["model-a"]["mmlu"]["diff"] == pytest.approx(5.0)
    assert results["summary"]["model-b"]["mmlu"]["diff"] == 0
    assert (tmp_path / "figures" / "models.png").read_bytes()[:4] == b"\x89PNG"
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 * 2 + 1
    assert "Models compared" in html
    findings = (tmp_path / "findings.md").read_text()
    assert "model-a" in findings and "model-b" in findings
    with pytest.raises(ValueError, match="same name"):
        write_outputs(tmp_path, [analyses[0], analyses[0]], cfg, {})


def test_length_and_placement_contrasts_and_their_findings_sentences(tmp_path):
    """The matched expert adds 20 points only when long and in the system turn: the contrasts name
    that with the right sign, and findings.md says it in words with its numbers."""
    from prism.study import write_outputs

    cfg = load_study_config("quick", overrides={"personas": ["math", "writing"], "lengths": ["long", "minimal"],
                                                "placements": ["system", "user"], "n_boot": 500})
    names = ["math", "writing"]
    pmap = {**DEFAULT_PERSONA_MAP, "stem": "math", "humanities": "writing"}
    rng = np.random.default_rng(1)
    items = [(f"s{i}", "stem") for i in range(20)] + [(f"h{i}", "humanities") for i in range(20)]
    base = {i: float(rng.integers(0, 2)) * 100 for i, _ in items}
    rows = []
    for cond in expand_grid(cfg, names):
        lift = 20.0 if (cond.persona, cond.length, cond.placement) == ("matched", "long", "system") else 0.0
        for iid, cat in items:
            rows.append({"condition": cond.label, "persona": cond.persona, "length": cond.length,
                         "placement": cond.placement, "persona_used": persona_for(cond, iid, cat, pmap, names, 0),
                         "item": iid, "benchmark": "mmlu", "category": cat, "score": base[iid] + lift,
                         "tokens": None})
    a = analyse({"model": "synthetic", "rows": rows, "personas": names, "persona_map": pmap}, cfg)
    c = a["contrasts"]
    assert set(c) == {"MMLU: long vs minimal persona (system turn)", "MMLU: long vs minimal persona (user turn)",
                      "MMLU: system vs user turn (long persona)", "MMLU: system vs user turn (minimal persona)"}
    assert c["MMLU: long vs minimal persona (system turn)"]["diff"] == pytest.approx(20.0)  # first minus second
    assert c["MMLU: system vs user turn (long persona)"]["diff"] == pytest.approx(20.0)
    assert c["MMLU: long vs minimal persona (user turn)"]["diff"] == 0
    assert c["MMLU: system vs user turn (minimal persona)"]["diff"] == 0
    cells = a["length_placement"]["mmlu"]
    assert cells["long/system"]["diff"] == pytest.approx(20.0)
    assert {k: v["diff"] for k, v in cells.items() if k != "long/system"} == {
        "long/user": 0, "minimal/system": 0, "minimal/user": 0}

    write_outputs(tmp_path, [a], cfg, {})
    findings = (tmp_path / "findings.md").read_text()
    section = findings.split("## Length and placement contrasts (matched expert against itself)")[1].split("## ")[0]
    assert "2 of 4 effects are significant" in section
    assert ("- MMLU: long vs minimal persona (system turn): +20.0 points (95% CI +20.0 to +20.0, n=40); "
            "significant after the false-discovery correction.") in section
    assert ("- MMLU: system vs user turn (long persona): +20.0 points (95% CI +20.0 to +20.0, n=40); "
            "significant after the false-discovery correction.") in section
    assert "- The largest of the other 2: MMLU: " in section and section.rstrip().endswith("not significant.")
    placement = findings.split("## Context length and placement (matched expert vs no persona)")[1].split("## ")[0]
    assert "1 of 4 effects are significant" in placement
    assert "- MMLU: matched expert, long persona in the system turn, vs no persona: +20.0 points" in placement
