"""The model layer: loading (embedded GGUF, local directory, hub id, layer-0 only), ChatModel
(formatting, generation, scoring), the gate's layer-0 features, and remote generation.
Nothing here knows about stages, judges, eval or serving."""

from prism.model.chat import ChatModel, Generation, TokenScores
from prism.model.batching import decoder_layers, first_layer_output, pool
from prism.model.loading import load_model, load_model_for

__all__ = ["ChatModel", "Generation", "TokenScores", "load_model", "load_model_for", "decoder_layers",
           "first_layer_output", "pool"]
