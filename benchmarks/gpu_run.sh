#!/usr/bin/env bash
# The GPU calls of the speed and memory issues (20, 17, 23), each one device call of < 10 minutes.
# Run from the repository root on the lent GPU machine, with the wheels of diffusers and gguf carried
# in .whl/ (benchmarks/README.md says how). Everything that must come back is written under $OUT.
#
#   bash benchmarks/gpu_run.sh kernels   # kernel tests, klein-4B GEMM table, klein-4B steps in the same mode
#   bash benchmarks/gpu_run.sh verify    # every CUDA test, the memory estimate, the W1A8 GEMM rows
#   bash benchmarks/gpu_run.sh mma       # the CUDA C++ W1A16 kernel: build, tests, GEMM rows, klein steps
#   bash benchmarks/gpu_run.sh more      # SD GEMM table and steps, W1A8 image PSNR, CUDA tests, memory estimate
#   bash benchmarks/gpu_run.sh te4bit    # the 4-bit text encoder's memory and time
set -uo pipefail
stage=${1:?stage: kernels | quick | verify | mma | te4bit-mma | more | te4bit}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 BENCH_GIT_COMMIT=${BENCH_GIT_COMMIT:-unknown}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/$stage-gpu.txt"
t0=$SECONDS
case $stage in
  kernels)  # the first call: what decides the kernels (tests, klein GEMM table, klein steps)
    timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_w1.py 2>&1 | tail -25 | tee "$OUT/tests.log"
    timeout 150 python3 benchmarks/bench_gemm.py --families klein-4B --ms 1,16,256,1536,4096 \
      --paths dense,dequant,w1a16,w1a16x1,fp8,fp8_gemm,int8_gemm,scaled_mm \
      --json "$OUT/gemm_klein.json" 2>&1 | grep -v -i warn | tee "$OUT/gemm_klein.log"
    timeout 150 python3 benchmarks/bench_step_modes.py --models klein-4b --kernels triton,w1 --acts 16,fp8 \
      --json "$OUT/step_klein.json" 2>&1 | grep -v -i -e warn -e "JSON result" | tee "$OUT/step_klein.log"
    ;;
  quick)  # a short lease: the kernel tests and the headline GEMM rows only
    timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_w1.py 2>&1 | tail -25 | tee "$OUT/tests.log"
    timeout 120 python3 benchmarks/bench_gemm.py --families klein-4B --ms 1,16,256,1536,4096 \
      --paths dense,w1a16,fp8_gemm,scaled_mm --json "$OUT/gemm_quick.json" 2>&1 | grep -v -i warn | tee "$OUT/gemm_quick.log"
    ;;
  verify)  # every CUDA test (W1A8 fp8/int8 and W4A16 included), the memory estimate (17), the W1A8 GEMM rows
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_w1.py 2>&1 | tail -25 | tee "$OUT/tests.log"
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_cuda_engine.py 2>&1 \
      | tail -15 | tee "$OUT/tests_more.log"
    timeout 120 python3 benchmarks/bench_memory_estimate.py --device cuda --models sd15,klein-4b,sdxl \
      --out "$OUT/memory_estimate.json" 2>&1 | tail -30 | tee "$OUT/memory_estimate.log"
    timeout 120 python3 benchmarks/bench_gemm.py --families klein-4B --ms 1,16,256,1536,4096 \
      --paths dense,w1a16,fp8,int8,scaled_mm,int_mm --json "$OUT/gemm_w1a8.json" 2>&1 | grep -v -i warn | tee "$OUT/gemm_w1a8.log"
    ;;
  mma)  # the CUDA C++ W1A16 kernel: build, tests, GEMM rows on every family, klein-4B steps
    nvcc --version | tail -2 | tee "$OUT/mma-nvcc.txt"
    export BONSAI_CACHE_DIR=${BONSAI_CACHE_DIR:-$PWD/models/cache}
    ( time python3 -c "import torch; from bonsai_core.quant import cuda_w1; print(cuda_w1.why_not(torch.device('cuda')) or 'built')" ) 2>&1 | tee "$OUT/mma-build.log"
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_w1.py 2>&1 | tail -30 | tee "$OUT/mma-tests.log"
    timeout 150 python3 benchmarks/bench_gemm.py --families klein-4B,SD1.5/SDXL --ms 1,16,256,1536,4096 \
      --paths dense,mma,auto --json "$OUT/gemm_mma.json" 2>&1 | grep -v -i warn | tee "$OUT/gemm_mma.log"
    timeout 150 python3 benchmarks/bench_step_modes.py --models klein-4b,sd15 --kernels triton,mma --acts 16 \
      --json "$OUT/step_mma.json" 2>&1 | grep -v -i -e warn -e "JSON result" | tee "$OUT/step_mma.log"
    timeout 90 python3 benchmarks/probe_blockwise_fp8.py --json "$OUT/probe_fp8.json" 2>&1 | grep -v -i warn \
      | tail -20 | tee "$OUT/probe_fp8.log"
    ;;
  te4bit-mma)  # a short lease: the 4-bit text encoder's numbers, then the mma kernel's tests and small-M rows.
    # One console log (the lent machine sends back at most 8 files): te4bit-mma.log, plus three JSONs
    log=$OUT/te4bit-mma.log
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_q4_affine.py tests/test_cuda_engine.py \
      -k "pinning or lend or park or klein or promot" 2>&1 | tail -6 | tee -a "$log"
    timeout 280 python3 benchmarks/bench_te4bit.py --device cuda --repeats 2 --json "$OUT/te4bit.json" 2>&1 \
      | grep -v -e "Loading weights" -e "Writing model shards" | tee -a "$log"
    export BONSAI_CACHE_DIR=${BONSAI_CACHE_DIR:-$PWD/models/cache}
    # 100 s cut the last run's failure message off: the mma build alone takes about a minute
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_w1.py tests/test_fp8_blockwise.py 2>&1 \
      | tail -25 | tee -a "$log"
    timeout 60 python3 benchmarks/bench_gemm.py --families klein-4B,SD1.5/SDXL --ms 1,16 \
      --paths dense,mma,mma_wide --json "$OUT/gemm_mma.json" 2>&1 | grep -v -i warn | tee -a "$log"
    timeout 60 python3 benchmarks/bench_gemm.py --families klein-4B --ms 1536,4096 \
      --paths dense,fp8blk,scaled_mm --json "$OUT/gemm_fp8blk.json" 2>&1 | grep -v -i warn | tee -a "$log"
    ;;
  more)  # the second: SD shapes, SD steps, images, the other CUDA tests, the memory estimate
    timeout 90 python3 benchmarks/bench_gemm.py --families SD1.5/SDXL --ms 1,16,256,4096,8192 \
      --paths dense,dequant,w1a16,fp8_gemm,scaled_mm --json "$OUT/gemm_sd.json" 2>&1 | grep -v -i warn | tee "$OUT/gemm_sd.log"
    timeout 200 python3 benchmarks/bench_step_modes.py --models sd15,sdxl --kernels triton,w1 --acts 16,fp8 \
      --json "$OUT/step_sd.json" 2>&1 | grep -v -i -e warn -e "JSON result" | tee "$OUT/step_sd.log"
    timeout 60 python3 benchmarks/bench_w1a8_images.py --json "$OUT/w1a8_images.json" 2>&1 | tail -8 | tee "$OUT/w1a8_images.log"
    timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_kernels.py tests/test_cuda_engine.py 2>&1 \
      | tail -15 | tee "$OUT/tests_more.log"
    timeout 120 python3 benchmarks/bench_memory_estimate.py --device cuda --models sd15,klein-4b,sdxl \
      --out "$OUT/memory_estimate.json" 2>&1 | tail -30 | tee "$OUT/memory_estimate.log"
    ;;
  te4bit)
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_q4_affine.py -k "pinning or lend or park" 2>&1 \
      | tail -3 | tee "$OUT/te4bit-tests.log"
    timeout 500 python3 benchmarks/bench_te4bit.py --device cuda --json "$OUT/te4bit.json" 2>&1 | tail -60 \
      | tee "$OUT/te4bit.log"
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
echo "stage $stage took $((SECONDS - t0)) s"
