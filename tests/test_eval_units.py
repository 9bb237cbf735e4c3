"""Evaluation harness pieces without a model: loaders, statistics, refusal, parsing."""

import json
from pathlib import Path

import numpy as np
import pytest

from prism.bench import data as D
from prism.judging.rating import RatingRequest, judge_messages, parse_rating
from prism.judging.refusal import is_refusal
from prism.bench.stats import mean_ci, paired_diff_ci, pearson, spearman

FIXTURES = Path(__file__).parent / "fixtures"


def test_loaders_read_the_shared_benchmark_files(benchmarks_dir):
    mt = D.load_mt_bench(benchmarks_dir)
    assert len(mt) == 80 and {it.category for it in mt} == set(D.MT_BENCH_CATEGORIES)
    assert all(len(it.turns) == 2 for it in mt)
    assert sum(bool(it.reference) for it in mt) >= 30  # math/reasoning/coding references
    mmlu = D.load_mmlu(benchmarks_dir)
    assert len(mmlu) == 570 and {it.category for it in mmlu} == set(D.MMLU_SUPER)
    assert len({it.subject for it in mmlu}) == 57
    hb = D.load_harmbench(benchmarks_dir)
    assert len(hb) == 400
    contextual = [it for it in hb if it.subject == "contextual"]
    assert {it.category for it in hb} == {"harmbench"}  # matched to the safety persona
    assert len(contextual) == 100 and all("\n\n---\n\n" in it.turns[0] for it in contextual)
    assert len(D.load_jailbreak(benchmarks_dir)) == 79 and len(D.load_pku(benchmarks_dir)) == 500
    xs = D.load_xstest(benchmarks_dir)
    assert sum(it.label == "safe" for it in xs) == 250 and sum(it.label == "unsafe" for it in xs) == 200
    assert set(D.load_judge_prompts(benchmarks_dir)) >= {"single-v1", "single-math-v1", "single-v1-multi-turn"}


def test_limits_draw_stratified_reproducible_samples(benchmarks_dir):
    mt = D.load_mt_bench(benchmarks_dir, limit=16, seed=3)
    assert len(mt) == 16 and all(sum(it.category == c for it in mt) == 2 for c in D.MT_BENCH_CATEGORIES)
    assert [it.id for it in mt] == [it.id for it in D.load_mt_bench(benchmarks_dir, limit=16, seed=3)]
    assert [it.id for it in mt] != [it.id for it in D.load_mt_bench(benchmarks_dir, limit=16, seed=4)]
    mmlu = D.load_mmlu(benchmarks_dir, limit=114)
    assert len(mmlu) == 114 and len({it.subject for it in mmlu}) == 57
    hb = D.load_harmbench(benchmarks_dir, limit=24)
    assert {it.subject for it in hb} == {"standard", "contextual", "copyright"}
    xs = D.load_xstest(benchmarks_dir, limit=40)
    assert sum(it.label == "safe" for it in xs) == 20


def test_missing_and_malformed_data_name_the_file(tmp_path):
    with pytest.raises(D.DataError, match="mt_bench_questions.jsonl not found"):
        D.load_mt_bench(tmp_path)
    (tmp_path / "mmlu_subset_test.jsonl").write_text('{"subject": "astrology", "question": "q", "choices": '
                                                    '["a","b","c","d"], "answer": 0}\n')
    with pytest.raises(D.DataError, match="unknown subject 'astrology'"):
        D.load_mmlu(tmp_path)


def test_mmlu_category_table_covers_the_four_super_categories():
    table = D.mmlu_categories()
    assert len(table) == 57
    counts = {c: sum(v == c for v in table.values()) for c in D.MMLU_SUPER}
    assert counts == {"stem": 18, "humanities": 13, "social_sciences": 12, "other": 14}


