"""The one persona registry: the built-in library plus any user-supplied personas/contexts.

A persona file is YAML with `name`, optional `kind` / `category` / `description`, and its text at
one or more lengths (`long`, `short`, `minimal`), or a single `text` used for every length
(handy for contexts that are not personas, e.g. "Always answer in French.").
A YAML file may hold one persona (a mapping) or several (a list of mappings).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml

from prism.errors import PersonaError

LENGTHS = ("long", "short", "minimal")
KINDS = ("task", "behaviour", "context")
LIBRARY_DIR = Path(__file__).parent / "library"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_KEYS = {"name", "kind", "category", "description", "text", *LENGTHS}


@dataclass(frozen=True)
class Persona:
    name: str
    texts: dict[str, str]  # length -> text
    kind: str = "context"
    category: str | None = None  # benchmark category it is the expert for, if any
    description: str = ""
    source: str = "builtin"

    def text(self, length: str = "long") -> str:
        if length not in LENGTHS:
            raise PersonaError(f"unknown persona length {length!r}; choose one of {', '.join(LENGTHS)}")
        if length in self.texts:
            return self.texts[length]
        if "any" in self.texts:
            return self.texts["any"]
        raise PersonaError(
            f"persona {self.name!r} ({self.source}) has no {length!r} text; it has {', '.join(self.texts)}"
        )


@dataclass
class PersonaRegistry:
    personas: dict[str, Persona] = field(default_factory=dict)

    @classmethod
    def builtin(cls) -> "PersonaRegistry":
        reg = cls()
        reg.add_path(LIBRARY_DIR, override=False)
        return reg

    @classmethod
    def load(cls, extra: str | Path | None = None) -> "PersonaRegistry":
        """The built-in library, plus the personas at `extra` (a YAML file or a directory)."""
        reg = cls.builtin()
        if extra is not None:
            reg.add_path(extra, override=True)
        return reg

    def add_path(self, path: str | Path, override: bool = True) -> list[str]:
        path = Path(path)
        if path.is_dir():
            files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not files:
                raise PersonaError(f"persona directory {path} holds no .yaml/.yml files")
        elif path.is_file():
            files = [path]
        else:
            raise PersonaError(f"persona path {path} does not exist")
        added: list[str] = []
        for f in files:
            for persona in _parse_file(f):
                if persona.name in self.personas and not override:
                    raise PersonaError(f"{f}: persona {persona.name!r} is defined twice")
                if persona.name in added:
                    raise PersonaError(f"{f}: persona {persona.name!r} is defined twice")
                self.personas[persona.name] = persona
                added.append(persona.name)
        return added

    def get(self, name: str) -> Persona:
        if name not in self.personas:
            raise PersonaError(f"unknown persona {name!r}; known: {', '.join(sorted(self.personas))}")
        return self.personas[name]

    def select(self, names: Iterable[str] | None) -> list[Persona]:
        if names is None:
            return list(self.personas.values())
        names = list(names)
        if not names:
            raise PersonaError("the persona list is empty")
        return [self.get(n) for n in names]

    def names(self) -> list[str]:
        return list(self.personas)


def _parse_file(path: Path) -> list[Persona]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PersonaError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        raise PersonaError(f"{path}: the file is empty")
    entries = data if isinstance(data, list) else [data]
    if not entries:
        raise PersonaError(f"{path}: the persona list is empty")
    return [_parse_entry(path, i, e) for i, e in enumerate(entries)]


def _parse_entry(path: Path, index: int, entry) -> Persona:
    where = f"{path}" if index == 0 else f"{path} (entry {index})"
    if not isinstance(entry, dict):
        raise PersonaError(f"{where}: a persona must be a mapping with name and text, got {type(entry).__name__}")
    unknown = set(entry) - _KEYS
    if unknown:
        raise PersonaError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise PersonaError(f"{where}: 'name' must be lowercase letters, digits, '_' or '-', got {name!r}")
    texts: dict[str, str] = {}
    for key in (*LENGTHS, "text"):
        if key not in entry:
            continue
        value = entry[key]
        if not isinstance(value, str) or not value.strip():
            raise PersonaError(f"{where}: persona {name!r} has an empty or non-text {key!r}")
        texts["any" if key == "text" else key] = " ".join(value.split())
    if not texts:
        raise PersonaError(f"{where}: persona {name!r} has no text (give long/short/minimal or text)")
    kind = entry.get("kind", "context")
    if kind not in KINDS:
        raise PersonaError(f"{where}: persona {name!r} has kind {kind!r}; choose one of {', '.join(KINDS)}")
    category = entry.get("category")
    if category is not None and not isinstance(category, str):
        raise PersonaError(f"{where}: persona {name!r} has a non-text category")
    return Persona(
        name=name, texts=texts, kind=kind, category=category,
        description=str(entry.get("description") or ""), source=str(path),
    )
