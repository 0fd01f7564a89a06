#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go: the test suite (CUDA tests included), the kernel benchmark and the
# training-throughput benchmark with SDPA vs our Triton attention. Results go to $OUT (default: gpu_results/).
#   bash bench/run_gpu_checks.sh            # on a machine with a CUDA GPU, from the repository root
set -u
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
export PYTHONPATH=$PWD
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
# tests: the whole suite, CUDA-only tests included (xdist when present)
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "-o addopts=-ra")  # pyproject asks for -n auto: without pytest-xdist, plain
timeout 300 $PY -m pytest -q -p no:cacheprovider $XDIST ${TESTS:-tests} > "$OUT/tests.txt" 2>&1
tail -25 "$OUT/tests.txt"
# kernels: ours vs PyTorch (bf16, then fp16 attention only for a short sweep)
timeout 300 $PY bench/bench_kernels.py > "$OUT/bench_kernels.txt" 2>&1
tail -60 "$OUT/bench_kernels.txt"
# training throughput, GPT-2 small shape, SDPA vs Triton attention
for impl in sdpa triton; do
  timeout 120 $PY bench/bench_pretrain.py --device=cuda --dtype=bfloat16 --n_layer=12 --n_head=12 --n_embd=768 \
    --block_size=1024 --vocab_size=50304 --batch_size=16 --attn_impl=$impl --peak_tflops=989 --gen_tokens=200
done > "$OUT/bench_pretrain.txt" 2>&1
cat "$OUT/bench_pretrain.txt"
