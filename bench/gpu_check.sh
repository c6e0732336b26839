#!/usr/bin/env bash
# One prepared GPU check (issue 15), <= 8 minutes on one GPU with no network:
#
#   bench/gpu_check.sh [gpu_check.py flags, e.g. --rows 4000 --arm-timeout 190]
#
# Trains the real QLoRA path (nf4, double quant, bf16 compute, paged_adamw_32bit, packing) through
# kubelora_trainer on a random-init ~1B Llama built on the spot, beside the seed recipe on the same model and
# data, and prints tokens/s, peak GPU memory and the ratio (bench/gpu_check.py says exactly what each arm is).
#
# The machine has Python 3.12, torch, transformers, peft and accelerate but no trl, bitsandbytes or datasets
# and no network: run `make gpu-wheels` first (here, with network) and carry bench/gpu_wheels/ along. The
# wheels go into a throwaway venv that sees the machine's site-packages, so nothing of the machine changes.
# GPU_CHECK_PYTHON=/path/to/python skips the install (e.g. `GPU_CHECK_PYTHON=.venv/bin/python
# bench/gpu_check.sh --tiny` checks the flow on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
budget=${GPU_CHECK_BUDGET_S:-470}
wheels=${GPU_CHECK_WHEELS:-bench/gpu_wheels}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
  py=$GPU_CHECK_PYTHON
else
  if ! compgen -G "$wheels/*.whl" > /dev/null; then
    echo "no wheels in $wheels: run 'make gpu-wheels' on a machine with network and carry $wheels" >&2
    exit 2
  fi
  venv=${TMPDIR:-/tmp}/kubelora-gpu-check-venv
  rm -rf "$venv"
  if python3 -m venv --system-site-packages "$venv" 2>/dev/null; then
    py=$venv/bin/python
    # Resolves against the machine's packages: a dependency missing there fails here, in seconds, by name.
    "$py" -m pip install --quiet --no-index --find-links "$wheels" -r bench/gpu_requirements.txt
  else
    # No venv module: the same wheels into a folder that shadows the machine's copies (no resolution).
    mkdir -p "$venv"
    python3 -m pip install --quiet --no-index --no-deps --target "$venv/site" "$wheels"/*.whl
    export PYTHONPATH="$venv/site${PYTHONPATH:+:$PYTHONPATH}"
    py=python3
  fi
  echo "installed $(ls "$wheels"/*.whl | wc -l) wheels in $((SECONDS - start)) s" >&2
fi

"$py" - <<'PY'
import sys, torch, transformers, peft, trl, accelerate, datasets
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}, "
      f"accelerate {accelerate.__version__}, datasets {datasets.__version__}", flush=True)
if torch.cuda.is_available():
    import bitsandbytes
    free, total = torch.cuda.mem_get_info()
    print(f"bitsandbytes {bitsandbytes.__version__}; GPU {torch.cuda.get_device_name(0)}, "
          f"{total / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free", flush=True)
PY

left=$((budget - (SECONDS - start)))
OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} timeout --kill-after=10 "$left" "$py" bench/gpu_check.py "$@"
echo "gpu_check.sh: $((SECONDS - start)) s in all" >&2
