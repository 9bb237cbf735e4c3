import pytest

from prism.records import VerdictRecord, both_orders_label, winner


@pytest.mark.parametrize("first,second,label", [
    ("A", "B", 1),  # persona wins as A and as B
    ("A", "A", 0),  # position A wins twice: inconsistent
    ("B", "B", 0),
    ("B", "A", 0),  # base wins both
    ("A", "TIE", 0),
    ("TIE", "B", 0),
    ("TIE", "TIE", 0),
])
def test_persona_must_win_both_orders(first, second, label):
    assert both_orders_label(first, second) == label


def test_winner_and_consistency():
    assert winner("A", persona_is="A") == "persona" and winner("A", persona_is="B") == "base"
    assert winner("TIE", persona_is="A") == "tie"
    row = dict(query_id="q", persona="p", judge="j", score_persona_first=1.0, score_persona_second=-1.0, label=0)
    assert VerdictRecord(persona_first="A", persona_second="B", **row).consistent
    assert VerdictRecord(persona_first="B", persona_second="A", **row).consistent  # base wins both
    assert not VerdictRecord(persona_first="A", persona_second="A", **row).consistent


def test_record_round_trip_and_missing_field():
    row = dict(query_id="q", persona="p", judge="j", persona_first="A", persona_second="B",
               score_persona_first=1.0, score_persona_second=-1.0, label=1)
    assert VerdictRecord.from_dict(VerdictRecord(**row).to_dict()) == VerdictRecord(**row)
    del row["label"]
    with pytest.raises(ValueError, match="missing"):
        VerdictRecord.from_dict(row)
