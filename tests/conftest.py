import os
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct, loaded once per test session."""
    from prism.model import load_model

    return load_model("embedded", batch_size=8)


@pytest.fixture(scope="session")
def benchmarks_dir():
    path = Path(os.environ.get("PRISM_BENCHMARKS", BENCHMARKS))
    if not path.is_dir():
        pytest.fail(f"benchmark data not found at {path}; set PRISM_BENCHMARKS")
    return path
