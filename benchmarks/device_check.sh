#!/usr/bin/env bash
# The CUDA tests and GPU benchmarks below in one call, for a machine with a CUDA
# GPU and torch (the device tool's machines have no Hydra, polars or Lightning,
# and no registry):
#   1. tests/test_cuda.py: the CUDA paths against CPU references, the bf16
#      MoE layer step with no host sync, and a torch.compile'd MoE LM against
#      its eager twin (aot_eager, and inductor where triton imports);
#   2. benchmarks/moe_layer.py in bf16: tokens/s and peak memory of the
#      SwiGLUExperts layer against the dense SwiGLU FFN, the per-expert loop and
#      (where transformers imports) HF's MixtralSparseMoeBlock, with jemalloc
#      preloaded where the machine has it (as the published CPU runs; its JSON
#      records the allocator);
#   3. whether megablocks imports (it is not installed there and cannot be fetched);
#   4. benchmarks/expert_parallel.py: the expert-parallel MoE layer with nccl, one GPU
#      per process (more processes than GPUs run on CPU with gloo), checked against
#      the single-process layer.
# Usage, from the repository root:  bash benchmarks/device_check.sh [OUT_DIR]
# Writes its logs and JSON to OUT_DIR (default: $OUT, else benchmarks/out).
set -uo pipefail
out="${1:-${OUT:-benchmarks/out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="$(command -v python3 || command -v python)"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" - <<'PY'
import torch
import torch.nn.functional as F
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
print("grouped_mm available:", hasattr(F, "grouped_mm"))
PY
} 2>&1 | tee "$out/device.txt"

"$py" -m pytest -m gpu tests/test_cuda.py -p no:cacheprovider -q -rs 2>&1 | tee "$out/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}

jemalloc="$(ls /usr/lib/*/libjemalloc.so.2 2>/dev/null | head -n 1)"
LD_PRELOAD="$jemalloc${LD_PRELOAD:+ $LD_PRELOAD}" \
    "$py" benchmarks/moe_layer.py --out "$out/moe_layer_cuda.json" 2>&1 | tee "$out/moe_layer_cuda.log"
bench_rc=${PIPESTATUS[0]}

"$py" benchmarks/expert_parallel.py --no-plot --out "$out/expert_parallel.json" 2>&1 \
    | tee "$out/expert_parallel.log"
ep_rc=${PIPESTATUS[0]}

if "$py" -c "import megablocks" 2>/dev/null; then
    echo "megablocks imports: add its dMoE to benchmarks/moe_layer.py for the comparison" | tee -a "$out/device.txt"
else
    echo "megablocks is not installed here (no registry on this machine): no dMoE comparison" | tee -a "$out/device.txt"
fi
echo "tests rc=$tests_rc, benchmark rc=$bench_rc, expert_parallel rc=$ep_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$ep_rc" -eq 0 ]
