"""Serving a finished PRISM run over an OpenAI-compatible HTTP API.

- `app.py`: the local server (FastAPI): queue + batcher + the routed model.
- `router.py`: router mode, the gate runs here and generation on an upstream (e.g. vLLM).
- `openai_backend.py`: the pipeline's stages 1-3 generating on any OpenAI-compatible server.
- `export.py`: the adapter in a form every LoRA loader (vLLM, SGLang) accepts.
"""
