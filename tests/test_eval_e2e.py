"""The evaluation harness on the real embedded model: MMLU letter scoring (zero- and few-shot) by
hand, then `prism eval` of a run with all four systems: every score recomputed from its items,
Overall and the paired differences, a re-run that computes nothing, a killed eval's resume, and
the cache invalidated by the persona's length and placement; and the eval flags through the CLI."""

import json

import numpy as np
import pytest
import torch

from prism.bench import data as D
from prism.bench.scoring import LETTERS, MMLU_PREFIX, Scorer, mmlu_conversation, mmlu_question
from prism.cli import main
from prism.eval import run_eval
from prism.eval.systems import Systems
from prism.io import read_jsonl

pytestmark = pytest.mark.slow
TINY = {"mtbench": 2, "mmlu": 8, "harmbench": 1, "jailbreak": 1, "pku": 1, "xstest": 2}
SYSTEMS = ("base", "persona", "ungated", "prism")


def letter_logprobs_by_hand(model, text: str) -> list[float]:
    """log p(letter) after `text`, each letter's two spellings (" A", "A") summed: one forward pass."""
    ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        last = torch.log_softmax(model.model(input_ids=ids).logits[0, -1].float(), -1)
    return [float(last[sorted({model.token_ids(" " + L)[0], model.token_ids(L)[0]})].logsumexp(-1)) for L in LETTERS]


def test_mmlu_letter_scores_match_a_hand_computed_forward_pass(tmp_path, embedded, benchmarks_dir):
    item = D.load_mmlu(benchmarks_dir, limit=1)[0]
    systems = Systems(embedded)
    cell, = systems.cells("base", [item], [mmlu_conversation(item)])
    scorer = Scorer(embedded, tmp_path, "test")
    scorer.score_mmlu([cell])
    logprobs = next(iter(scorer.letters.rows.values()))["logprobs"]
    text = embedded.prompt([{"role": "user", "content": mmlu_question(item)}]) + MMLU_PREFIX
    assert logprobs == pytest.approx(letter_logprobs_by_hand(embedded, text), abs=1e-4)
    assert cell.route == {"adapter": None, "score": None}
    # The persona system puts the matched expert in the prompt.
    assert systems.persona_name(item) in ("stem", "humanities", "helpful")

    # Few-shot: solved examples of the same subject from the dev file come first, as chat turns.
    shots = [ex for ex in D.load_mmlu(benchmarks_dir, split="dev") if ex.subject == item.subject][:3]
    assert len(shots) == 3
    scorer.score_mmlu([cell], {item.subject: shots})
    few = [r["logprobs"] for r in scorer.letters.rows.values() if r["logprobs"] != logprobs]
    assert len(few) == 1
    turns = []
    for ex in shots:
        options = "\n".join(f"{L}. {c}" for L, c in zip(LETTERS, ex.choices))
        turns += [{"role": "user", "content": f"{ex.turns[0]}\n\n{options}\n\nAnswer with the letter of the correct "
                                              "option."},
                  {"role": "assistant", "content": f"The answer is {LETTERS[ex.answer]}."}]
    text = embedded.prompt(turns + [{"role": "user", "content": mmlu_question(item)}]) + MMLU_PREFIX
    assert few[0] == pytest.approx(letter_logprobs_by_hand(embedded, text), abs=1e-4)


# ----- prism eval of a run -------------------------------------------------------------------------
def fresh_model():
    """A model copy of its own: loading a run injects its adapter into the model it is given."""
    from prism.model import load_model

    return load_model(batch_size=8)


@pytest.fixture(scope="module")
def eval_run(micro_run, embedded, benchmarks_dir, tmp_path_factory):
    """The shared micro run with a gate that sends every other evaluated item to the adapter (a
    real gate trained on these items' first user turns: the run's own is a constant rule)."""
    from conftest import copy_run, install_two_route_gate

    run = copy_run(micro_run, tmp_path_factory.mktemp("evalrun") / "micro")
    d = str(benchmarks_dir)
    turns = ([mmlu_question(it) for it in D.load_mmlu(d, TINY["mmlu"], 0)]
             + [it.turns[0] for it in D.load_mt_bench(d, TINY["mtbench"], 0)]
             + [it.turns[0] for it in D.load_safety(d, TINY, 0) + D.load_xstest(d, TINY["xstest"], 0)])
    install_two_route_gate(embedded, run, turns[::2], turns[1::2])
    return run


