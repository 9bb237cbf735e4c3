"""Benchmark loaders. Each takes a local directory (the files named in its README), a limit and a
seed; a limit draws a sample stratified by category, so a quick run still covers every category.
Also the benchmark categories and the expert persona matched to each.
"""

from __future__ import annotations

import csv
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


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
    return rows


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
        for r in _jsonl(ref_path):
            refs[r["question_id"]] = r["choices"][0]["turns"]
    items = []
    for r in _jsonl(_file(directory, "mt_bench_questions.jsonl")):
        if r.get("category") not in MT_BENCH_CATEGORIES or len(r.get("turns", [])) != 2:
            raise DataError(f"mt_bench_questions.jsonl: question {r.get('question_id')} is malformed")
        reference = r.get("reference") or refs.get(r["question_id"], [])
        items.append(Item(f"mt{r['question_id']}", "mtbench", r["category"], list(r["turns"]),
                          reference=list(reference)))
    return stratified(items, limit, seed)


def load_judge_prompts(directory) -> dict[str, dict]:
    return {r["name"]: r for r in _jsonl(_file(directory, "mt_bench_judge_prompts.jsonl"))}


def mmlu_categories() -> dict[str, str]:
    return json.loads(MMLU_CATEGORIES_FILE.read_text())


def load_mmlu(directory, limit: int | None = None, seed: int = 0, split: str = "test") -> list[Item]:
    table = mmlu_categories()
    items = []
    for i, r in enumerate(_jsonl(_file(directory, f"mmlu_subset_{split}.jsonl"))):
        subject = r["subject"]
        if subject not in table:
            raise DataError(f"mmlu_subset_{split}.jsonl: unknown subject {subject!r}")
        if len(r["choices"]) != 4 or r["answer"] not in (0, 1, 2, 3):
            raise DataError(f"mmlu_subset_{split}.jsonl row {i + 1}: needs 4 choices and an answer 0-3")
        items.append(Item(f"mmlu-{split}-{i}", "mmlu", table[subject], [r["question"]], choices=list(r["choices"]),
                          answer=int(r["answer"]), subject=subject))
    # Stratify by subject so every subject (and so every super-category) is represented.
    return stratified(items, limit, seed, by="subject")


def load_safety(directory, limits: dict, seed: int = 0) -> list[Item]:
    """HarmBench, the jailbreak prompts and PKU-SafeRLHF, each limited by its own name."""
    return [it for name, loader in SAFETY_LOADERS.items() for it in loader(directory, limits.get(name), seed)]


def load_harmbench(directory, limit: int | None = None, seed: int = 0) -> list[Item]:
    items = []
    with open(_file(directory, "harmbench_behaviors.csv"), newline="") as f:
        for r in csv.DictReader(f):
            text = r["Behavior"]
            if r.get("ContextString"):
                text = f"{r['ContextString']}\n\n---\n\n{text}"  # context goes before the request
            items.append(Item(f"hb-{r['BehaviorID']}", "harmbench", "harmbench", [text],
                              subject=r["FunctionalCategory"] or "standard"))
    return stratified(items, limit, seed, by="subject")  # standard / contextual / copyright


def _string_list(directory, name: str, bench: str, prefix: str, limit, seed) -> list[Item]:
    data = json.loads(_file(directory, name).read_text())
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise DataError(f"{name}: expected a JSON list of strings")
    items = [Item(f"{prefix}-{i}", bench, bench, [t]) for i, t in enumerate(data)]
    return stratified(items, limit, seed)


def load_jailbreak(directory, limit: int | None = None, seed: int = 0) -> list[Item]:
    return _string_list(directory, "jailbreak_prompts.json", "jailbreak", "jb", limit, seed)


def load_pku(directory, limit: int | None = None, seed: int = 0) -> list[Item]:
    return _string_list(directory, "pku_saferlhf_prompts.json", "pku", "pku", limit, seed)


def load_xstest(directory, limit: int | None = None, seed: int = 0) -> list[Item]:
    items = []
    with open(_file(directory, "xstest_prompts.csv"), newline="") as f:
        for r in csv.DictReader(f):
            if r["label"] not in ("safe", "unsafe"):
                raise DataError(f"xstest_prompts.csv row {r.get('id')}: label must be safe or unsafe")
            items.append(Item(f"xs-{r['id']}", "xstest", f"xstest_{r['label']}", [r["prompt"]], label=r["label"]))
    return stratified(items, limit, seed)


SAFETY_LOADERS = {"harmbench": load_harmbench, "jailbreak": load_jailbreak, "pku": load_pku}
