"""PRISM: Context Routing via Intent-based Self-Modeling.

Measure what a persona prompt does to a chat model, distil it into a gated LoRA adapter, and
serve the routed model. The public API:

    from prism import load_config, run_pipeline, PrismModel, ContextRegistry, load_model
"""

import warnings

from prism.version import __version__

# PEFT still calls a transformers API deprecated in v5; the warning is noise for our users.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

from prism.config import PrismConfig, load_config  # noqa: E402
from prism.contexts import Context, ContextRegistry  # noqa: E402

__all__ = ["PrismConfig", "load_config", "Context", "ContextRegistry", "load_model", "run_pipeline", "PrismModel",
           "__version__"]


def __getattr__(name):  # heavy modules (torch, transformers) load on first use
    if name == "load_model":
        from prism.model import load_model

        return load_model
    if name == "run_pipeline":
        from prism.pipeline import run_pipeline

        return run_pipeline
    if name == "PrismModel":
        from prism.routed import PrismModel

        return PrismModel
    raise AttributeError(f"module 'prism' has no attribute {name!r}")
