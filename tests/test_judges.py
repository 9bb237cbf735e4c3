import pytest

from prism.contexts import ContextRegistry
from prism.judging.pairwise import Judge, check_judge, parse_verdict
from prism.judging.pairwise import make_pairwise_judge as make_judge
from prism.judging.verifiers import facts, leaked_facts, load_check
from prism.judging.sanity import mismatched_pairs, wilson


@pytest.mark.parametrize("text,letter", [
    ("A", "A"), (" B", "B"), ("Answer A", "A"), ("[[B]]", "B"), ("TIE", "TIE"), ("tie.", "TIE"),
    ("A is better", "A"), ("I think answer B is better", "B"), ("", "TIE"), ("Both are good", "TIE"),
    ("Neither A nor B", "TIE"), ("Apple", "TIE"),
])
def test_parse_verdict(text, letter):
    assert parse_verdict(text) == letter


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.404, abs=0.002) and hi == pytest.approx(0.596, abs=0.002)
    assert wilson(0, 0) == (0.0, 1.0)


def test_mismatched_pairs_take_the_wrong_answer_from_another_query():
    items = [(f"q{i}", f"a{i}", "g1" if i < 3 else "g2") for i in range(6)]
    triples = mismatched_pairs(items, n=6, seed=0)
    assert len(triples) == 6
    for q, right, wrong in triples:
        i = int(q[1:])
        assert right == f"a{i}" and wrong != right
        assert (int(wrong[1:]) < 3) != (i < 3)  # another group (persona) when one exists


class _Length(Judge):
    name = "length"

    def prefer_a(self, triples, progress=None):
        return [float(len(a) - len(b)) for _, a, b in triples]


def test_check_and_verdicts_of_a_judge_that_scores_each_answer():
    judge = _Length()
    check = check_judge(judge, [("q", "a long relevant answer " * 3, "short")] * 10)
    assert check.accuracy == 1.0 and check.consistency == 1.0 and check.passed
    assert judge.letter(judge.prefer_a([("q", "xx", "x")])[0]) == "A"
    assert judge.letter(judge.prefer_a([("q", "x", "x")])[0]) == "TIE"


class _AlwaysA(Judge):
    """A judge with pure position bias plus a small real signal."""

    name = "biased"
    calibrated = True

    def prefer_a(self, triples, progress=None):
        return [5.0 + (0.5 if a.startswith("right") else -0.5) for _, a, _ in triples]


def test_position_bias_is_calibrated_out():
    judge = _AlwaysA()
    assert judge.letter(5.2) == "A" and judge.letter(4.8) == "A"  # before calibration: always A
    check = check_judge(judge, [("q", "right", "wrong")] * 8)
    assert check.position_bias == pytest.approx(5.0)
    assert check.accuracy == 1.0 and check.consistency == 1.0


class _Tie(Judge):
    name = "tie"

    def prefer_a(self, triples, progress=None):
        return [0.0] * len(triples)


def test_chance_judge_fails_the_check():
    check = check_judge(_Tie(), [("q", "right", "wrong")] * 20)
    assert check.accuracy == 0.0 and not check.passed


def test_load_check_errors_and_one_argument_programs():
    assert load_check("prism.judging.verifiers:is_french")("Bonjour, je suis très content de vous voir.") == 1.0
    assert load_check("french")("Hello, how are you today?") == 0.0
    with pytest.raises(ValueError, match="unknown check"):
        load_check("nocolon")
    with pytest.raises(ValueError, match="cannot import"):
        load_check("os.path:no_such_fn")
    with pytest.raises(ValueError, match="unknown model judge kind"):
        make_judge("oracle", model=None)