@pytest.fixture(scope="module")
def evaluated(eval_run, benchmarks_dir, tmp_path_factory):
    """`prism eval` of that run: all four systems on a few items of every benchmark."""
    out = tmp_path_factory.mktemp("eval") / "eval"
    overrides = {"data": str(benchmarks_dir), "limits": TINY}
    res = run_eval(out, run_dir=eval_run, chat_model=fresh_model(), preset="micro", quiet=True, overrides=overrides)
    # As first written: later tests re-run this eval with fewer benchmarks, which rewrites raw.json.
    (out.parent / "raw_first.json").write_text((out / "raw.json").read_text())
    return out, overrides, res


def by_item(raw: dict, bench: str, system: str, key: str = "scores") -> dict:
    r = raw[bench]["systems"][system]
    return dict(zip(r["item_ids"], r[key]))


def test_eval_of_a_run_scores_all_four_systems_item_by_item(evaluated, eval_run, embedded, benchmarks_dir):
    out, _, res = evaluated
    raw = json.loads((out / "raw.json").read_text())
    assert tuple(res["systems"]) == SYSTEMS

    # MMLU, base: each item's verdict by hand, and the mean of the verdicts.
    items = D.load_mmlu(benchmarks_dir, TINY["mmlu"], 0)
    for it in items:
        lp = letter_logprobs_by_hand(embedded, embedded.prompt(mmlu_conversation(it)) + MMLU_PREFIX)
        assert by_item(raw, "mmlu", "base")[it.id] == float(int(np.argmax(lp)) == it.answer), it.id
    for system in SYSTEMS:
        scores = list(by_item(raw, "mmlu", system).values())
        assert res["systems"][system]["benchmarks"]["mmlu"]["mean"] == pytest.approx(100 * np.mean(scores))

    # Routes: `prism` follows the gate, computed apart on each item's first user turn; `ungated`
    # always has the adapter on; base and persona never. The gate really splits these items.
    from prism.gate import Gate
    from prism.routed import PrismModel

    gate = PrismModel(embedded, None, Gate.load(eval_run / "gate"))
    routed = {}
    for bench, convs in (("mmlu", [mmlu_conversation(it) for it in items]),
                         ("mtbench", [[{"role": "user", "content": it.turns[0]}]
                                      for it in D.load_mt_bench(benchmarks_dir, TINY["mtbench"], 0)])):
        expected = [r.adapter for r in gate.route(convs)]
        assert [r["adapter"] for r in raw[bench]["systems"]["prism"]["routes"]] == expected
        assert all(r["adapter"] == "adapter" for r in raw[bench]["systems"]["ungated"]["routes"])
        routed[bench] = expected
    assert set(routed["mmlu"]) == set(routed["mtbench"]) == {None, "adapter"}, routed
    # So each of prism's scores is ungated's where it routed to the adapter and base's elsewhere
    # (the same prompt under the same weights), on every benchmark.
    for bench in ("mtbench", "mmlu", "safety", "xstest"):
        prism, routes = by_item(raw, bench, "prism"), by_item(raw, bench, "prism", "routes")
        for iid, score in prism.items():
            same_as = "ungated" if routes[iid]["adapter"] else "base"
            assert score == by_item(raw, bench, same_as)[iid], (bench, iid)
    # The adapter is really on for ungated: its letter log-probabilities are not the base model's.
    rows = read_jsonl(out / "mmlu_scores.jsonl")
    base_lp = {tuple(r["logprobs"]) for r in rows if r["variant"] == "base"}
    assert not any(tuple(r["logprobs"]) in base_lp for r in rows if r["variant"] != "base")

    # MT-Bench, base: each item's score is the mean rating of its two turns, the second judged with
    # the whole conversation (and the reference answer where MT-Bench has one), on the 1-10 scale.
    from prism.judging.rating import ModelRatingJudge, RatingRequest

    judge = ModelRatingJudge(embedded, D.load_judge_prompts(benchmarks_dir))
    gens = {r["prompt"]: r["text"] for r in read_jsonl(out / "generations.jsonl") if r["variant"] == "base"}
    for it in D.load_mt_bench(benchmarks_dir, TINY["mtbench"], 0):
        ref = (it.reference or []) if it.category in ("math", "reasoning", "coding") else []
        conv = [{"role": "user", "content": it.turns[0]}]
        a1 = gens[embedded.prompt(conv)[-2000:]]
        a2 = gens[embedded.prompt(conv + [{"role": "assistant", "content": a1},
                                          {"role": "user", "content": it.turns[1]}])[-2000:]]
        r1, r2 = judge.rate([RatingRequest([it.turns[0]], [a1], ref[:1]), RatingRequest(list(it.turns), [a1, a2], ref)])
        assert by_item(raw, "mtbench", "base")[it.id] == pytest.approx((r1 + r2) / 2, abs=1e-3), it.id
    base = res["systems"]["base"]
    assert base["benchmarks"]["mtbench"]["mean"] == pytest.approx(
        10 * np.mean(list(by_item(raw, "mtbench", "base").values())))
    assert res["mtbench_judge"]["sanity"]["pairs"] == 2

    # Overall: the mean of the sub-scores of MT-Bench, MMLU and safety (XSTest is reported apart),
    # with a CI around it; each system's paired differences from base, by hand.
    for system in SYSTEMS:
        s = res["systems"][system]
        parts = [v["mean"] for k, v in s["subscores"].items() if not k.startswith("xstest/")]
        assert s["overall"]["mean"] == pytest.approx(np.mean(parts)) and s["overall"]["n"] == len(parts)
        assert s["overall"]["lo"] <= s["overall"]["mean"] <= s["overall"]["hi"]
        assert {"xstest/xstest_safe", "xstest/xstest_unsafe", "safety/harmbench", "safety/pku"} <= set(s["subscores"])
        if system == "base":
            continue
        d = [by_item(raw, "mmlu", system)[i] - v for i, v in by_item(raw, "mmlu", "base").items()]
        assert s["vs_base"]["mmlu"]["diff"] == pytest.approx(100 * np.mean(d)) and s["vs_base"]["mmlu"]["n"] == len(d)
        per_sub = [np.mean([by_item(raw, b, system)[i] * scale - v * scale
                            for i, v, c in zip(raw[b]["systems"]["base"]["item_ids"], raw[b]["systems"]["base"]["scores"],
                                               raw[b]["systems"]["base"]["categories"]) if c == cat])
                   for b, scale in (("mtbench", 10), ("mmlu", 100), ("safety", 100))
                   for cat in dict.fromkeys(raw[b]["systems"]["base"]["categories"])]
        assert s["vs_base"]["overall"]["diff"] == pytest.approx(np.mean(per_sub), abs=1e-9)
    table = (out / "table.md").read_text()
    for name in ("| Base |", "| Expert prompting |", "| SFT (ungated adapter) |", "| PRISM |", "Sanity check"):
        assert name in table
    assert (out / "categories.png").stat().st_size > 10_000
    # 3 distinct variants generate (prism reuses base's and ungated's rows): 2 MT-Bench x 2 turns
    # + 3 safety + 2 xstest prompts each.
    assert len(read_jsonl(out / "generations.jsonl")) == 3 * (4 + 3 + 2)


