import pytest

from prism.contexts import ContextRegistry
from prism.stages.queries import accept, clean_query, normalise, on_target


@pytest.mark.parametrize("raw,expected", [
    ("1. How do I sort a list in Python?", "How do I sort a list in Python?"),
    ("2) What is entropy?", "What is entropy?"),
    ("- **Question:** Why is the sky blue?", "Why is the sky blue?"),
    ('"What causes tides?"', "What causes tides?"),
    ("\u201cWhat causes tides?\u201d", "What causes tides?"),
    ("Sure! Here is a question:\n\nHow do vaccines work?", "How do vaccines work?"),
    ('A user might ask: "How do I compute a determinant?" and you would answer', "How do I compute a determinant?"),
    ("What is a monad? A monad is a thing.", "What is a monad?"),
    ("Write a haiku about autumn leaves.\nSecond line", "Write a haiku about autumn leaves."),
    ("Q1: Explain   recursion  briefly", "Explain recursion briefly"),
    ("", ""),
    ("\n\n   \n", ""),
])
def test_clean_query(raw, expected):
    assert clean_query(raw) == expected


def test_normalise_ignores_case_punctuation_and_spacing():
    assert normalise("How do I sort a list?") == normalise("how do i   SORT a list") == "how do i sort a list"


def test_accept_filters_short_deduplicates_and_caps():
    seen = {normalise("What is the speed of light?")}
    raw = [
        "1. What is the speed of light?",  # already seen in an earlier round
        "Hi?",  # too short
        "How do black holes form?",
        "how do black holes FORM",  # duplicate after normalisation
        "What is dark matter made of?",
        "Why do stars twinkle at night?",
    ]
    kept = accept(raw, seen, min_chars=10, need=2)
    assert kept == [(2, "How do black holes form?"), (4, "What is dark matter made of?")]
    assert normalise("What is dark matter made of?") in seen
    assert normalise("Why do stars twinkle at night?") not in seen  # never looked at: cap reached


def test_a_facts_context_keeps_only_queries_that_name_one_of_its_keys():
    reg = ContextRegistry.load("suite:contexts")
    memory = reg.get("memory_maya")
    keep = on_target(memory)
    raw = ["Where is Mount Etna?", "What's my dog's name?", "Tell me my allergies.", "Which colours do I like?",
           "Who wrote Hamlet?", "Which city do I live in?"]
    assert [t for _, t in accept(raw, set(), 5, 10, keep)] == [
        "What's my dog's name?", "Tell me my allergies.", "Which colours do I like?", "Which city do I live in?"]
    assert memory.fact_for("Tell me my allergies.").key == "allergy"  # plurals name their singular key
    assert memory.fact_for("What are my dogs called?").key == "dog"
    # Personas, general queries and contexts without facts are not filtered.
    assert on_target(None) is None and on_target(reg.get("writing")) is None


@pytest.mark.slow  # the real model
def test_query_prompts_vary_the_phrasing_across_keys_styles_and_openers(embedded):
    """A gate learns from these queries: memory questions must come with "my" and "I" phrasings and
    general ones in every style, or it learns a word instead of the question (see stages/queries)."""
    from types import SimpleNamespace

    from prism.contexts import ContextRegistry
    from prism.stages.queries import GENERAL_STYLES, MEMORY_OPENERS, query_prompts

    cfg = SimpleNamespace(queries=SimpleNamespace(persona_in_context=False), placement="system")
    ctx = SimpleNamespace(model=embedded, config=cfg, persona_text=lambda p: p.text())
    memory = ContextRegistry.load("suite:contexts").get("memory_maya")
    pairs = query_prompts(ctx, memory, 3 * len(memory.facts), 0)
    assert {o for _, o in pairs} == set(MEMORY_OPENERS)
    assert all(p.endswith(o) and "Question: " in p for p, o in pairs)
    assert sum(f"about my {key}." in p for p, _ in pairs for key in ("dog", "sister", "cat")) == 9
    general = query_prompts(ctx, None, 48, 0)
    for i, style in enumerate(GENERAL_STYLES):  # each style in turn, its reply started as it says
        assert all(style[0].split("{")[0] in p and style[1] in p for p, _ in general[i::len(GENERAL_STYLES)])
    assert len({o for _, o in general}) >= 12 and all(p.endswith(o) for p, o in general)
