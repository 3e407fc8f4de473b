#!/usr/bin/env bash
# gpu_check.sh OUT -- everything a GPU session should run, in one go, on a machine with one NVIDIA
# GPU (H100/H200), this repository and a CUDA build of torch already installed (nothing is downloaded).
#
#   bash benchmarks/gpu_check.sh "$OUT"
#
# 1. builds the extension in place with its CUDA kernels (sm_80, sm_90), with the system gcc/g++
#    (a wrapper compiler that links libstdc++ statically breaks the error messages: RESULTS.md);
# 2. runs tests/test_cuda.py (the CUDA kernels against the CPU ones);
# 3. times, bf16, B=1, Hq=8, Hkv=2, D=64, block 16/16, merge 16, topk 64, at 16K, 64K, 256K:
#    MS attention forward and forward+backward against flash SDPA (and flash-attn when importable),
#    in bench_attention.py; the selection (exact, and multi-scale with 64 regions a coarse region, 4 kept),
#    the forward and the backward alone, in bench_ops.py;
#    packed sequences (cu_seqlens: one launch sequence per sequence) against a padded batch, for 8 long
#    and 64 short sequences, in bench_packed.py.
# Each step has its own time limit (645 s in all, most of it the build's and the tests' margins); every
# step's output, the GPU's name and the versions go to OUT (summary.txt first). The exit status is the
# first failure's.
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() { # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.txt, note the outcome
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$SUMMARY"
    if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
    return $rc
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    $PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
    git rev-parse HEAD 2>/dev/null
} | tee -a "$SUMMARY"

CC=${CC:-/usr/bin/gcc} CXX=${CXX:-/usr/bin/g++} MSATTN_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    step build 240 $PY setup.py -q build_ext --inplace || { echo "build failed: see build.txt" | tee -a "$SUMMARY"; exit $status; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step test_cuda 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
tail -n 3 "$OUT/test_cuda.txt" >> "$SUMMARY"

IMPLS=sdpa,msattn
$PY -c 'import flash_attn' 2>/dev/null && IMPLS=sdpa,msattn,flash
SHAPE=(--heads 8 --kv-heads 2 --head-dim 64 --block-q 16 --block-k 16 --merge 16 --topk 64 --dtype bfloat16)
step attention 150 $PY benchmarks/bench_attention.py --device cuda --lengths 16384,65536,262144 --impls $IMPLS \
    "${SHAPE[@]}" --warmup 2 --repeats 5 --json "$OUT/attention.json"
tail -n 12 "$OUT/attention.txt" >> "$SUMMARY"
step ops 60 $PY benchmarks/bench_ops.py --device cuda --lengths 16384,65536,262144 "${SHAPE[@]}" --warmup 3 --repeats 10 \
    --coarse-regions 64 --coarse-topk 4
tail -n 5 "$OUT/ops.txt" >> "$SUMMARY"
SHORT=$($PY -c 'import random; r = random.Random(0); print(",".join(str(r.randint(64, 512)) for _ in range(64)))')
step packed 45 bash -c "$PY benchmarks/bench_packed.py --device cuda ${SHAPE[*]} --repeats 10 --json $OUT/packed_long.json \
    && $PY benchmarks/bench_packed.py --device cuda ${SHAPE[*]} --repeats 10 --lengths $SHORT --json $OUT/packed_short.json"
tail -n 10 "$OUT/packed.txt" >> "$SUMMARY"

echo "gpu_check: exit $status" | tee -a "$SUMMARY"
exit $status
