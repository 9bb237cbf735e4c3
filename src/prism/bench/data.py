"""Benchmark loaders. Each takes a local directory (the files named in its README), a limit and a
seed; a limit draws a sample stratified by category, so a quick run still covers every category.
Also the benchmark categories and the expert persona matched to each.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from prism.errors import DataError

MMLU_CATEGORIES_FILE = Path(__file__).with_name("mmlu_categories.json")
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
MMLU_SUPER = ("stem", "humanities", "social_sciences", "other")
SAFETY_SETS = ("harmbench", "jailbreak", "pku")
# Which persona is the expert for each category (MT-Bench categories map to themselves).
DEFAULT_PERSONA_MAP = {
    "stem": "stem", "humanities": "humanities", "social_sciences": "humanities", "other": "helpful",
    "harmbench": "safety_monitor", "jailbreak": "safety_monitor", "pku": "safety_monitor",
    "xstest_safe": "safety_monitor", "xstest_unsafe": "safety_monitor",
    "writing": "writing", "roleplay": "roleplay", "reasoning": "reasoning", "math": "math", "coding": "coding",
    "extraction": "extraction",
}


@dataclass
class Item:
    """One evaluation item. `turns` are user messages; `category` drives the persona match."""

    id: str
    benchmark: str
    category: str
    turns: list[str]
    choices: list[str] = field(default_factory=list)  # MMLU
    answer: int | None = None  # MMLU gold index
    reference: list[str] = field(default_factory=list)  # MT-Bench reference answers
    label: str | None = None  # XSTest safe/unsafe
    subject: str | None = None


def default_dir() -> Path:
    env = os.environ.get("PRISM_BENCHMARKS")
    if env:
        return Path(env)
    here = Path.cwd()
    for base in (here, *here.parents):
        candidate = base / "shared" / "benchmarks"
        if candidate.is_dir():
            return candidate
        candidate = base.parent / "shared" / "benchmarks"
        if candidate.is_dir():
            return candidate
    return here / "benchmarks-data"


def _file(directory: str | Path, name: str) -> Path:
    path = Path(directory) / name
    if not path.is_file():
        raise DataError(f"benchmark file {path} not found (point --data at the folder holding {name})")
    return path


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (saved by Excel) is not data
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl(path: Path) -> list[tuple[str, dict]]:
    """(where, row) for each row: `where` names the file and line for error messages."""
    rows = []
    for i, line in enumerate(_text(path).splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: each line must be a JSON object")
            rows.append((f"{path}:{i}", row))
    return rows


def _csv(path: Path, columns: tuple[str, ...]) -> list[tuple[str, dict]]:
    """(where, row) for each row of a CSV file that has every one of `columns`."""
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the header has {reader.fieldnames}")
    rows = [(f"{path}:{i}", r) for i, r in enumerate(reader, 2)]
    for where, r in rows:
        if any(r[c] is None for c in columns):
            raise DataError(f"{where}: the row has fewer fields than the header")
    return rows


def _need(where: str, row: dict, **kinds) -> None:
    """Each named key present with a value of its kind (a type or tuple of types)."""
    for key, kind in kinds.items():
        if key not in row:
            raise DataError(f"{where}: missing key {key!r}")
        if not isinstance(row[key], kind) or isinstance(row[key], bool):
            raise DataError(f"{where}: {key!r} has the wrong type ({type(row[key]).__name__})")


def _strings(where: str, row: dict, key: str, n: int | None = None) -> list[str]:
    _need(where, row, **{key: list})
    values = row[key]
    if not all(isinstance(v, str) for v in values) or (n is not None and len(values) != n):
        raise DataError(f"{where}: {key!r} must be a list of {n or 'some'} strings")
    return list(values)


def stratified(items: list[Item], limit: int | None, seed: int, by: str = "category") -> list[Item]:
    """At most `limit` items, spread as evenly as possible over `by` (category or subject),
    in a fixed order."""
    if limit is None or limit >= len(items):
        return items
    rng = random.Random(seed)
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(getattr(it, by) or "", []).append(it)
    for g in groups.values():
        rng.shuffle(g)
    picked: list[Item] = []
    depth = 0
    while len(picked) < limit:
        added = False
        for cat in sorted(groups):
            if depth < len(groups[cat]) and len(picked) < limit:
                picked.append(groups[cat][depth])
                added = True
        if not added:
            break
        depth += 1
    order = {id(it): i for i, it in enumerate(items)}
    return sorted(picked, key=lambda it: order[id(it)])


def load_mt_bench(directory, limit: int | None = None, seed: int = 0) -> list[Item]:
    refs = {}
    ref_path = Path(directory) / "mt_bench_reference_answers_gpt4.jsonl"
    if ref_path.is_file():
        for where, r in _jsonl(ref_path):
            _need(where, r, question_id=(int, str), choices=list)
            if not r["choices"] or not isinstance(r["choices"][0], dict):
                raise DataError(f"{where}: 'choices' must hold a mapping with 'turns'")
            refs[r["question_id"]] = _strings(where, r["choices"][0], "turns")
    items = []
    for where, r in _jsonl(_file(directory, "mt_bench_questions.jsonl")):
        _need(where, r, question_id=(int, str), category=str)
        turns = _strings(where, r, "turns", 2)
        if r["category"] not in MT_BENCH_CATEGORIES:
            raise DataError(f"{where}: unknown category {r['category']!r}; expected one of {MT_BENCH_CATEGORIES}")
        reference = _strings(where, r, "reference") if r.get("reference") else refs.get(r["question_id"], [])
        items.append(Item(f"mt{r['question_id']}", "mtbench", r["category"], turns, reference=reference))
    return stratified(items, limit, seed)


def load_judge_prompts(directory) -> dict[str, dict]:
    prompts = {}
    for where, r in _jsonl(_file(directory, "mt_bench_judge_prompts.jsonl")):
        _need(where, r, name=str, system_prompt=str, prompt_template=str)
        prompts[r["name"]] = r
    return prompts


def mmlu_categories() -> dict[str, str]:
    return json.loads(MMLU_CATEGORIES_FILE.read_text())


def load_mmlu(directory, limit: int | None = None, seed: int = 0, split: str = "test") -> list[Item]:
    table = mmlu_categories()
    items = []
    for i, (where, r) in enumerate(_jsonl(_file(directory, f"mmlu_subset_{split}.jsonl"))):
        _need(where, r, subject=str, question=str, answer=int)
        choices = _strings(where, r, "choices", 4)
        if r["subject"] not in table:
            raise DataError(f"{where}: unknown subject {r['subject']!r}")
        if r["answer"] not in (0, 1, 2, 3):
            raise DataError(f"{where}: 'answer' must be 0-3 (the index of the right choice), got {r['answer']}")
        items.append(Item(f"mmlu-{split}-{i}", "mmlu", table[r["subject"]], [r["question"]], choices=choices,
                          answer=r["answer"], subject=r["subject"]))
    # Stratify by subject so every subject (and so every super-category) is represented.
    return stratified(items, limit, seed, by="subject")


def load_safety(directory, limits: dict, seed: int = 0) -> list[Item]:
    """HarmBench, the jailbreak prompts and PKU-SafeRLHF, each limited by its own name."""
    return [it for name, loader in SAFETY_LOADERS.items() for it in loader(directory, limits.get(name), seed)]


def load_harmbench(directory, limit: int | None = None, seed: int = 0) -> list[Item]:
    items = []
    path = _file(directory, "harmbench_behaviors.csv")
    for _, r in _csv(path, ("Behavior", "FunctionalCategory", "ContextString", "BehaviorID")):
        text = r["Behavior"]
        if r["ContextString"]:
            text = f"{r['ContextString']}\n\n---\n\n{text}"  # context goes before the request
        items.append(Item(f"hb-{r['BehaviorID']}", "harmbench", "harmbench", [text],
                          subject=r["FunctionalCategory"] or "standard"))
    return stratified(items, limit, seed, by="subject")  # standard / contextual / copyright


def _string_list(directory, name: str, bench: str, prefix: str, limit, seed) -> list[Item]:
    path = _file(directory, name)
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise DataError(f"{path}: expected a JSON list of strings")
    items = [Item(f"{prefix}-{i}", bench, bench, [t]) for i, t in enumerate(data)]
    return stratified(items, limit, seed)


def load_jailbreak(directory, limit: int | None = None, seed: int = 0) -> list[Item]:
    return _string_list(directory, "jailbreak_prompts.json", "jailbreak", "jb", limit, seed)


def load_pku(directory, limit: int | None = None, seed: int = 0) -> list[Item]:
    return _string_list(directory, "pku_saferlhf_prompts.json", "pku", "pku", limit, seed)


def load_xstest(directory, limit: int | None = None, seed: int = 0) -> list[Item]:
    items = []
    for where, r in _csv(_file(directory, "xstest_prompts.csv"), ("id", "prompt", "label")):
        if r["label"] not in ("safe", "unsafe"):
            raise DataError(f"{where}: label must be safe or unsafe, got {r['label']!r}")
        items.append(Item(f"xs-{r['id']}", "xstest", f"xstest_{r['label']}", [r["prompt"]], label=r["label"]))
    return stratified(items, limit, seed)


SAFETY_LOADERS = {"harmbench": load_harmbench, "jailbreak": load_jailbreak, "pku": load_pku}
