"""Eval and study score with one engine: on the same items, eval's `base` and `persona` systems and
the study's `none` and `matched` conditions give the same per-item scores on every benchmark."""

import json

import pytest

from prism.config import load_study_config
from prism.eval import run_eval
from prism.study import run_study

pytestmark = pytest.mark.slow

LIMITS = {"mtbench": 2, "mmlu": 6, "harmbench": 2, "jailbreak": 1, "pku": 1}


def test_eval_and_study_agree_item_by_item(tmp_path, embedded, benchmarks_dir):
    data = str(benchmarks_dir)
    ev = run_eval(tmp_path / "eval", chat_model=embedded, model="embedded", preset="micro", quiet=True,
                  overrides={"data": data, "limits": {**LIMITS, "xstest": 0}, "benchmarks": ["mtbench", "mmlu",
                                                                                           "safety"]})
    raw = json.loads((tmp_path / "eval" / "raw.json").read_text())
    # One named persona: the comparison needs only the study's `none` and `matched` conditions.
    cfg = load_study_config("micro", overrides={
        "data": data, "limits": LIMITS, "personas": ["math"], "lengths": ["long"],
        "placements": ["system"], "random_control": False, "mt_turns": 2, "mt_max_new_tokens": 8,
        "safety_max_new_tokens": 8, "sanity_pairs": 2})
    run_study(tmp_path / "study", models=[embedded], cfg=cfg, quiet=True)
    rows = json.loads((tmp_path / "study" / "models" / embedded.name / "scores.json").read_text())["rows"]
    study = {(r["condition"], r["item"]): r["score"] for r in rows}
    scale = {"mtbench": 10.0, "mmlu": 100.0, "safety": 100.0}
    compared = 0
    for system, condition in (("base", "none"), ("persona", "matched/long/system")):
        for bench in ("mtbench", "mmlu", "safety"):
            r = raw[bench]["systems"][system]
            for item, score in zip(r["item_ids"], r["scores"]):
                assert study[(condition, item)] == pytest.approx(score * scale[bench], abs=1e-6), (system, item)
                compared += 1
    assert compared == 2 * (2 + 6 + 4)
    # The persona changed something, or the comparison above could not tell the systems apart.
    assert ev["systems"]["persona"]["subscores"] != ev["systems"]["base"]["subscores"]
