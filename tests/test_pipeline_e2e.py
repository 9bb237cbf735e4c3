"""End to end on the real embedded model with the micro preset: files, manifest, kill + resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from prism.cli import main
from prism.config import load_config
from prism.io import read_jsonl
from prism.pipeline import run_pipeline

pytestmark = pytest.mark.slow


def _ids(path, key):
    return [r[key] for r in read_jsonl(path)]


def test_stages_1_to_3_write_records_and_a_manifest_that_matches(tmp_path, embedded):
    cfg = load_config("micro")
    run = run_pipeline(cfg, tmp_path / "run", until="verdicts", quiet=True, model=embedded)
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    queries = read_jsonl(tmp_path / "run" / "queries.jsonl")
    answers = read_jsonl(tmp_path / "run" / "answers.jsonl")
    verdicts = read_jsonl(tmp_path / "run" / "verdicts.jsonl")
    assert len(queries) == 6  # 2 personas x 3
    assert m["stages"]["queries"]["count"] == len(queries)
    assert m["stages"]["answers"]["count"] == len(answers) == len(queries)
    assert m["stages"]["verdicts"]["count"] == len(verdicts) == len(queries)
    assert m["stages"]["verdicts"]["distill"] == sum(v["label"] for v in verdicts)
    assert m["stages"]["gate"]["status"] == "pending"
    assert m["model"]["kind"] == "embedded" and m["model"]["gguf_sha256"]
    assert m["versions"]["torch"] and m["config"]["queries"]["n_per_persona"] == 3
    assert {q["persona"] for q in queries} == {"math", "writing"}
    assert len({q["text"].lower() for q in queries}) == len(queries)
    for v in verdicts:
        assert v["persona_first"] in ("A", "B", "TIE") and v["persona_second"] in ("A", "B", "TIE")
        assert v["label"] == int(v["persona_first"] == "A" and v["persona_second"] == "B")
    check = json.loads((tmp_path / "run" / "judge_check.json").read_text())
    assert check["judge"] == "likelihood" and check["pairs"] == 4
    assert m["stages"]["verdicts"]["judge_check"]["accuracy"] == check["accuracy"]
    # A finished run does nothing when run again: no output changes (run.lock only records the
    # pid of whoever holds it, so a second `prism run` can name it).
    def outputs():
        return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir() if p.name != "run.lock"}

    before = outputs()
    run_pipeline(cfg, tmp_path / "run", until="verdicts", quiet=True, model=embedded)
    assert outputs() == before and len(before) >= 5
    assert run.status("verdicts") == "done"


def test_resuming_with_other_settings_is_refused(tmp_path, embedded, capsys):
    run_pipeline(load_config("micro"), tmp_path / "run", until="queries", quiet=True, model=embedded)
    before = (tmp_path / "run" / "manifest.json").read_bytes()
    code = main(["run", "--preset", "micro", "--n", "4", "--until", "queries", "--out", str(tmp_path / "run"),
                 "--quiet"])
    # Every error exits with 2: the message must be this one, naming the setting and both values.
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"prism: error: {tmp_path / 'run'} was started with different settings "
                   "(queries.n_per_persona: 3 -> 4); resume it with the same settings or choose a new --out")
    assert (tmp_path / "run" / "manifest.json").read_bytes() == before  # the run is left as it was
    # A speed setting may differ: the same run resumes (nothing left to do) with another batch size.
    assert main(["run", "--preset", "micro", "--batch-size", "3", "--until", "queries", "--out",
                 str(tmp_path / "run"), "--quiet"]) == 0
    # So may the settings of a stage that has not begun (stage 5 here), and the manifest keeps them.
    (tmp_path / "later.yaml").write_text("distill: {epochs: 7}\njudge: {sanity_pairs: 3}\n")
    assert main(["run", "--preset", "micro", "--config", str(tmp_path / "later.yaml"), "--until", "queries",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    config = json.loads((tmp_path / "run" / "manifest.json").read_text())["config"]
    assert config["distill"]["epochs"] == 7 and config["judge"]["sanity_pairs"] == 3
    assert main(["run", "--preset", "micro", "--config", str(tmp_path / "later.yaml"), "--n", "4", "--until",
                 "queries", "--out", str(tmp_path / "run"), "--quiet"]) == 2  # not a finished stage's
    # Without --preset a resumed run starts from its own settings: a file changes what it names only.
    (tmp_path / "gate.yaml").write_text("gate: {l2: 3.0}\n")
    assert main(["run", "--config", str(tmp_path / "gate.yaml"), "--until", "queries", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
    config = json.loads((tmp_path / "run" / "manifest.json").read_text())["config"]
    assert config["gate"]["l2"] == 3.0 and config["distill"]["epochs"] == 7 and config["persona_length"] == "minimal"


def test_kill_mid_stage_then_resume_without_redoing_finished_items(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "prism.cli", "run", "--preset", "micro", "--n", "4", "--batch-size", "2",
           "--until", "verdicts", "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answers = out / "answers.jsonl"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:  # kill as soon as stage 2 has saved some but not all items
            if answers.exists() and len(read_jsonl(answers, repair=False)) >= 2:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    manifest = json.loads((out / "manifest.json").read_text())  # still valid JSON after the kill
    assert manifest["stages"]["queries"]["status"] == "done"
    assert manifest["stages"]["answers"]["status"] == "running"
    saved = answers.read_bytes()
    n_saved = len(read_jsonl(answers))
    assert 2 <= n_saved < 8
    queries_before = (out / "queries.jsonl").read_bytes()

    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    assert (out / "queries.jsonl").read_bytes() == queries_before  # stage 1 not redone
    after = answers.read_bytes()
    assert after.startswith(saved[: saved.rfind(b"\n") + 1])  # finished answers kept as they were
    ids = _ids(answers, "query_id")
    assert len(ids) == len(set(ids)) == 8  # nothing answered twice, nothing missing
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in ("queries", "answers", "verdicts"))
    assert manifest["stages"]["answers"]["count"] == 8
    assert len(read_jsonl(out / "verdicts.jsonl")) == 8