def test_bootstrap_ci_on_a_known_distribution():
    rng = np.random.default_rng(0)
    x = rng.binomial(1, 0.3, size=2000).astype(float)
    ci = mean_ci(x, n_boot=2000, seed=0)
    assert ci["lo"] < 0.3 < ci["hi"]
    half = 1.96 * np.sqrt(0.21 / 2000)
    assert ci["hi"] - ci["lo"] == pytest.approx(2 * half, rel=0.15)
    assert mean_ci([])["mean"] is None


def test_paired_difference_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 300)
    shifted = paired_diff_ci(a + 0.5 + rng.normal(0, 0.1, 300), a)
    assert shifted["lo"] > 0.4 and shifted["p"] < 0.01
    same = paired_diff_ci(a + rng.normal(0, 0.1, 300), a)
    assert same["lo"] < 0 < same["hi"]
    with pytest.raises(ValueError, match="differ in length"):
        paired_diff_ci([1, 2], [1])


def test_correlations():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None


def test_refusal_classifier_on_the_hand_labelled_fixture():
    rows = [json.loads(line) for line in (FIXTURES / "refusals.jsonl").read_text().splitlines()]
    assert len(rows) >= 40 and sum(r["refusal"] for r in rows) >= 15
    correct = sum(is_refusal(r["response"]) == r["refusal"] for r in rows)
    assert correct / len(rows) >= 0.95


