"""``kubelora-cpu-engine``: load the model (and any --lora-modules), then serve the OpenAI API.

The model is loaded before the port opens, so ``GET /health`` answering means "ready to generate", which is
what vLLM's readiness probe semantics are too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import uvicorn

from kubelora_server.engine.app import create_app
from kubelora_server.engine.config import parse_args
from kubelora_server.engine.host import ModelHost
from kubelora_server.engine.protocol import EngineError
from kubelora_server.lora_guard import install


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("KUBELORA_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    host = ModelHost(args)
    for name, path in args.lora_modules.items():
        try:
            host.load_adapter(name, path)
        except EngineError as exc:
            raise SystemExit(f"--lora-modules {name}={path}: {exc.message}") from None
    app = create_app(host)
    for middleware in args.middleware:
        install(app, middleware)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
