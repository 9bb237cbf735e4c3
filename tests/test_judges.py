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