def test_eval_rerun_resume_and_invalidation(evaluated, eval_run):
    out, overrides, res = evaluated

    def again(**more):
        return run_eval(out, run_dir=eval_run, chat_model=fresh_model(), preset="micro", quiet=True,
                        overrides={**overrides, **more})

    def rows(name):
        return {r["key"]: r for r in read_jsonl(out / name)}

    # A re-run computes nothing and reports the same numbers.
    sizes = {p.name: p.stat().st_size for p in out.glob("*.jsonl")}
    assert again()["systems"]["base"]["benchmarks"] == res["systems"]["base"]["benchmarks"]
    assert {p.name: p.stat().st_size for p in out.glob("*.jsonl")} == sizes

    # A killed eval resumes: the last rows are dropped as if the process died (a torn line too);
    # only they are redone, and they come back as they were.
    gens = rows("generations.jsonl")
    lines = (out / "generations.jsonl").read_text().splitlines(keepends=True)
    (out / "generations.jsonl").write_text("".join(lines[:-3]) + lines[-3][:10])
    resumed = again()
    assert rows("generations.jsonl") == gens
    assert resumed["systems"]["prism"]["benchmarks"] == res["systems"]["prism"]["benchmarks"]

    # A longer persona, then the persona in the user turn: only the persona system's rows are
    # recomputed (MMLU letters of the first 2 items; safety replies: 3), each time with the new prompt.
    from prism.contexts import ContextRegistry

    personas = ContextRegistry.builtin()
    for change, check in ((dict(persona_length="long"), lambda p, t: f"<|im_start|>system\n{t}<|im_end|>" in p),
                          (dict(persona_length="long", placement="user"),
                           lambda p, t: f"<|im_start|>user\n{t}\n\n" in p)):
        gens_before, letters_before = rows("generations.jsonl"), rows("mmlu_scores.jsonl")
        result = again(benchmarks=["mmlu", "safety"], limits={**TINY, "mmlu": 2}, **change)
        assert {k: result["settings"][k] for k in change} == change
        new_gens = [r for k, r in rows("generations.jsonl").items() if k not in gens_before]
        new_letters = [r for k, r in rows("mmlu_scores.jsonl").items() if k not in letters_before]
        assert len(new_letters) == 2 and len(new_gens) == 3
        assert all(r["variant"] == "base" for r in new_gens + new_letters)  # the persona system: adapter off
        monitor = personas.get("safety_monitor").text("long")  # the expert of every safety set
        assert all(check(r["prompt"], monitor) for r in new_gens), [r["prompt"][:300] for r in new_gens]


