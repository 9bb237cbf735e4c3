"""The evaluation harness on the real embedded model: MMLU letter scoring, a tiny eval, resume."""

import json

import pytest
import torch

from prism.eval import run_eval
from prism.bench.data import load_mmlu
from prism.bench.scoring import LETTERS, MMLU_PREFIX, Scorer, mmlu_conversation, mmlu_question
from prism.eval.systems import Systems

pytestmark = pytest.mark.slow
TINY = {"mtbench": 2, "mmlu": 8, "harmbench": 2, "jailbreak": 1, "pku": 2, "xstest": 4}


def test_mmlu_letter_scores_match_a_hand_computed_forward_pass(tmp_path, embedded, benchmarks_dir):
    item = load_mmlu(benchmarks_dir, limit=1)[0]
    systems = Systems(embedded)
    cell, = systems.cells("base", [item], [mmlu_conversation(item)])
    scorer = Scorer(embedded, tmp_path, "test")
    scorer.score_mmlu([cell])
    logprobs = next(iter(scorer.letters.rows.values()))["logprobs"]
    route = cell.route
    text = embedded.prompt([{"role": "user", "content": mmlu_question(item)}]) + MMLU_PREFIX
    ids = embedded.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        last = torch.log_softmax(embedded.model(input_ids=ids).logits[0, -1].float(), -1)
    for letter, lp in zip(LETTERS, logprobs):
        variants = [embedded.token_ids(" " + letter)[0], embedded.token_ids(letter)[0]]
        assert lp == pytest.approx(float(last[sorted(set(variants))].logsumexp(-1)), abs=1e-4)
    assert route == {"adapter": None, "score": None}
    # The persona system puts the matched expert in the prompt.
    assert systems.persona_name(item) in ("stem", "humanities", "helpful")


def test_tiny_eval_writes_results_and_a_rerun_reuses_every_cached_item(tmp_path, embedded, benchmarks_dir):
    out = tmp_path / "eval"
    kwargs = dict(model="embedded", chat_model=embedded, preset="micro", quiet=True,
                  overrides={"data": str(benchmarks_dir), "limits": TINY})
    res = run_eval(out, **kwargs)
    assert set(res["systems"]) == {"base", "persona"}
    base = res["systems"]["base"]
    assert 0 <= base["benchmarks"]["mmlu"]["mean"] <= 100 and base["benchmarks"]["mmlu"]["n"] == 8
    assert 10 <= base["benchmarks"]["mtbench"]["mean"] <= 100  # 1-10 ratings on the x10 scale
    assert base["overall"]["lo"] <= base["overall"]["mean"] <= base["overall"]["hi"]
    assert "vs_base" in res["systems"]["persona"] and "overall" in res["systems"]["persona"]["vs_base"]
    assert {"xstest/xstest_safe", "xstest/xstest_unsafe", "safety/harmbench"} <= set(base["subscores"])
    assert res["mtbench_judge"]["sanity"]["pairs"] == 2
    table = (out / "table.md").read_text()
    assert "| Base |" in table and "Expert prompting" in table and "Sanity check" in table
    assert (out / "categories.png").stat().st_size > 10_000
    gens = (out / "generations.jsonl").read_text().splitlines()
    # 2 systems x (2 MT-Bench x 2 turns + 5 safety + 4 xstest)
    assert len(gens) == 2 * (4 + 5 + 4)
    raw = json.loads((out / "raw.json").read_text())
    assert all(r["adapter"] is None for r in raw["safety"]["systems"]["persona"]["routes"])

    sizes = {p.name: p.stat().st_size for p in out.glob("*.jsonl")}
    again = run_eval(out, **kwargs)
    assert {p.name: p.stat().st_size for p in out.glob("*.jsonl")} == sizes  # nothing recomputed
    assert again["systems"]["base"]["benchmarks"] == res["systems"]["base"]["benchmarks"]

    # A killed eval resumes: drop the last rows as if the process died, then only they are redone.
    lines = (out / "generations.jsonl").read_text().splitlines(keepends=True)
    (out / "generations.jsonl").write_text("".join(lines[:-3]) + lines[-3][:10])  # torn last line too
    run_eval(out, **kwargs)
    assert len((out / "generations.jsonl").read_text().splitlines()) == len(lines)
