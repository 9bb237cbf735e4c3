"""The package's shape: imports only run down the pipeline, the CLI's light commands never load
torch, and each shared idea is defined in one place."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "prism"

# The pipeline order, bottom first. A module may import its own layer's modules of the same
# package and any lower layer; never a higher one.
LAYERS = [
    ("prism.version", "prism.errors", "prism.io", "prism.records", "prism.config", "prism.contexts"),
    ("prism.model",),
    ("prism.run",),
    ("prism.judging",),
    # the gate MLP, the distillation maths (libraries of stages 4-5), adapters in other formats
    ("prism.gate", "prism.distill", "prism.export"),
    ("prism.stages",),
    ("prism.pipeline",),
    ("prism.routed",),
    ("prism.bench",),
    ("prism.eval", "prism.study", "prism.serve", "prism.lmeval"),
    ("prism.cli",),
    ("prism",),  # the package's public API
]


def _layer(module: str) -> tuple[int, str]:
    """(rank, top-level unit) of a prism module."""
    for rank, units in enumerate(LAYERS):
        for unit in units:
            if module == unit or module.startswith(unit + "."):
                return rank, unit
    raise AssertionError(f"{module} is not placed in LAYERS; add it")


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(module: str, path: Path):
    """Every prism module imported anywhere in the file (top level or inside functions)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield node.lineno, base


def test_no_module_imports_a_module_above_it_in_the_pipeline():
    problems = []
    for module, path in _modules():
        rank, unit = _layer(module)
        for line, target in _imports(module, path):
            if target != "prism" and not target.startswith("prism."):
                continue
            if target == "prism" and unit != "prism":
                problems.append(f"{path.name}:{line} {module} imports the package root")
                continue
            t_rank, t_unit = _layer(target)
            if t_rank > rank:
                problems.append(f"{path.relative_to(SRC)}:{line} {module} (layer {rank}) imports {target} "
                                f"(layer {t_rank})")
            elif t_rank == rank and t_unit != unit and rank != 0:
                problems.append(f"{path.relative_to(SRC)}:{line} {module} imports its sibling {target}")
    assert not problems, "upward or sideways imports:\n" + "\n".join(problems)


def test_the_import_check_catches_an_upward_import(tmp_path):
    """The check above must be able to fail: a planted upward import is reported."""
    planted = tmp_path / "gate.py"
    planted.write_text("from prism.routed import PrismModel\n")
    targets = [t for _, t in _imports("prism.gate", planted)]
    assert targets == ["prism.routed"] and _layer("prism.routed")[0] > _layer("prism.gate")[0]


LIGHT = """
import sys
from prism.cli import main
for argv in {argvs}:
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "transformers", "peft", "accelerate") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def test_help_config_and_personas_do_not_import_torch():
    argvs = repr([["--help"], ["config", "--preset", "micro"], ["personas"], ["run", "--help"], ["eval", "--help"]])
    out = subprocess.run([sys.executable, "-c", LIGHT.format(argvs=argvs)], capture_output=True, text=True,
                         timeout=120)
    assert "HEAVY:" in out.stdout, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY:", out.stdout[-500:]
    assert "quick" in out.stdout and "safety_monitor" in out.stdout  # the commands really ran


def test_importing_the_cli_loads_no_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import prism.cli"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "prism.cli" in imported and "torch" not in imported


@pytest.mark.parametrize("pattern", [
    r"def mmlu_question\(", r"def letter_scores\(", r"def mtbench_scores\(",
    r"def is_refusal\(", r"def refusals\(", r"def wilson\(", r"def mismatched_pairs\(", r"class SanityCheck\b",
    r"class Cache\b", r"def pad\(", r"def load_model\(", r"def load_settings\(", r"DEFAULT_PERSONA_MAP = ",
    r"def variant_ids\(", r"class OpenAIClient\b", r"def v1_url\(",
])
def test_shared_ideas_are_defined_once(pattern):
    hits = [f"{p.relative_to(SRC)}" for p in SRC.rglob("*.py") if re.search(pattern, p.read_text())]
    assert len(hits) == 1, f"{pattern} is defined in {hits}"


def test_files_are_replaced_atomically_only_by_io():
    """Write-then-rename lives in prism.io; elsewhere it would be a hand-written copy."""
    offenders = [f"{p.relative_to(SRC)}" for p in SRC.rglob("*.py") if p.name != "io.py"
                 and re.search(r"os\.replace\(|\.rename\(|shutil\.rmtree\(", p.read_text())]
    assert not offenders, offenders


def test_every_module_says_what_it_is_for():
    missing = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, missing
