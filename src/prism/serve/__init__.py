"""Serving a finished PRISM run over an OpenAI-compatible HTTP API: the local server (`app.py`),
router mode in front of an upstream such as vLLM (`router.py`), adapter export (`export.py`)."""
