"""`prism study` end to end on the real embedded model: a tiny grid, then a second run through the
CLI that must reuse every cached row and reproduce the same numbers."""

import json
import re

import pytest
import yaml

from prism.cli import main
from prism.bench.data import DEFAULT_PERSONA_MAP
from prism.study import load_study_config, run_study

pytestmark = pytest.mark.slow

SETTINGS = {"personas": ["math", "writing"], "lengths": ["long", "minimal"], "placements": ["system", "user"],
            "limits": {"mtbench": 2, "mmlu": 2, "harmbench": 1, "jailbreak": 1, "pku": 0},
            "mt_max_new_tokens": 8, "safety_max_new_tokens": 8, "sanity_pairs": 2, "n_boot": 200}


def test_study_runs_reports_and_reuses_its_cache(tmp_path, embedded, benchmarks_dir, capsys):
    out = tmp_path / "study"
    cfg = load_study_config("micro", overrides={**SETTINGS, "data": str(benchmarks_dir)})
    first = run_study(out, models=[embedded], cfg=cfg, quiet=True)
    scored = json.loads((out / "models" / "SmolLM2-135M-Instruct-Q4_1" / "scores.json").read_text())
    rows = scored["rows"]
    n_items = 2 + 2 + 1 + 1
    assert len(scored["conditions"]) == 1 + 2 + 4 + 4
    assert len(rows) == len(scored["conditions"]) * n_items
    assert all(r["score"] is not None for r in rows)
    for r in rows:
        matched = DEFAULT_PERSONA_MAP[r["category"]]
        if r["persona"] == "random":
            assert r["persona_used"] in ("math", "writing") and r["persona_used"] != matched
        elif r["persona"] == "matched":
            assert r["persona_used"] == matched
        elif r["persona"] == "none":
            assert r["persona_used"] is None
    # Identical prompts are computed once: the random control at the reference cell is always one of
    # the named personas' cells, so fewer generations were made than generation cells exist.
    gen_cells = sum(r["benchmark"] in ("mtbench", "safety") for r in rows)
    assert 0 < first["models"][0]["computed"]["generations"] < gen_cells

    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # heatmap, expert, length/placement: inlined
    assert not re.search(r"""(src|href)=["']?(https?:|file:|/)""", html)  # self-contained
    assert "When do personas help or hurt?" in html
    findings = (out / "findings.md").read_text()
    assert "## Summary" in findings and "matched expert vs no persona" in findings
    for path in first["figures"]["SmolLM2-135M-Instruct-Q4_1"].values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # Second run, through the CLI, with the same settings from a YAML file: nothing is recomputed.
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(SETTINGS))
    code = main(["study", "--preset", "micro", "--config", str(config), "--out", str(out), "--data",
                 str(benchmarks_dir), "--quiet"])
    assert code == 0
    assert "## Summary" in capsys.readouterr().out
    second = json.loads((out / "results.json").read_text())
    assert second["models"][0]["computed"] == {"generations": 0, "mmlu": 0, "judgments": 0}
    assert second["analyses"] == json.loads(json.dumps(first["analyses"]))


def test_study_cli_rejects_bad_settings(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path / "s"), "--lengths", "long,tiny"]) == 2
    assert "lengths" in capsys.readouterr().err
    assert main(["study", "--out", str(tmp_path / "s"), "--only", "math,astrologer", "--preset", "micro",
                 "--benchmarks", "mmlu", "--limit", "mmlu=1"]) == 2
    assert "astrologer" in capsys.readouterr().err
