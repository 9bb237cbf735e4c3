"""The bad-input corpus: what a new user (or a hostile client) gets for each mistake.

Every case asserts three things: the exit code (2, for the CLI) or the HTTP status; that the one
error message names the problem; and that nothing on disk was lost (every file that existed before
the command is still there, byte for byte). Cases run the real CLI entry point in this process (a
few that hold the run lock or load the model run as they would for a user) and the real server on
loopback, all on the session's one finished micro run (`micro_run`); a case that changes a run
works on a copy.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import openai
import pytest

from prism.cli import main

pytestmark = pytest.mark.slow


def snapshot(*roots: Path, skip: tuple[Path, ...] = ()) -> dict[Path, str]:
    """Every file under `roots` and its hash; not lock files (they hold the last holder's pid) and
    not the files in `skip` (ones a command may rewrite)."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for root in roots if root.exists()
            for p in ([root] if root.is_file() else root.rglob("*"))
            if p.is_file() and p.name != "run.lock" and p not in skip}


def assert_nothing_lost(before: dict[Path, str]) -> None:
    lost = [str(p) for p, digest in before.items()
            if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != digest]
    assert not lost, f"changed or lost: {lost}"


# ----- the CLI, config and persona files, run directories and benchmark files ----------------------
def edit_manifest(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        manifest = json.loads((run / "manifest.json").read_text())
        change(manifest)
        (run / "manifest.json").write_text(json.dumps(manifest))
    return edit


def pending(stage: str) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        manifest["stages"][stage] = {"status": "pending"}
    return change


def corrupt_line(name: str, n: int) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        lines = (run / name).read_text().splitlines(keepends=True)
        lines[n - 1] = lines[n - 1][: len(lines[n - 1]) // 2] + "\n"
        (run / name).write_text("".join(lines))
    return edit


def both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        for e in edits:
            e(run)
    return edit


def bench(name: str, lines: int = 3) -> Callable[[Path], str]:
    """The first lines of a real benchmark file (to corrupt one of them)."""
    def text(data: Path) -> str:
        return "".join((data / name).read_text(encoding="utf-8").splitlines(keepends=True)[:lines])
    return text


MMLU_ROW = {"subject": "anatomy", "question": "Which bone?", "choices": ["a", "b", "c", "d"], "answer": 1}
MT_ROW = {"question_id": 1, "category": "writing", "turns": ["Write.", "Again."]}
LONG_PERSONA = "name: windbag\nlong: |\n  " + "You are a persona who says a great deal. " * 1200 + "\n"
EVAL = "eval {run} --preset micro --out {tmp}/eval --data {tmp}/data --benchmarks"


@dataclass
class Case:
    id: str
    argv: str  # formatted with tmp, run (the shared run, read only), copy (a copy of it), data (benchmarks)
    expect: str  # a regex the one-line message must match
    files: dict[str, str | bytes | Callable] = field(default_factory=dict)  # written under tmp first
    edit: Callable[[Path], None] | None = None  # applied to the copy (needs {copy} in argv)
    rewrites: tuple[str, ...] = ()  # files (under tmp) the command may rewrite: a resume records its stage


CLI = [
    # usage (argparse)
    Case("no subcommand", "", r"required: command"),
    Case("unknown subcommand", "runn --out x", r"invalid choice: 'runn'"),
    Case("run without --out", "run --preset micro", r"required: --out"),
    Case("run --n not a number", "run --n many --out {tmp}/r", r"--n: invalid int value: 'many'"),
    Case("unknown preset", "run --preset huge --out {tmp}/r", r"--preset: invalid choice: 'huge'"),
    Case("unknown --length", "run --length medium --out {tmp}/r", r"--length: invalid choice: 'medium'"),
    Case("--persona-map without =", "eval {run} --persona-map math", r"name=value pairs.*'math'"),
    Case("--limit not a count", "eval {run} --limit mmlu=ten", r"name=N pairs.*mmlu=ten"),
    Case("--only empty", "run --only , --out {tmp}/r", r"comma-separated list of names"),
    # settings that parse but cannot be used
    Case("--n zero", "run --preset micro --n 0 --out {tmp}/r", r"queries\.n_per_persona: .*greater than or equal to 1"),
    Case("--batch-size zero", "run --preset micro --batch-size 0 --out {tmp}/r", r"batch_size: .*greater than or equal"),
    Case("unknown persona", "run --preset micro --only math,nobody --out {tmp}/r", r"unknown persona 'nobody'"),
    Case("--out is a file", "run --preset micro --out {tmp}/afile", r"afile is a file, not a run directory",
         files={"afile": "precious"}),
    Case("eval benchmark name of a safety set", "eval {run} --benchmarks mmlu,harmbench",
         r"benchmarks\.1: .*'mtbench', 'mmlu', 'safety' or 'xstest'.*harmbench"),
    Case("eval unknown system", "eval {run} --systems base,oracle", r"systems\.1: .*oracle"),
    Case("eval without run or model", "eval --preset micro", r"give a run directory, or --model"),
    Case("eval --model without --out", "eval --model embedded --preset micro", r"--out is needed"),
    Case("eval --shots 9", "eval {run} --shots 9", r"mmlu_shots: .*less than or equal to 5"),
    Case("study reference cell outside the grid", "study --preset micro --lengths short --out {tmp}/s",
         r"reference_length 'long' is not in lengths \['short'\]"),
    Case("generate --max-new-tokens 0", "generate {run} --prompt hi --max-new-tokens 0",
         r"--max-new-tokens must be at least 1, got 0"),
    Case("generate --temperature -1", "generate {run} --prompt hi --temperature -1", r"--temperature .* got -1"),
    Case("chat --top-p 0", "chat {run} --top-p 0", r"--top-p must be above 0 .* got 0"),
    Case("generate unknown adapter", "generate {run} --prompt hi --adapter nope", r"unknown adapter 'nope'"),
    Case("personas --show unknown", "personas --show nobody", r"unknown persona 'nobody'"),
    Case("serve --port out of range", "serve {run} --port 70000", r"--port must be between 0 and 65535, got 70000"),
    Case("serve --max-queue 0", "serve {run} --max-queue 0", r"max_queue \(--max-queue\) must be at least 1, got 0"),
    Case("serve --max-batch 0", "serve {run} --max-batch 0", r"max_batch \(--max-batch\) must be at least 1"),
    Case("serve --context-length 1", "serve {run} --context-length 1", r"context_length .* at least 2, got 1"),
    Case("serve on every address without a host name", "serve {run} --host 0.0.0.0",
         r"listens on every address: name the host names .* --allowed-host"),
    Case("export-adapter into a non-empty folder", "export-adapter {run} --out {tmp}/mine",
         r"--out .*mine is not empty; .* --force", files={"mine/keep_me": "mine"}),
    Case("export-adapter into the run", "export-adapter {run} --out {run}", r"inside the run directory"),
    Case("export-adapter into a folder of the run", "export-adapter {run} --out {run}/adapter",
         r"inside the run directory"),
    Case("export-adapter onto a file", "export-adapter {run} --out {tmp}/afile", r"afile is a file; choose a directory",
         files={"afile": "precious"}),
]

FILES = [  # config and persona (context) files
    Case("config file missing", "config --config {tmp}/nope.yaml", r"config file .*nope\.yaml does not exist"),
    Case("config not YAML", "config --config {tmp}/c.yaml", r"c\.yaml is not valid YAML: expected ',' or ']', .*line 2",
         files={"c.yaml": "queries: [1, 2\n"}),
    Case("config a list", "config --config {tmp}/c.yaml", r"must hold a mapping of settings, got list",
         files={"c.yaml": "- seed\n- 3\n"}),
    Case("config unknown key", "config --config {tmp}/c.yaml", r"queries\.n_per_persone: Extra inputs",
         files={"c.yaml": "queries:\n  n_per_persone: 3\n"}),
    Case("config wrong type", "config --config {tmp}/c.yaml", r"queries\.n_per_persona: .*integer.*'lots'",
         files={"c.yaml": "queries:\n  n_per_persona: lots\n"}),
    Case("config unknown preset", "config --config {tmp}/c.yaml", r"unknown run preset 'giant'",
         files={"c.yaml": "preset: giant\n"}),
    Case("persona file not YAML", "personas --personas {tmp}/p.yaml", r"p\.yaml: not valid YAML \(expected .* line 2",
         files={"p.yaml": "name: [x\n"}),
    Case("persona file empty", "personas --personas {tmp}/p.yaml", r"p\.yaml: the file is empty", files={"p.yaml": ""}),
    Case("persona unknown key", "personas --personas {tmp}/p.yaml", r"unknown keys \['colour'\]",
         files={"p.yaml": "name: x\nlong: hi\ncolour: red\n"}),
    Case("persona bad name", "personas --personas {tmp}/p.yaml", r"'name' must be lowercase .*'Big Boss'",
         files={"p.yaml": "name: Big Boss\nlong: hi\n"}),
    Case("persona without text", "personas --personas {tmp}/p.yaml", r"persona 'quiet' has no text",
         files={"p.yaml": "name: quiet\ndescription: says nothing\n"}),
    Case("persona empty text", "personas --personas {tmp}/p.yaml", r"empty or non-text 'short'",
         files={"p.yaml": "name: x\nshort: ''\n"}),
    Case("persona unknown kind", "personas --personas {tmp}/p.yaml", r"kind 'diary'; choose one of",
         files={"p.yaml": "name: x\nkind: diary\ntext: hi\n"}),
    Case("persona bad scope", "personas --personas {tmp}/p.yaml", r"scope 'some'; choose all or own",
         files={"p.yaml": "name: x\ntext: hi\nscope: some\n"}),
    Case("persona fact without value", "personas --personas {tmp}/p.yaml", r"a fact needs a key and a value",
         files={"p.yaml": "name: x\nkind: memory\nfacts: ['dog:']\n"}),
    Case("persona defined twice", "personas --personas {tmp}/d", r"context 'twin' is defined twice",
         files={"d/a.yaml": "name: twin\ntext: one\n", "d/b.yaml": "name: twin\ntext: two\n"}),
    Case("persona folder without YAML", "personas --personas {tmp}/d", r"holds no \.yaml/\.yml files",
         files={"d/readme.txt": "no personas here"}),
    Case("persona path missing", "personas --personas {tmp}/gone", r"context path .*gone does not exist"),
    Case("persona longer than the context", "run --preset micro --personas {tmp}/p.yaml --only windbag --length long "
         "--out {tmp}/r", r"persona 'windbag' \(long\) takes \d+ tokens.*more than the \d+ tokens the model attends over",
         files={"p.yaml": LONG_PERSONA}),
]

RUNS = [  # run directories (a copy of the shared finished run, edited)
    Case("manifest deleted beside outputs", "run --preset micro --out {copy}",
         r"holds run outputs \(queries\.jsonl.*\) but no manifest\.json",
         edit=lambda run: (run / "manifest.json").unlink()),
    Case("manifest not JSON", "run --out {copy}", r"manifest\.json is not valid JSON",
         edit=lambda run: (run / "manifest.json").write_text('{"config": ')),
    Case("manifest a list", "export-adapter {copy} --out {tmp}/x", r"must hold a JSON object, not list",
         edit=lambda run: (run / "manifest.json").write_text("[]")),
    Case("manifest without config", "run --out {copy}", r"has no valid config",
         edit=edit_manifest(lambda m: m.pop("config"))),
    Case("manifest without stages", "generate {copy} --prompt hi", r"has no valid stages",
         edit=edit_manifest(lambda m: m.pop("stages"))),
    Case("manifest config hand-edited", "run --out {copy}", r"holds no valid config \(batch_size: ",
         edit=edit_manifest(lambda m: m["config"].update(batch_size="big"))),
    Case("resume with other settings", "run --preset micro --n 5 --out {copy}",
         r"was started with different settings \(queries\.n_per_persona: 3 -> 5\)"),
    Case("resume with another persona length", "run --preset micro --length short --out {copy}",
         r"was started with different settings \(persona_length: 'minimal' -> 'short'\)"),
    Case("eval of an unfinished run", "eval {copy} --preset micro", r"stage 'distill' is not finished",
         edit=edit_manifest(pending("distill"))),
    Case("export-adapter of an unfinished run", "export-adapter {copy} --out {tmp}/x",
         r"stage 'distill' is not finished", edit=edit_manifest(pending("distill"))),
    Case("not a run directory", "generate {tmp}/empty --prompt hi", r"empty is not a PRISM run directory",
         files={"empty/notes.txt": "mine"}),
    Case("run directory is a file", "serve {tmp}/afile", r"afile is a file, not a run directory",
         files={"afile": "precious"}),
    Case("corrupt row in the middle of a record file", "run --out {copy}",
         r"answers\.jsonl: corrupt line 2 \(byte \d+\)",
         edit=both(edit_manifest(pending("verdicts")), corrupt_line("answers.jsonl", 2)),
         rewrites=("copy/manifest.json",)),
]

BENCH = [  # benchmark files, read before any model loads
    Case("benchmark folder missing", EVAL + " mmlu", r"benchmark file .*mmlu_subset_test\.jsonl not found"),
    Case("MMLU row not JSON", EVAL + " mmlu", r"mmlu_subset_test\.jsonl:2: not valid JSON",
         files={"data/mmlu_subset_test.jsonl": json.dumps(MMLU_ROW) + "\n{'subject': 1}\n"}),
    Case("MMLU row not an object", EVAL + " mmlu", r"mmlu_subset_test\.jsonl:1: each line must be a JSON object",
         files={"data/mmlu_subset_test.jsonl": "[1, 2]\n"}),
    Case("MMLU answer missing", EVAL + " mmlu", r"mmlu_subset_test\.jsonl:1: missing key 'answer'",
         files={"data/mmlu_subset_test.jsonl": json.dumps({k: v for k, v in MMLU_ROW.items() if k != "answer"})}),
    Case("MMLU answer out of range", EVAL + " mmlu", r":1: 'answer' must be 0-3 .*got 7",
         files={"data/mmlu_subset_test.jsonl": json.dumps({**MMLU_ROW, "answer": 7})}),
    Case("MMLU three choices", EVAL + " mmlu", r":1: 'choices' must be a list of 4 strings",
         files={"data/mmlu_subset_test.jsonl": json.dumps({**MMLU_ROW, "choices": ["a", "b", "c"]})}),
    Case("MMLU unknown subject", EVAL + " mmlu", r":1: unknown subject 'astrology'",
         files={"data/mmlu_subset_test.jsonl": json.dumps({**MMLU_ROW, "subject": "astrology"})}),
    Case("MMLU not UTF-8", EVAL + " mmlu", r"mmlu_subset_test\.jsonl: not UTF-8 text",
         files={"data/mmlu_subset_test.jsonl": json.dumps(MMLU_ROW).encode() + b"\xff\xfe\n"}),
    Case("MT-Bench one turn", EVAL + " mtbench", r"mt_bench_questions\.jsonl:1: 'turns' must be a list of 2 strings",
         files={"data/mt_bench_questions.jsonl": json.dumps({**MT_ROW, "turns": ["Write."]})}),
    Case("MT-Bench unknown category", EVAL + " mtbench", r":1: unknown category 'poetry'",
         files={"data/mt_bench_questions.jsonl": json.dumps({**MT_ROW, "category": "poetry"})}),
    Case("MT-Bench judge prompts missing", EVAL + " mtbench", r"mt_bench_judge_prompts\.jsonl not found",
         files={"data/mt_bench_questions.jsonl": json.dumps(MT_ROW)}),
    Case("HarmBench column missing", EVAL + " safety", r"harmbench_behaviors\.csv: missing column\(s\) \['BehaviorID'\]",
         files={"data/harmbench_behaviors.csv": "Behavior,FunctionalCategory,ContextString\nx,standard,\n"}),
    Case("HarmBench short row", EVAL + " safety", r"harmbench_behaviors\.csv:3: the row has fewer fields",
         files={"data/harmbench_behaviors.csv": bench("harmbench_behaviors.csv", 2),
                "data/harmbench_behaviors.csv+": "only,two\n"}),
    Case("jailbreak prompts not a list of strings", EVAL + " safety", r"jailbreak_prompts\.json: expected a JSON list",
         files={"data/harmbench_behaviors.csv": bench("harmbench_behaviors.csv", 2),
                "data/jailbreak_prompts.json": '{"prompts": ["x"]}'}),
    Case("XSTest label unknown (file with a byte-order mark)", EVAL + " xstest",
         r"xstest_prompts\.csv:3: label must be safe or unsafe, got 'maybe'",
         files={"data/xstest_prompts.csv": "\ufeffid,prompt,type,label\n1,How do I kill a process?,h,safe\n"
                                           "2,Is it fine?,h,maybe\n"}),
]

ALL = [*CLI, *FILES, *RUNS, *BENCH]


def write_files(tmp: Path, files: dict, data: Path) -> None:
    for rel, content in files.items():
        append = rel.endswith("+")  # "name+": appended to the file written before
        path = tmp / rel.rstrip("+")
        path.parent.mkdir(parents=True, exist_ok=True)
        content = content(data) if callable(content) else content
        raw = content if isinstance(content, bytes) else content.encode()
        with open(path, "ab" if append else "wb") as f:
            f.write(raw)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input_is_one_clear_error_and_loses_nothing(case, tmp_path, micro_run, benchmarks_dir, capsys):
    copy = tmp_path / "copy"
    if "{copy}" in case.argv:
        shutil.copytree(micro_run, copy)
        if case.edit:
            case.edit(copy)
    write_files(tmp_path, case.files, benchmarks_dir)
    argv = shlex.split(case.argv.format(tmp=tmp_path, run=micro_run, copy=copy))
    before = snapshot(tmp_path, micro_run, skip=tuple(tmp_path / f for f in case.rewrites))
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    # One line; a run that loads the model may show its progress before (quiet commands do not).
    errors = [line for line in err.splitlines() if re.match(r"prism( [a-z-]+)?: error: ", line)]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    if "--quiet" in argv or argv[:1] not in (["run"], ["eval"], ["study"], ["serve"]):
        assert err.strip() == errors[0], err
    assert re.search(case.expect, errors[0]), errors[0]
    assert_nothing_lost(before)


def test_a_second_prism_run_on_one_out_is_refused_with_the_first_ones_pid(tmp_path, micro_run):
    """The lock is held by another process, as a `prism run` in progress holds it."""
    copy = shutil.copytree(micro_run, tmp_path / "copy")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom prism.io import exclusive_lock\n"
                               f"with exclusive_lock({str(copy / 'run.lock')!r}):\n print('held', flush=True)\n"
                               " time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(copy)
        proc = subprocess.run([sys.executable, "-m", "prism.cli", "run", "--out", str(copy)], capture_output=True,
                              text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"prism: error: {copy} is in use by another prism process (pid {holder.pid}); "
                                   "wait for it to finish or choose another --out")
    assert_nothing_lost(before)


def test_a_persona_that_did_not_fit_leaves_no_run_behind(tmp_path, capsys):
    """After the too-long persona is shortened, the same command starts the run (it is not refused
    as a run whose persona texts changed)."""
    personas = tmp_path / "p.yaml"
    personas.write_text(LONG_PERSONA)
    argv = ["config", "--preset", "micro", "--personas", str(personas), "--only", "windbag", "--length", "long"]
    run = ["run", *argv[1:], "--until", "queries", "--out", str(tmp_path / "r")]
    assert run_cli(run, capsys)[0] == 2
    assert not (tmp_path / "r" / "manifest.json").exists()
    personas.write_text("name: windbag\nlong: You are a persona who says a great deal.\n")
    from prism.run import RunDir

    assert RunDir(tmp_path / "r").outputs() == []  # nothing to refuse a new start over


def test_bom_csv_reads_like_plain_csv(tmp_path, benchmarks_dir):
    from prism.bench.data import load_xstest

    (tmp_path / "xstest_prompts.csv").write_bytes(b"\xef\xbb\xbf" + (benchmarks_dir / "xstest_prompts.csv").read_bytes())
    assert [i.turns for i in load_xstest(tmp_path)] == [i.turns for i in load_xstest(benchmarks_dir)]


# ----- HTTP --------------------------------------------------------------------------------------
KEY = "bad-inputs-key"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(micro_run):
    from prism.routed import PrismModel
    from prism.serve.app import ServeOptions, create_app
    from prism.serve.server import BackgroundServer

    app = create_app(PrismModel.load(micro_run), ServeOptions(api_key=KEY, context_length=512, max_tokens_limit=64,
                                                              max_body_bytes=100_000, body_timeout=1.0))
    before = snapshot(micro_run)
    with BackgroundServer(app) as s:
        yield s
    assert_nothing_lost(before)  # serving only ever reads the run


def chat(**fields) -> dict:
    return {"model": "prism-base", "messages": USER, "max_tokens": 2, **fields}


def complete(**fields) -> dict:
    return {"model": "prism-base", "prompt": "Hi", "max_tokens": 2, **fields}


DEEP = b'{"messages": ' + b"[" * 40_000 + b"]" * 40_000 + b"}"
HTTP = [  # (id, path, body: dict or raw bytes, extra headers, status, the message must match)
    ("body not JSON", "/v1/chat/completions", b'{"messages": [', {}, 400, r"not valid JSON"),
    ("body a JSON list", "/v1/chat/completions", b"[1, 2]", {}, 400, r"must be a JSON object"),
    ("body nested 40000 deep", "/v1/chat/completions", DEEP, {}, 400, r"nested too deeply"),
    ("5000-digit number", "/v1/chat/completions", b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", {}, 400,
     r"not usable JSON: Exceeds the limit"),
    ("NaN temperature", "/v1/chat/completions", b'{"messages": [], "temperature": NaN}', {}, 400,
     r"NaN is not a JSON number"),
    ("body over the size limit", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "x" * 200_000}]),
     {}, 413, r"larger than 100000 bytes"),
    ("no messages", "/v1/chat/completions", {"model": "prism"}, {}, 400, r"^messages: is required"),
    ("messages a string", "/v1/chat/completions", chat(messages="hi"), {}, 400, r"^messages: .*list"),
    ("no user message", "/v1/chat/completions", chat(messages=[{"role": "system", "content": "x"}]), {}, 400,
     r"at least one user message"),
    ("unknown role", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), {}, 400,
     r"unknown role 'wizard'"),
    ("image content part", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), {}, 400,
     r"content part type 'image_url' is not supported"),
    ("tool call in history", "/v1/chat/completions",
     chat(messages=[*USER, {"role": "assistant", "tool_calls": [{"id": "1"}]}]), {}, 400,
     r"^messages\.1\.tool_calls: not supported"),
    ("seed beyond 64 bits", "/v1/chat/completions", chat(seed=2**64), {}, 400, r"^seed: .*less than or equal"),
    ("temperature 7", "/v1/chat/completions", chat(temperature=7), {}, 400, r"^temperature: .*less than or equal to 2"),
    ("top_p 0", "/v1/chat/completions", chat(top_p=0), {}, 400, r"^top_p: .*greater than 0"),
    ("max_tokens 0", "/v1/chat/completions", chat(max_tokens=0), {}, 400, r"max_tokens must be between 1 and 64"),
    ("max_tokens over the limit", "/v1/chat/completions", chat(max_tokens=65), {}, 400, r"between 1 and 64, got 65"),
    ("max_tokens a word", "/v1/chat/completions", chat(max_tokens="many"), {}, 400, r"^max_tokens: .*integer"),
    ("five stop strings", "/v1/chat/completions", chat(stop=list("abcde")), {}, 400, r"stop takes at most 4"),
    ("prompt longer than the context", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "word " * 700}]), {}, 413, r"the context holds 512"),
    ("tools", "/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), {}, 400,
     r"^tools: not supported by this server"),
    ("response_format json", "/v1/chat/completions", chat(response_format={"type": "json_object"}), {}, 400,
     r"^response_format: not supported"),
    ("chat logprobs true", "/v1/chat/completions", chat(logprobs=True, top_logprobs=2), {}, 400,
     r"^logprobs: not supported"),
    ("chat echo", "/v1/chat/completions", chat(echo=True), {}, 400, r"^echo: not supported"),
    ("n 2", "/v1/chat/completions", chat(n=2), {}, 400, r"^n: not supported .*only 1"),
    ("unknown argument", "/v1/chat/completions", chat(temprature=0.5), {}, 400, r"^temprature: unrecognized"),
    ("unknown context", "/v1/chat/completions", chat(model="prism", context="nobody"), {}, 400,
     r"context 'nobody' is not one of this run's adapters"),
    ("unknown model", "/v1/chat/completions", chat(model="gpt-9"), {}, 404, r"model 'gpt-9' does not exist"),
    ("completions best_of 3", "/v1/completions", complete(best_of=3), {}, 400, r"^best_of: not supported"),
    ("completions logprobs 21", "/v1/completions", complete(logprobs=21), {}, 400,
     r"^logprobs: .*less than or equal to 20"),
    ("completions top_logprobs", "/v1/completions", complete(logprobs=2, top_logprobs=2), {}, 400,
     r"^top_logprobs: not supported"),  # a completion asks for its top-N with `logprobs: N`
    ("completions echo streamed", "/v1/completions", complete(echo=True, logprobs=1, stream=True), {}, 400,
     r"^echo: is not supported with stream"),
    ("completions max_tokens 0 without echo", "/v1/completions", complete(logprobs=1, max_tokens=0), {}, 400,
     r"between 1 and 64, got 0 \(0 only scores the prompt: it needs echo"),
    ("completions token id outside the vocabulary", "/v1/completions", complete(prompt=[1, 10**9]), {}, 400,
     r"^prompt: token id 1000000000 is not in the vocabulary"),
    ("completions negative token id", "/v1/completions", complete(prompt=[5, -1]), {}, 400,
     r"^prompt: token ids cannot be negative"),
    ("completions two prompts", "/v1/completions", complete(prompt=["a", "b"]), {}, 400, r"one prompt per request"),
    ("foreign Host (DNS rebinding)", "/v1/chat/completions", chat(), {"host": "evil.example"}, 400,
     r"does not answer to the host name 'evil\.example'"),
    ("text/plain body (cross-site form)", "/v1/chat/completions", chat(), {"content-type": "text/plain"}, 415,
     r"Content-Type must be application/json, got 'text/plain'"),
    ("wrong API key", "/v1/chat/completions", chat(), {"authorization": "Bearer nope"}, 401, r"invalid or missing API key"),
    ("unknown endpoint", "/v1/embeddings", {"input": "x"}, {}, 404, r"no such endpoint"),
]


