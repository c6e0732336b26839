"""``kubelora-cpu-engine``: an OpenAI-compatible server on transformers + peft with vLLM's runtime LoRA API.

It stands in for vLLM where there is no GPU (local clusters, CI), so it copies vLLM's command-line flags,
endpoints, response shapes, errors and LoRA limits; the agent and the operator cannot tell them apart.

- :mod:`.config` - the vLLM-like command line.
- :mod:`.protocol` - request models and response/error builders (OpenAI and vLLM shapes).
- :mod:`.sampling` - next-token choice, stop handling and incremental detokenisation (pure).
- :mod:`.host` - one model instance, its adapters (registration, LRU residency) and request submission.
- :mod:`.scheduler` - the thread that batches every running request into one forward pass, mixed adapters
  included, and applies adapter loads/unloads between two steps.
- :mod:`.app` - the FastAPI routes.
"""
