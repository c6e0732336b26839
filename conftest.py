"""Test-session setup shared by every tier.

torch would otherwise start one OpenMP thread per core in every process; on a 2-core CI box the
trainer, the CPU engine and the cluster then fight and a 1 s step takes 10 s.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["tests.e2e.cluster_fixture", "tests.e2e.operator_fixture"]
