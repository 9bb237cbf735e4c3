"""lm-evaluation-harness integration: the `prism` model (a finished run, routed request by request;
prism.lmeval.model) and the functions of the local MMLU task in examples/lm-eval (prism.lmeval.tasks).

lm-eval 0.4.13 resolves `--model NAME` only from its own table of models and from classes registered
in the running process: it reads no package entry points. So `prism lm-eval ARGS` (or
`python -m prism.lmeval ARGS`) registers `prism` and then runs lm-eval's own command line with ARGS,
unchanged. In Python, `import prism.lmeval.model` registers it before `lm_eval.simple_evaluate`.
Needs the optional extra: `pip install "prism-persona[lmeval]"`.
"""

from __future__ import annotations

import sys
from typing import Sequence

from prism.errors import PrismError

MODEL_NAME = "prism"
LMEVAL_VERSION = "0.4.13"
MISSING = (f"the lm-eval integration needs the optional extra: pip install \"prism-persona[lmeval]\" "
           f"(lm-eval=={LMEVAL_VERSION})")


def register() -> None:
    """Make `--model prism` known to lm-eval in this process (lazily: the model module, and with it
    torch, is imported only when lm-eval builds the model)."""
    try:
        import lm_eval.models  # noqa: F401  (its built-in models first: lm-eval loads them only into an empty registry)
        from lm_eval.api.registry import model_registry
    except ImportError:
        raise PrismError(MISSING) from None
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="prism.lmeval.model:PrismLM")


def main(argv: Sequence[str]) -> int:
    """lm-eval's command line (`lm-eval run ...` or its legacy form `lm-eval --model ...`) with
    `prism` registered. lm-eval reads sys.argv itself, so it is set for the call."""
    register()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
