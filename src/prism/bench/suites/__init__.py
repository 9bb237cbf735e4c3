"""Evidence suites that ship with prism: held-out questions written for it. Their contexts are
in prism/contexts/suites/ (a run names them as `suite:NAME`)."""

from pathlib import Path


def suite_questions(name: str) -> Path:
    return Path(__file__).with_name(f"{name}_questions.yaml")
