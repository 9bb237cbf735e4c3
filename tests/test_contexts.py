import pytest

from prism.contexts import LENGTHS, PersonaError, ContextRegistry

TASK = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
BEHAVIOUR = ["critic", "safety_monitor", "helpful", "compliant"]
WORDS = {"long": (150, 175), "short": (55, 60), "minimal": (4, 5)}


def test_builtin_library_has_the_papers_twelve_personas_at_three_lengths():
    reg = ContextRegistry.builtin()
    assert sorted(reg.names()) == sorted(TASK + BEHAVIOUR)
    for name in TASK:
        assert reg.get(name).kind == "persona" and reg.get(name).category == name
    for name in BEHAVIOUR:
        assert reg.get(name).kind == "persona" and reg.get(name).category is None
    for p in reg.personas.values():
        for length in LENGTHS:
            lo, hi = WORDS[length]
            assert lo <= len(p.text(length).split()) <= hi, (p.name, length)


def test_user_personas_from_directory_and_file(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "french.yaml").write_text("name: french\ntext: Always answer in French.\n")
    (d / "pair.yml").write_text("- name: pirate\n  short: Talk like a pirate.\n- name: math\n  minimal: You do maths.\n")
    reg = ContextRegistry.load(d)
    assert reg.get("french").text("long") == "Always answer in French."  # one text serves every length
    assert reg.get("math").text("minimal") == "You do maths."  # user files override the library
    with pytest.raises(PersonaError, match="no 'long' text"):
        reg.get("pirate").text("long")
    single = ContextRegistry.load(d / "french.yaml")
    assert "french" in single.names() and len(single.names()) == 13


@pytest.mark.parametrize("content,match", [
    ("", "empty"),
    ("[]\n", "list is empty"),
    ("name: x\n", "has no text"),
    ("name: x\ntext: '   '\n", "empty or non-text 'text'"),
    ("name: Bad Name\ntext: hi\n", "'name' must be"),
    ("name: x\ntext: hi\ncolour: red\n", "unknown keys"),
    ("name: x\ntext: hi\nkind: wizard\n", "kind 'wizard'"),
    ("name: [unclosed\n", "not valid YAML"),
    ("just a string\n", "must be a mapping"),
])
def test_malformed_persona_files_are_rejected_naming_file_and_problem(tmp_path, content, match):
    f = tmp_path / "broken.yaml"
    f.write_text(content)
    with pytest.raises(PersonaError, match=match) as info:
        ContextRegistry.load(f)
    assert "broken.yaml" in str(info.value)


def test_missing_paths_and_unknown_names(tmp_path):
    with pytest.raises(PersonaError, match="does not exist"):
        ContextRegistry.load(tmp_path / "nope")
    with pytest.raises(PersonaError, match="holds no .yaml"):
        ContextRegistry.load(tmp_path)
    reg = ContextRegistry.builtin()
    with pytest.raises(PersonaError, match="unknown persona 'wizard'"):
        reg.select(["math", "wizard"])
    with pytest.raises(PersonaError, match="unknown persona length"):
        reg.get("math").text("medium")
