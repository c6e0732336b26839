"""`python -m kubelora_local.runner --state-dir DIR` (started by `kubelora-local up`)."""

from .main import main

main()
