"""KubeLoRA serving side: the adapter agent sidecar (``agent/``) and the CPU engine (``engine/``).

Both speak vLLM's OpenAI-compatible HTTP API, whose shapes live in :mod:`kubelora_server.openai_api`, so the
agent works the same against vLLM on GPUs and against the CPU engine in local clusters and tests.
"""
