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


# The settings of the shared finished run: `prism run --preset micro --batch-size 8` on the CLI
# (tests/test_faults.py compares killed-and-resumed CLI runs against it).
MICRO_BATCH = 8


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """One finished micro run (all five stages on the embedded model) for the whole session. Tests
    only read it; a test that changes a run works on a copy (`copy_run`)."""
    from prism.config import load_config
    from prism.model import load_model
    from prism.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("shared") / "micro"
    run_pipeline(load_config("micro"), out, quiet=True, model=load_model(batch_size=MICRO_BATCH))
    return out


def copy_run(run, dest):
    import shutil

    shutil.copytree(run, dest)
    return dest