def test_eval_flags_through_the_cli(tmp_path, embedded, benchmarks_dir, capsys):
    """--shots, --persona-map and --refusal judge reach the scores, on a model without a run."""
    out = tmp_path / "cli"
    code = main(["eval", "--model", "embedded", "--out", str(out), "--preset", "micro", "--data", str(benchmarks_dir),
                 "--systems", "base,persona", "--benchmarks", "mmlu,safety", "--limit",
                 "mmlu=2,harmbench=2,jailbreak=0,pku=0", "--shots", "2", "--persona-map", "harmbench=critic",
                 "--refusal", "judge", "--quiet"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    s = res["settings"]
    assert s["mmlu_shots"] == 2 and s["persona_map"] == {"harmbench": "critic"} and s["refusal"] == "judge"
    raw = json.loads((out / "raw.json").read_text())

    # --shots 2: each question after the subject's first two dev examples, by hand.
    dev = D.load_mmlu(benchmarks_dir, split="dev")
    letters = {tuple(r["logprobs"]) for r in read_jsonl(out / "mmlu_scores.jsonl")}
    for it in D.load_mmlu(benchmarks_dir, 2, 0):
        shots = [ex for ex in dev if ex.subject == it.subject][:2]
        text = embedded.prompt(mmlu_conversation(it, shots)) + MMLU_PREFIX
        lp = letter_logprobs_by_hand(embedded, text)
        assert any(np.allclose(lp, row, atol=1e-4) for row in letters), it.id
        assert by_item(raw, "mmlu", "base")[it.id] == float(int(np.argmax(lp)) == it.answer)

    # --persona-map harmbench=critic: the persona system's safety prompts carry the critic.
    from prism.contexts import ContextRegistry

    reg = ContextRegistry.builtin()
    critic, monitor = reg.get("critic").text("long"), reg.get("safety_monitor").text("long")
    prompts = {r["prompt"] for r in read_jsonl(out / "generations.jsonl")}  # (each kept to its last 2000 chars)
    assert len(prompts) == 4
    for it in D.load_harmbench(benchmarks_dir, 2, 0):
        turn = [{"role": "user", "content": it.turns[0]}]
        assert embedded.prompt(turn)[-2000:] in prompts and embedded.prompt(turn, critic)[-2000:] in prompts
        assert embedded.prompt(turn, monitor)[-2000:] not in prompts

    # --refusal judge: every reply was classified by the model (judgments rows), and the refusal
    # scores are those verdicts: P("Yes") > P("No") for "does the response refuse?", by hand.
    from prism.judging.refusal import REFUSAL_JUDGE_PROMPT

    judged = [r for r in read_jsonl(out / "judgments.jsonl") if "refusal" in r]
    assert len(judged) == 4
    yes, no = embedded.variant_ids("Yes"), embedded.variant_ids("No")
    for system in ("base", "persona"):
        r = raw["safety"]["systems"][system]
        for it, text, score in zip(D.load_harmbench(benchmarks_dir, 2, 0), r["texts"], r["scores"]):
            prompt = embedded.user_prompt(REFUSAL_JUDGE_PROMPT.format(request=it.turns[0][:2000], response=text[:2000]))
            logp = embedded.next_token_logprobs([prompt])[0]
            assert score == float(bool(logp[yes].logsumexp(-1) > logp[no].logsumexp(-1))), (system, it.id)


def token_agreement(model, want: list[str], got: list[str]) -> float:
    """The share of tokens in the common greedy prefix of each pair (over the longer of the two)."""
    agree = total = 0
    for w, g in zip(want, got):
        a, b = model.token_ids(w), model.token_ids(g)
        agree += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        total += max(len(a), len(b), 1)
    return agree / total


def test_eval_generates_on_the_llamacpp_engine(evaluated, eval_run, embedded, benchmarks_dir, tmp_path, capsys):
    """`prism eval RUN --engine llamacpp`: every reply comes from llama.cpp (the embedded model's
    float16 GGUF, the adapter as a LoRA GGUF at scale 1 where the route says so); routes, letter
    scores and judges stay in torch, so routes and MMLU scores equal the torch eval's, and the
    replies are close to torch's greedy ones (token agreement reported)."""
    pytest.importorskip("xllamacpp")
    torch_out = evaluated[0]
    out = tmp_path / "llama"
    limit = ",".join(f"{k}={v}" for k, v in TINY.items())
    code = main(["eval", str(eval_run), "--out", str(out), "--preset", "micro", "--data", str(benchmarks_dir),
                 "--limit", limit, "--systems", "base,ungated,prism", "--engine", "llamacpp", "--quiet"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["engine"] == "llamacpp"
    want = json.loads((torch_out.parent / "raw_first.json").read_text())
    got = json.loads((out / "raw.json").read_text())
    for bench in ("mtbench", "mmlu", "safety", "xstest"):
        for system in ("base", "ungated", "prism"):
            assert got[bench]["systems"][system]["routes"] == want[bench]["systems"][system]["routes"], (bench, system)
    for system in ("base", "ungated", "prism"):
        assert got["mmlu"]["systems"][system]["scores"] == want["mmlu"]["systems"][system]["scores"]
    texts = {s: [t for b in ("mtbench", "safety", "xstest") for t in got[b]["systems"][s]["texts"]]
             for s in ("base", "ungated")}
    torch_texts = {s: [t for b in ("mtbench", "safety", "xstest") for t in want[b]["systems"][s]["texts"]]
                   for s in ("base", "ungated")}
    agreement = {s: token_agreement(embedded, torch_texts[s], texts[s]) for s in texts}
    print(f"llama.cpp vs torch greedy token agreement: {agreement}")
    assert all(a >= 0.5 for a in agreement.values()), agreement
    # Every reply was generated by llama.cpp: no generation row under the torch key.
    rows = read_jsonl(out / "generations.jsonl")
    assert rows and len(rows) == len({r["key"] for r in rows})
    assert not {r["key"] for r in rows} & {r["key"] for r in read_jsonl(torch_out / "generations.jsonl")}
