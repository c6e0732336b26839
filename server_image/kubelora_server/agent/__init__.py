"""The adapter agent: keeps one engine's loaded LoRA adapters equal to the desired set.

Layout (pure first, I/O last, so the decisions are unit-testable without an engine or a cluster):

- :mod:`.state` - the state machine: desired set + engine view + fetch/load results -> records + actions.
- :mod:`.compat` - may this adapter run on this engine? (peft type, base model, rank).
- :mod:`.fetch` - copy an adapter from its URI into the cache and verify manifest + digest.
- :mod:`.engine_client` - vLLM's runtime LoRA API over httpx.
- :mod:`.sources` - where the desired set comes from: the ConfigMap watch or a local file.
- :mod:`.runner` - the loop that executes the state machine's actions.
- :mod:`.server` / :mod:`.metrics` - the read-only HTTP endpoints on :8081.
"""
