import json
import os

import pytest

from prism.io import append_jsonl, atomic_write_json, read_jsonl


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    f = tmp_path / "m.json"
    atomic_write_json(f, {"a": 1})
    atomic_write_json(f, {"a": 2})
    assert json.loads(f.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["m.json"]


def test_read_jsonl_drops_and_repairs_a_torn_last_line(tmp_path):
    f = tmp_path / "x.jsonl"
    append_jsonl(f, [{"i": 0}, {"i": 1}])
    with open(f, "ab") as h:
        h.write(b'{"i": 2, "te')  # what a kill in the middle of a write could leave
    assert read_jsonl(f) == [{"i": 0}, {"i": 1}]
    assert f.read_bytes().endswith(b'{"i": 1}\n')  # repaired on disk
    append_jsonl(f, [{"i": 2}])
    assert [r["i"] for r in read_jsonl(f)] == [0, 1, 2]


def test_read_jsonl_keeps_a_complete_row_missing_its_newline(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"i": 0}\n{"i": 1}')
    assert read_jsonl(f) == [{"i": 0}, {"i": 1}]
    append_jsonl(f, [{"i": 2}])
    assert len(read_jsonl(f)) == 3


def test_corruption_in_the_middle_is_an_error(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(ValueError, match="corrupt line"):
        read_jsonl(f)


def test_missing_file_reads_as_empty(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl") == []


def test_atomic_writes_get_the_ordinary_file_mode(tmp_path):
    import os

    from prism.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(old)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644


def test_a_directory_swap_killed_between_its_renames_is_recovered(tmp_path):
    from prism.io import atomic_directory, recover_directory

    target = tmp_path / "checkpoint"
    with atomic_directory(target) as d:
        (d / "state.json").write_text('{"epoch": 1}')
    # A kill between the two renames of the next swap: the complete old version waits as .old, the
    # new one (maybe incomplete) as .tmp, and `target` itself is missing.
    target.rename(tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / "state.json").write_text('{"epo')
    recover_directory(target)
    assert (target / "state.json").read_text() == '{"epoch": 1}' and not (tmp_path / "checkpoint.old").exists()
    recover_directory(target)  # nothing to do when the target is there
    assert (target / "state.json").read_text() == '{"epoch": 1}'
    # The next swap over those leftovers writes the new version whole and leaves nothing behind.
    with atomic_directory(target) as d:
        (d / "state.json").write_text('{"epoch": 2}')
    assert (target / "state.json").read_text() == '{"epoch": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    # A failure while writing leaves the previous version untouched.
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as d:
            (d / "state.json").write_text("partial")
            raise RuntimeError("killed")
    assert (target / "state.json").read_text() == '{"epoch": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