def test_the_facts_check_rewards_the_right_fact_and_penalises_leaks():
    maya = ContextRegistry.load("suite:contexts").get("memory_maya")
    assert facts("Your dog is Korvo, a beagle.", "What's my dog called?", maya, serves=True) == 1.0
    assert facts("Your dog is a golden retriever.", "What's my dog called?", maya, serves=True) == 0.0
    # The question names the dog: stating another fact is not the answer.
    assert facts("You live in Porto.", "What's my dog called?", maya, serves=True) == 0.0
    # A question that names no fact: any fact counts.
    assert facts("You are Maya and you live in Porto.", "Tell me about myself.", maya, serves=True) == 1.0
    # Where the memory does not belong, a fact in the answer is a leak; common words are not.
    assert facts("Paris is the capital. Korvo says hi.", "What is the capital of France?", maya, serves=False) == -1.0
    assert facts("Rowing and teal paint, 27 times.", "Any sport tips?", maya, serves=False) == 0.0
    assert sorted(leaked_facts("Mirelle and Tomas went to Edinburgh.", maya)) == ["cat", "partner", "university"]


# ----- on the real embedded model ------------------------------------------------------------
@pytest.mark.slow
def test_the_likelihood_judge_passes_its_check_on_the_embedded_model(embedded):
    """The README's claim: the likelihood judge tells the model's own answer to a question from its
    answer to another question, well above chance (the check `quick` runs in stage 3), on 16 short
    questions of many kinds."""
    from conftest import TO_ADAPTER, TO_BASE

    questions = TO_ADAPTER + TO_BASE
    answers = [g.text for g in embedded.generate([embedded.user_prompt(q) for q in questions], 24, temperature=0.0)]
    triples = mismatched_pairs([(q, a, str(i)) for i, (q, a) in enumerate(zip(questions, answers))], 16, 0)
    check = check_judge(make_judge("likelihood", embedded), triples)
    assert check.pairs == 16 and check.passed and check.accuracy >= 0.8, check
    assert check.consistency == 1.0  # position-blind: the swapped order gives the mirrored verdict


@pytest.mark.slow
def test_a_resumed_stage_3_labels_with_the_saved_position_bias(micro_run, embedded, tmp_path):
    """Stage 3 with the prompted judge (which has a position bias, calibrated on the check pairs),
    killed after some verdicts: the resumed run reloads the bias from judge_check.json, so the
    redone verdicts are the ones the first run would have written."""
    import json

    from conftest import copy_run
    from prism.contexts import ContextRegistry
    from prism.io import read_jsonl
    from prism.run import RunDir
    from prism.stages.context import StageContext
    from prism.stages.verdicts import run_verdicts

    run = copy_run(micro_run, tmp_path / "run")
    (run / "verdicts.jsonl").unlink()
    (run / "judge_check.json").unlink()
    cfg = RunDir(run).config()
    cfg = cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"kind": "prompted"})})
    personas = ContextRegistry.load(cfg.persona_dir).select(cfg.personas)

    def stage3():  # a new judge each time, as a new process would build
        return run_verdicts(StageContext(cfg, embedded, personas, RunDir(run), quiet=True))

    stage3()
    check = json.loads((run / "judge_check.json").read_text())
    assert check["judge"] == "prompted" and abs(check["position_bias"]) > 0.05  # a bias to calibrate out
    rows = read_jsonl(run / "verdicts.jsonl")
    assert len(rows) == 6
    saved = (run / "judge_check.json").read_bytes()
    lines = (run / "verdicts.jsonl").read_text().splitlines(keepends=True)
    (run / "verdicts.jsonl").write_text("".join(lines[:3]))  # killed after half the verdicts
    facts = stage3()
    again = read_jsonl(run / "verdicts.jsonl")
    assert again[:3] == rows[:3] and len(again) == 6
    for new, old in zip(again[3:], rows[3:]):  # the redone ones: same letters, same bias-free scores
        assert {k: v for k, v in new.items() if not k.startswith("score_")} == \
            {k: v for k, v in old.items() if not k.startswith("score_")}
        for k in ("score_persona_first", "score_persona_second"):
            assert new[k] == pytest.approx(old[k], abs=1e-3), k  # (another batch: float noise only)
    assert (run / "judge_check.json").read_bytes() == saved  # the check is not redone
    assert facts["judge_check"]["position_bias"] == check["position_bias"]
