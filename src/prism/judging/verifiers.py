"""Program verifiers: judges that are functions of the answer, for contexts whose effect a program
can check. A verifier is `check(answer, query, context, serves) -> float`: `serves` says whether
the query is one the context is for (its own queries) or one it does not serve (general queries,
other contexts' queries). A context names one with `check:` (a built-in name or
"module:function"); a plain `fn(answer)` works too.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Callable

# Frequent function words that are unambiguous between the two languages.
_FRENCH = frozenset(
    "le la les des est et une du pour que qui dans pas sur avec vous je il elle nous ce cette ces sont au aux "
    "mais où très être avoir son sa ses leur leurs plus comme peut fait aussi par votre vos mon ma mes ils elles "
    "était sont été faire bien c'est qu'il d'un d'une l'on n'est voici ici donc car alors".split()
)
_ENGLISH = frozenset(
    "the and is are of to that it for with you this be as was can have not or by an at from your will what which "
    "their more also but if they we has would there so do how when who them these those been were here".split()
)
_WORD = re.compile(r"[a-zà-ÿ']+")


def french_score(text: str) -> float:
    """Share of French among the French/English function words of `text` (0 when it has none)."""
    words = _WORD.findall(text.lower())
    fr = sum(w in _FRENCH for w in words)
    en = sum(w in _ENGLISH for w in words)
    return fr / (fr + en) if fr + en else 0.0


def is_french(text: str) -> bool:
    """True when the answer is mainly French: most function words French, and at least three."""
    words = _WORD.findall(text.lower())
    fr = sum(w in _FRENCH for w in words)
    return fr >= 3 and french_score(text) > 0.5


def states(answer: str, terms) -> bool:
    """Does the answer contain any of the terms (case-insensitive, whole words for short ones)?"""
    low = answer.lower()
    for t in terms:
        t = t.lower()
        if (re.search(rf"(?<![a-z0-9]){re.escape(t)}(?![a-z0-9])", low) if len(t) <= 3 else t in low):
            return True
    return False


def leaked_facts(answer: str, context) -> list[str]:
    """The facts of `context` (those marked leak) that an answer mentions."""
    return [f.key for f in context.facts if f.leak and states(answer, f.match)]


def facts(answer: str, query: str = "", context=None, serves: bool = True) -> float:
    """For a query the context serves: 1 when the answer states the fact the query asks about (any
    of the context's facts if the query names none), else 0. For other queries: -1 when the answer
    leaks one of the context's facts, else 0."""
    if not serves:
        return -1.0 if leaked_facts(answer, context) else 0.0
    fact = context.fact_for(query)
    terms = fact.match if fact else [t for f in context.facts for t in f.match]
    return float(states(answer, terms))


BUILTIN: dict[str, Callable] = {"facts": facts, "french": is_french}


def load_check(spec: str) -> Callable[..., float]:
    """A verifier by built-in name or "module:function", taking (answer, query, context, serves)."""
    if spec in BUILTIN:
        fn = BUILTIN[spec]
    elif ":" in spec:
        mod_name, fn_name = spec.split(":", 1)
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import the program check {spec!r}: {e}") from None
    else:
        raise ValueError(f"unknown check {spec!r}; use one of {', '.join(BUILTIN)} or 'module:function'")
    if not callable(fn):
        raise ValueError(f"program check {spec!r} is not callable")
    try:
        takes_all = len(inspect.signature(fn).parameters) >= 4
    except (TypeError, ValueError):
        takes_all = False
    if takes_all:
        return lambda answer, query="", context=None, serves=True: float(fn(answer, query, context, serves))
    return lambda answer, query="", context=None, serves=True: float(fn(answer))
