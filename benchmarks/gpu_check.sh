#!/usr/bin/env bash
# The GPU check in one command: on a machine with an NVIDIA GPU, a CUDA build of torch
# and Triton (any recent CUDA image has both), in about 10 minutes:
#   1. the tests marked `cuda` (Triton kernels against the dense reference, mixed steps
#      of nine variants equal to each fine-tune materialized, the base bit-exact after
#      swaps, the HTTP surface's core), log in benchmarks/results/gpu-tests.log;
#   2. benchmarks/gpu_serving.py: the sparse product against the dense GEMM per matrix
#      shape, and serving the base alone, 16 and 64 Zipf variants at p = 0.99 and 0.999,
#      bf16, 32 and 128 concurrent requests, into benchmarks/results/gpu.json.
#
#   benchmarks/gpu_check.sh                     # missing packages from the package index
#   benchmarks/gpu_check.sh --download DIR      # on a machine with the index: fetch the
#                                               # wheels an offline GPU machine lacks
#   benchmarks/gpu_check.sh --wheelhouse DIR    # on the offline GPU machine: install them
#   benchmarks/gpu_check.sh --shape llama-8b    # other options go to gpu_serving.py
#
# It makes a virtual environment (.venv-gpu) over the machine's own packages, so the
# machine's CUDA torch and Triton are used, never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."

# what deltaserve needs beyond torch, transformers, safetensors, numpy, tqdm and httpx
# (a CUDA image has those), and what the tests need beyond pytest
DEPS=(fastapi uvicorn "pydantic>=2.7" "pydantic-settings>=2.3" "prometheus-client>=0.20"
      "gguf>=0.10" "accelerate>=0.34" "peft>=0.12")
wheelhouse=""
rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --download)
      mkdir -p "$2"
      python3 -m pip download --only-binary=:all: --python-version "${PYVER:-3.12}" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$2" "${DEPS[@]}"
      echo "wheels in $2: copy them beside the checkout on the GPU machine"
      exit 0 ;;
    --wheelhouse) wheelhouse="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) rest+=("$1"); shift ;;
  esac
done

python3 -c 'import torch, triton; assert torch.cuda.is_available(), "no CUDA device"' || {
  echo "gpu_check: needs a CUDA device, a CUDA build of torch and triton" >&2; exit 2; }
[ -x .venv-gpu/bin/python ] || python3 -m venv --system-site-packages .venv-gpu
pip=(.venv-gpu/bin/python -m pip install -q)
if [ -n "$wheelhouse" ]; then pip+=(--no-index --find-links "$wheelhouse"); fi
"${pip[@]}" "${DEPS[@]}"
.venv-gpu/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
  || .venv-gpu/bin/python -m pip install -q --no-deps -e .
mkdir -p benchmarks/results
.venv-gpu/bin/python -c 'import torch, triton; print("gpu:", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)'

echo "== the cuda tests"
set +e
TRITON_INTERPRET=0 timeout 300 .venv-gpu/bin/python -m pytest -q -p no:cacheprovider -m cuda \
  tests/server/engine/test_cuda.py tests/deltastore/test_apply.py 2>&1 | tee benchmarks/results/gpu-tests.log
tests=${PIPESTATUS[0]}
set -e

echo "== serving and the kernel on the GPU"
TRITON_INTERPRET=0 timeout 480 .venv-gpu/bin/python -m benchmarks.gpu_serving \
  --out benchmarks/results/gpu.json "${rest[@]}"
echo "gpu_check: tests exit status $tests; results in benchmarks/results/gpu.json"
exit "$tests"