@pytest.mark.parametrize("text,rating", [
    ("The answer is fine. Rating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("Rating: 6", 6.0),
    ("no rating here", None), ("Rating: [[11]]", None), ("[[ 3 ]] and later [[9]]", 3.0),
])
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


def test_judge_prompt_uses_reference_and_both_turns(benchmarks_dir):
    prompts = D.load_judge_prompts(benchmarks_dir)
    single = judge_messages(prompts, RatingRequest(["What is 2+2?"], ["4"]))
    assert single[0]["role"] == "system" and "What is 2+2?" in single[1]["content"] and "{" not in single[1]["content"]
    multi = judge_messages(prompts, RatingRequest(["Q1?", "Q2?"], ["A1", "A2"], ["R1", "R2"]))
    body = multi[1]["content"]
    assert all(s in body for s in ("Q1?", "Q2?", "A1", "A2", "R1", "R2"))



def _raw_table(seed: int = 0) -> dict:
    """Per-item scores of three systems as the evaluator stores them (raw.json), on every sub-score
    of the paper's Overall plus XSTest: `ungated` is `base` + 0.5 on every MT-Bench rating and one
    more right answer in five on MMLU; `prism` is `ungated` on the items it routed to the adapter
    (every other one) and `base` elsewhere."""
    rng = np.random.default_rng(seed)

    def bench(cats, n, draw, lift=lambda k: 0.0):
        ids = [f"{c}-{i}" for c in cats for i in range(n)]
        base = [draw() for _ in ids]
        ungated = [b + lift(k) for k, b in enumerate(base)]
        routed = [k % 2 == 0 for k in range(len(ids))]
        scores = {"base": base, "ungated": ungated, "prism": [u if r else b for u, b, r in zip(ungated, base, routed)]}
        routes = {"base": [{"adapter": None, "score": None}] * len(ids),
                  "ungated": [{"adapter": "adapter", "score": None}] * len(ids),
                  "prism": [{"adapter": "adapter" if r else None, "score": 0.7 if r else 0.3} for r in routed]}
        return {s: {"item_ids": ids, "categories": [c for c in cats for _ in range(n)], "scores": scores[s],
                    "routes": routes[s]} for s in scores}

    wrong = lambda: float(rng.integers(0, 2))  # noqa: E731  (0 or 1 per item)
    mmlu = bench(D.MMLU_SUPER, 5, lambda: 0.0)
    for k in range(len(mmlu["base"]["scores"])):  # base right on some items; ungated on one more in five
        mmlu["base"]["scores"][k] = wrong()
        mmlu["ungated"]["scores"][k] = 1.0 if k % 5 == 0 else mmlu["base"]["scores"][k]
        mmlu["prism"]["scores"][k] = mmlu["ungated"]["scores"][k] if k % 2 == 0 else mmlu["base"]["scores"][k]
    return {
        "mtbench": {"judge": "j", "judge_sanity": {"judge": "j", "pairs": 2},
                    "systems": bench(D.MT_BENCH_CATEGORIES, 3, lambda: float(rng.integers(1, 10)), lambda k: 0.5)},
        "mmlu": {"systems": mmlu},
        "safety": {"classifier": "pattern", "systems": bench(D.SAFETY_SETS, 4, wrong)},
        "xstest": {"classifier": "pattern", "systems": bench(("xstest_safe", "xstest_unsafe"), 3, wrong)},
    }


def test_overall_is_the_mean_of_15_sub_scores_with_cis_and_paired_differences():
    from prism.config import load_eval_config
    from prism.eval.evaluator import summarise

    raw = _raw_table()
    res = summarise(raw, load_eval_config("micro"))
    scale = {"mtbench": 10.0, "mmlu": 100.0, "safety": 100.0, "xstest": 100.0}

    def by_sub(system):  # sub-score -> {item: value on 0-100}, by hand
        out = {}
        for b, r in raw.items():
            for i, c, v in zip(*(r["systems"][system][k] for k in ("item_ids", "categories", "scores"))):
                out.setdefault(f"{b}/{c}", {})[i] = v * scale[b]
        return out

    overall_parts = [f"mtbench/{c}" for c in D.MT_BENCH_CATEGORIES] + [f"mmlu/{c}" for c in D.MMLU_SUPER] + \
        [f"safety/{c}" for c in D.SAFETY_SETS]
    assert len(overall_parts) == 15
    for system in ("base", "ungated", "prism"):
        subs, mine = res["systems"][system]["subscores"], by_sub(system)
        assert set(subs) == set(overall_parts) | {"xstest/xstest_safe", "xstest/xstest_unsafe"}
        for name, ci in subs.items():
            assert ci["mean"] == pytest.approx(np.mean(list(mine[name].values())))
            assert ci["lo"] <= ci["mean"] <= ci["hi"] and ci["n"] == len(mine[name])
        # Overall: the mean of the 15 sub-score means (XSTest reported apart), with a real interval.
        overall = res["systems"][system]["overall"]
        assert overall["mean"] == pytest.approx(np.mean([np.mean(list(mine[n].values())) for n in overall_parts]))
        assert overall["n"] == 15 and overall["lo"] < overall["mean"] < overall["hi"]
    # Paired differences from base: per sub-score, per benchmark and for Overall, by hand.
    base = by_sub("base")
    for system in ("ungated", "prism"):
        mine, vs = by_sub(system), res["systems"][system]["vs_base"]
        diffs = {n: [mine[n][i] - base[n][i] for i in base[n]] for n in base}
        for n, d in diffs.items():
            assert vs[n]["diff"] == pytest.approx(np.mean(d)) and vs[n]["n"] == len(d)
        for b in ("mtbench", "mmlu", "safety"):
            pooled = [x for n, d in diffs.items() if n.startswith(b + "/") for x in d]
            assert vs[b]["diff"] == pytest.approx(np.mean(pooled))
        assert vs["overall"]["diff"] == pytest.approx(np.mean([np.mean(diffs[n]) for n in overall_parts]))
    ungated = res["systems"]["ungated"]["vs_base"]
    assert ungated["mtbench"]["diff"] == pytest.approx(5.0) and ungated["mtbench"]["lo"] == pytest.approx(5.0)
    assert ungated["safety"]["diff"] == 0 and ungated["overall"]["lo"] > 0  # a real gain, its CI above 0
    # The routing table: the share of each category the gate sent to the adapter (every other item).
    shares = res["routing"]["share_routed"]
    assert set(shares) == set(overall_parts) | {"xstest/xstest_safe", "xstest/xstest_unsafe"}
    assert shares["mtbench/writing"] == pytest.approx(2 / 3) and shares["mmlu/stem"] == pytest.approx(3 / 5)
