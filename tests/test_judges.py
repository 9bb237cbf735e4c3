import pytest

from prism.judging.pairwise import Judge, ProgramJudge, check_judge, load_program, parse_verdict
from prism.judging.pairwise import make_pairwise_judge as make_judge
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


def _length(answer: str) -> float:
    return len(answer)


def test_program_judge_check_and_verdicts():
    judge = ProgramJudge(_length)
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


def test_chance_judge_fails_the_check():
    judge = ProgramJudge(lambda a: 0.0)  # always TIE
    check = check_judge(judge, [("q", "right", "wrong")] * 20)
    assert check.accuracy == 0.0 and not check.passed


def test_load_program_errors():
    assert load_program("os.path:basename")("/a/b") == "b"
    with pytest.raises(ValueError, match="module:function"):
        load_program("nocolon")
    with pytest.raises(ValueError, match="cannot import"):
        load_program("os.path:no_such_fn")
    with pytest.raises(ValueError, match="unknown judge kind"):
        make_judge("oracle", model=None)