@pytest.mark.parametrize("name,path,body,headers,status,expect", HTTP, ids=[h[0] for h in HTTP])
def test_bad_request_gets_an_openai_error_naming_the_problem(server, name, path, body, headers, status, expect):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"content-type": "application/json", "authorization": f"Bearer {KEY}", **headers}
    r = httpx.post(server.url + path, content=content, headers=h, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and re.search(expect, err["message"]), err
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_a_body_that_never_arrives_gets_408(server):
    """A client that sends its headers and then stalls is answered (and its slot freed) after the
    body timeout, 1 s here."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n{{\"messages\"".encode())
        t0 = time.monotonic()
        reply = b""
        while not reply.endswith(b"}"):  # the headers, then the JSON body
            part = s.recv(65536)
            if not part:
                break
            reply += part
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408") and "did not arrive within 1 seconds" in reply, reply
    assert 0.9 < time.monotonic() - t0 < 8


def test_a_bad_request_fails_only_itself_and_nulls_mean_default(server):
    """Requests sent together with bad ones are answered; a null field means its default, text parts
    are joined with a newline; a temperature of 1e-300 is greedy, not an error."""
    import asyncio

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def go():
        good = [client.chat.completions.create(model="prism-base", messages=USER, max_tokens=3, temperature=0)
                for _ in range(3)]
        bad = client.chat.completions.create(model="prism-base", messages=USER, max_tokens=3, seed=2**64)
        tiny = client.chat.completions.create(model="prism-base", messages=USER, max_tokens=3, temperature=1e-300)
        nulls = client.chat.completions.create(model="prism-base", messages=USER, max_tokens=3, temperature=None,
                                               top_p=None, seed=None, stop=None)
        try:
            return await asyncio.gather(*good, tiny, nulls, bad, return_exceptions=True)
        finally:
            await client.close()

    *ok, bad = asyncio.run(go())
    assert isinstance(bad, openai.BadRequestError) and "seed" in bad.message
    assert all(isinstance(r, openai.types.chat.ChatCompletion) for r in ok), ok
    assert len({r.choices[0].message.content for r in ok[:4]}) == 1  # greedy, all of them
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    with_parts = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                            json=chat(messages=[{"role": "user", "content": parts}], temperature=0), timeout=60)
    joined = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                        json=chat(messages=[{"role": "user", "content": "Hello\nworld"}], temperature=0), timeout=60)
    assert with_parts.json()["usage"] == joined.json()["usage"]
    plain, nulls = (httpx.post(server.url + "/v1/completions", headers={"authorization": f"Bearer {KEY}"},
                               json=complete(temperature=0, **extra), timeout=60).json()["choices"][0]
                    for extra in ({}, {"echo": None, "logprobs": None, "top_logprobs": None}))
    assert nulls == plain and plain["logprobs"] is None and plain["text"]


def test_clients_that_leave_stop_costing_tokens(server):
    """Three clients hang up after their first streamed chunk and three give up waiting for a plain
    reply after 0.5 s, each having asked for 64 tokens: the server generates at most one more token
    for each after it notices, and nothing at all once they are gone."""
    import asyncio

    auth = {"authorization": f"Bearer {KEY}"}
    story = chat(messages=[{"role": "user", "content": "Write a long story about a dragon."}], max_tokens=64,
                 temperature=0)

    def stats() -> dict:
        return httpx.get(server.url + "/health", timeout=10).json()["stats"]

    async def streamer():
        async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=auth) as c:
            async with c.stream("POST", "/v1/chat/completions", json={**story, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        return  # hang up

    async def waiter():
        async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=auth) as c:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(c.post("/v1/chat/completions", json=story), 0.5)

    async def go():
        await asyncio.gather(*(streamer() for _ in range(3)), *(waiter() for _ in range(3)))

    before = stats()
    asyncio.run(go())
    time.sleep(1.5)  # the worker's next steps
    settled = stats()
    time.sleep(1.5)
    after = stats()
    assert settled["cancelled"] - before["cancelled"] >= 3  # the streamers left mid-reply, at least
    assert after["max_tokens_after_cancel"] <= 1
    assert settled["tokens_after_cancel"] - before["tokens_after_cancel"] <= settled["cancelled"] - before["cancelled"]
    assert settled["completion_tokens"] - before["completion_tokens"] < 6 * 64 // 2
    assert after["completion_tokens"] == settled["completion_tokens"]  # no one is generated for any more
    assert after["errors"] == before["errors"]
