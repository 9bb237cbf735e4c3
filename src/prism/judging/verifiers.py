"""Programmatic verifiers: functions that score one answer, for contexts whose effect a program
can check. Use one as a judge with `judge.kind: program` and `judge.program: prism.judging.verifiers:NAME`.
"""

from __future__ import annotations

import re

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

