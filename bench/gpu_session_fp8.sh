#!/usr/bin/env bash
# The FP8 / memory-lever GPU session (issue #24), in order, each step under `timeout` (limits add up to
# ~22 minutes; expected ~13 on an H100 with the defaults: SKIP steps or shrink rows to fit less). Tables go to stdout; logs, JSON and the loss-curve PNG to $OUT.
#
#   bash bench/gpu_session_fp8.sh                # on the GPU machine, from the repository root
#   SKIP="bench_qwen" NUMERICS_STEPS=200 bash bench/gpu_session_fp8.sh
#   DEVICE=cpu bash bench/gpu_session_fp8.sh     # CPU smoke of the CPU-runnable parts (tiny shapes)
#
# Wheels: carry .whl/base and .whl/ours (bench/fetch_base_wheels.sh; torchao is in .whl/base when it
# could be fetched); they are installed into /tmp/site when present. Steps (SKIP: space-separated names):
#   tests       the GPU tests of the FP8 work and the memory levers, and the count `pytest -m gpu` selects
#   gemms       bench/fp8_gemm.py: each Llama-1B / Qwen3-4B linear GEMM in bf16 and every FP8 recipe
#   numerics    bench/fp8_numerics.py: Llama-3.2-1B shape, bf16 vs FP8 ($NUMERICS_RECIPES), one PNG
#   bench_llama bench/llm_step.py, Llama-3.2-1B seq 4096: ours best / ours fp8 / HF best (fused) / HF equal mbs
#   bench_qwen  bench/llm_step.py, Qwen3-4B seq 4096 on one GPU with the memory levers (and FP8)
# Row lists: ROWS_LLAMA, ROWS_QWEN (e.g. add ours:mbs=1:bf16moments:gradbf16:recompute=selective).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/outputs/gpu_session_fp8}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
SKIP=${SKIP:-}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

if [ -d .whl/base ] && [ -d .whl/ours ] && [ "$DEVICE" = cuda ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/base/*.whl .whl/ours/*.whl >/dev/null 2>&1 || echo "wheel install failed (continuing)"
    export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | tr '\n' :)/tmp/site
fi
PY=${PY:-python3}
[ "$DEVICE" = cpu ] && PY="python3 -m uv run python"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 secs=$2; shift 2
    if [[ " $SKIP " == *" $name "* ]]; then echo "== $name: skipped"; return; fi
    echo "== $name (limit ${secs}s, elapsed so far ${SECONDS}s): $*"
    timeout --kill-after=10 "$secs" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E "Warning|warnings.warn|^\s*$" | tail -n 60
    echo "== $name: exit ${PIPESTATUS[0]} after ${SECONDS}s total"
}

if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
    step tests 240 $PY -m pytest -q -s -m gpu -p no:cacheprovider \
        packages/loongforge-kernels/tests/test_fp8_gpu.py packages/loongforge-kernels/tests/test_fp8.py \
        packages/loongforge-kernels/tests/test_gpu_marks.py packages/loongforge-backend-cuda/tests/test_fp8_gpu.py
    step gpu_count 120 $PY -m pytest -q --co -m gpu -p no:cacheprovider packages/loongforge-kernels/tests \
        packages/loongforge-backend-cuda/tests
    step gemms 120 $PY bench/fp8_gemm.py --tokens 8192
    step numerics ${NUMERICS_LIMIT:-300} $PY bench/fp8_numerics.py --out "$OUT/numerics" \
        --recipes "${NUMERICS_RECIPES:-blockwise}" --steps "${NUMERICS_STEPS:-300}" --seq 1024 --mbs 4
    step bench_llama ${LLAMA_LIMIT:-300} $PY bench/llm_step.py --steps 8 --warmup 2 --json "$OUT/llama.json" \
        --rows "${ROWS_LLAMA:-ours:mbs=8,ours:mbs=2,ours:mbs=8:fp8=blockwise,ours:mbs=8:fp8=adaptive,hf:fused:mbs=4,hf:fused:mbs=2}"
    step bench_qwen ${QWEN_LIMIT:-240} $PY bench/llm_step.py --model qwen3/qwen3_4b --mbs 1 --steps 6 --warmup 2 \
        --json "$OUT/qwen3_4b.json" \
        --rows "${ROWS_QWEN:-ours:bf16moments:gradbf16,ours:bf16moments:gradbf16:fp8=blockwise,ours:offload:gradbf16}"
else  # CPU smoke: the same scripts at tiny shapes (FP8 itself is refused on CPU, by design)
    step tests 600 $PY -m pytest -q -p no:cacheprovider packages/loongforge-kernels/tests/test_fp8.py \
        packages/loongforge-kernels/tests/test_gpu_marks.py packages/loongforge-backend-cuda/tests/test_fp8_backend.py
    step numerics 400 $PY bench/fp8_numerics.py --device cpu --out "$OUT/numerics" --model llama3/llama3_tiny \
        --seq 32 --mbs 2 --steps 3 --override model.vocab_size=1024
    step bench_llama 400 $PY bench/llm_step.py --device cpu --model llama3/llama3_tiny --seq 32 --mbs 2 --steps 2 \
        --warmup 1 --json "$OUT/llama.json" --rows "ours,ours:bf16moments:gradbf16:recompute=selective,hf:fused:gas=2:ckpt,hf"
fi
ls -la "$OUT" "$OUT/numerics" 2>/dev/null | grep -E "png|json|log" || true
echo "session done in ${SECONDS}s; outputs in $OUT"
