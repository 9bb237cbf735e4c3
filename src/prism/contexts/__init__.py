"""The one context registry: the built-in personas plus any user-supplied contexts.

A context is what a user would otherwise prepend to every prompt: a persona, a user's memory, a
long system prompt or a tool registry. A context file is YAML with `name`, `kind` (persona,
memory, instructions, tools, passage), optional `category` / `description`, and its text: at one
or more lengths (`long`, `short`, `minimal`), a single `text`, `facts` (`key: value` lines a
program can check for) or `tools` (function specs). `queries` describes the questions it serves
(stage 1 writes those), `check` names a program verifier (default: `facts` when there are facts),
`group` puts contexts that no content can tell apart (two users' memories) in one gate class;
`scope` says where the context belongs: `all` (a persona, "answer in French") or only its `own`
questions (a memory, a product sheet: elsewhere the base model's answer is the right one).
A YAML file may hold one context (a mapping) or several (a list of mappings).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml

from prism.errors import PersonaError, yaml_problem

LENGTHS = ("long", "short", "minimal")
KINDS = ("persona", "memory", "instructions", "tools", "passage")
LIBRARY_DIR = Path(__file__).parent / "library"
SUITES_DIR = Path(__file__).parent / "suites"  # `suite:NAME` names one of these folders
_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_KEYS = {"name", "kind", "category", "description", "text", "facts", "tools", "queries", "check", "group", "scope",
         *LENGTHS}
_STOP = frozenset("the a an my your of is are do does what which who where when how i me to in on for and or".split())
# The questions each kind serves when a file does not say: stage 1 asks for "Write <this>." with
# {key} replaced by each fact key in turn (measured on the embedded model: a named key keeps a
# 135M model's questions on target about half the time, a general description almost never).
DEFAULT_QUERIES = {
    "memory": "a question that I might ask you about my {key}",
    "tools": "one request a user might make that needs one of these tools",
    "passage": "a question about the {key} that this text answers",
    "instructions": "a question about the {key} that these instructions cover",
}


@dataclass(frozen=True)
class Fact:
    """One checkable fact: `key` (what a question names, e.g. "dog"), `value`, and the strings
    that count as stating it (`match`; a leak check uses them when `leak` is true)."""

    key: str
    value: str
    match: tuple[str, ...]
    leak: bool = True

    @property
    def words(self) -> set[str]:
        return {w for w in re.findall(r"[a-z0-9]+", self.key.lower()) if w not in _STOP}


def word_forms(word: str) -> set[str]:
    """A word and the singulars it may be the plural of: "allergies" -> allergy, allergie;
    "movies" -> movie; "colours" -> colour; "dishes" -> dish, dishe."""
    forms = {word}
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        forms.add(word[:-1])
        if len(word) > 4 and word.endswith("es"):
            forms.add(word[:-2])
        if len(word) > 4 and word.endswith("ies"):
            forms.add(word[:-3] + "y")
    return forms


@dataclass(frozen=True)
class Context:
    name: str
    texts: dict[str, str]  # length -> text ("any": one text for every length)
    kind: str = "persona"
    category: str | None = None  # benchmark category it is the expert for, if any
    description: str = ""
    source: str = "builtin"
    facts: tuple[Fact, ...] = ()
    queries: str = ""  # the questions it serves, for stage 1
    check: str | None = None  # program verifier: "facts", "french" or "module:function"
    group: str = ""  # gate class; contexts sharing it are chosen by name
    scope: str = "all"  # all: may serve any query; own: only its own queries

    def text(self, length: str = "long") -> str:
        if length not in LENGTHS:
            raise PersonaError(f"unknown persona length {length!r}; choose one of {', '.join(LENGTHS)}")
        if length in self.texts:
            return self.texts[length]
        if "any" in self.texts:
            return self.texts["any"]
        raise PersonaError(
            f"context {self.name!r} ({self.source}) has no {length!r} text; it has {', '.join(self.texts)}"
        )

    def fact_for(self, query: str) -> Fact | None:
        """The fact a question asks about: the one whose key words it names most (None if none)."""
        said = {form for w in re.findall(r"[a-z0-9]+", query.lower()) for form in word_forms(w)}
        named = [sum(bool(word_forms(w) & said) for w in f.words) for f in self.facts]
        scored = [(n / max(1, len(f.words)), n, i) for i, (n, f) in enumerate(zip(named, self.facts))]
        best = max(scored, default=(0, 0, -1))
        return self.facts[best[2]] if best[1] > 0 else None


Persona = Context  # the paper's word for the contexts it studies


@dataclass
class ContextRegistry:
    personas: dict[str, Context] = field(default_factory=dict)

    @classmethod
    def builtin(cls) -> "ContextRegistry":
        reg = cls()
        reg.add_path(LIBRARY_DIR, override=False)
        return reg

    @classmethod
    def load(cls, extra: str | Path | None = None) -> "ContextRegistry":
        """The built-in library, plus the contexts at `extra` (a YAML file or a directory)."""
        reg = cls.builtin()
        if extra is not None:
            reg.add_path(extra, override=True)
        return reg

    def add_path(self, path: str | Path, override: bool = True) -> list[str]:
        path = SUITES_DIR / str(path)[6:] if str(path).startswith("suite:") else Path(path)
        if path.is_dir():
            files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not files:
                raise PersonaError(f"context directory {path} holds no .yaml/.yml files")
        elif path.is_file():
            files = [path]
        else:
            raise PersonaError(f"context path {path} does not exist")
        added: list[str] = []
        for f in files:
            for ctx in _parse_file(f):
                if ctx.name in added or (ctx.name in self.personas and not override):
                    raise PersonaError(f"{f}: context {ctx.name!r} is defined twice")
                self.personas[ctx.name] = ctx
                added.append(ctx.name)
        return added

    def get(self, name: str) -> Context:
        if name not in self.personas:
            raise PersonaError(f"unknown persona {name!r}; known: {', '.join(sorted(self.personas))}")
        return self.personas[name]

    def select(self, names: Iterable[str] | None) -> list[Context]:
        if names is None:  # every built-in persona and every context the user added
            return list(self.personas.values())
        names = list(names)
        if not names:
            raise PersonaError("the persona list is empty")
        return [self.get(n) for n in names]

    def names(self) -> list[str]:
        return list(self.personas)


PersonaRegistry = ContextRegistry


def _parse_file(path: Path) -> list[Context]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PersonaError(f"{path}: not valid YAML ({yaml_problem(e)})") from None
    if data is None:
        raise PersonaError(f"{path}: the file is empty")
    entries = data if isinstance(data, list) else [data]
    if not entries:
        raise PersonaError(f"{path}: the persona list is empty")
    return [_parse_entry(path, i, e) for i, e in enumerate(entries)]


def _parse_facts(where: str, raw) -> tuple[Fact, ...]:
    if not isinstance(raw, list) or not raw:
        raise PersonaError(f"{where}: 'facts' must be a non-empty list of 'key: value' strings or mappings")
    out = []
    for item in raw:
        if isinstance(item, str) and ":" in item:
            key, value = (s.strip() for s in item.split(":", 1))
            item = {"key": key, "value": value}
        if not isinstance(item, dict) or not item.get("key") or not str(item.get("value", "")).strip():
            raise PersonaError(f"{where}: a fact needs a key and a value, got {item!r}")
        value = str(item["value"]).strip()
        match = item.get("match") or [re.split(r"\s*[(,;]", value)[0]]
        out.append(Fact(str(item["key"]), value, tuple(str(m) for m in match), bool(item.get("leak", True))))
    return tuple(out)


def _parse_entry(path: Path, index: int, entry) -> Context:
    where = f"{path}" if index == 0 else f"{path} (entry {index})"
    if not isinstance(entry, dict):
        raise PersonaError(f"{where}: a context must be a mapping with name and text, got {type(entry).__name__}")
    unknown = set(entry) - _KEYS
    if unknown:
        raise PersonaError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise PersonaError(f"{where}: 'name' must be lowercase letters, digits, '_' or '-', got {name!r}")
    kind = entry.get("kind", "persona")
    if kind not in KINDS:
        raise PersonaError(f"{where}: context {name!r} has kind {kind!r}; choose one of {', '.join(KINDS)}")
    texts: dict[str, str] = {}
    for key in (*LENGTHS, "text"):
        if key not in entry:
            continue
        value = entry[key]
        if not isinstance(value, str) or not value.strip():
            raise PersonaError(f"{where}: persona {name!r} has an empty or non-text {key!r}")
        # Personas are prose (whitespace folded); other contexts keep their lines.
        texts["any" if key == "text" else key] = " ".join(value.split()) if kind == "persona" else value.strip()
    facts = _parse_facts(where, entry["facts"]) if "facts" in entry else ()
    if "tools" in entry:
        if not isinstance(entry["tools"], list) or not all(isinstance(t, dict) and t.get("name") for t in entry["tools"]):
            raise PersonaError(f"{where}: 'tools' must be a list of mappings, each with a name")
        texts.setdefault("any", "\n".join(filter(None, [texts.pop("any", ""), json.dumps(entry["tools"], indent=1)])))
    if facts:  # the facts go where the text says {facts}, or are the whole text
        lines = "\n".join(f"{f.key}: {f.value}" for f in facts)
        texts = {k: v.replace("{facts}", lines) for k, v in texts.items()} or {"any": lines}
    if not texts:
        raise PersonaError(f"{where}: persona {name!r} has no text (give long/short/minimal, text, facts or tools)")
    category = entry.get("category")
    if category is not None and not isinstance(category, str):
        raise PersonaError(f"{where}: persona {name!r} has a non-text category")
    check = entry.get("check", "facts" if facts else None)
    if check == "facts" and not facts:
        raise PersonaError(f"{where}: context {name!r} uses check 'facts' but has no facts")
    scope = entry.get("scope", "all" if kind == "persona" or (kind == "instructions" and not facts) else "own")
    if scope not in ("all", "own"):
        raise PersonaError(f"{where}: context {name!r} has scope {scope!r}; choose all or own")
    return Context(
        name=name, texts=texts, kind=kind, category=category, description=str(entry.get("description") or ""),
        source=str(path), facts=facts, queries=str(entry.get("queries") or DEFAULT_QUERIES.get(kind, "")),
        check=check, group=str(entry.get("group") or name), scope=scope,
    )
