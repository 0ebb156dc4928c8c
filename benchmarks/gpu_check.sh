#!/usr/bin/env bash
# The checks that need a CUDA machine, as one script (run from the repo root on a lent GPU machine).
# Pure-Python wheels the machine lacks travel in .whl/ (see the README's Benchmarks); results go to $OUT.
# BENCHES picks the benchmarks (default: all); TESTS the test files (default: the whole engine-level suite).
set -o pipefail
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# 1. CUDA-only tests (printing their measured differences), then the engine-level suite on CUDA (every
#    Engine picks CUDA + fp16 by itself); API/UI tests need packages this machine lacks and run in CI.
timeout 150 python3 -m pytest -q -rfE -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | grep -E "mean|max|passed|failed|Error" | tail -30
TESTS=${TESTS:-tests}
timeout 200 python3 -m pytest -q -rfE -n 8 -p no:cacheprovider $TESTS --ignore=tests/test_cuda.py \
  --ignore=tests/test_api_jobs.py --ignore=tests/test_fuzz_api.py --ignore=tests/test_server.py \
  --ignore=tests/test_styles.py --ignore=tests/test_ui_page.py --ignore=tests/test_webuiapi.py \
  --ignore=tests/test_cli.py --ignore=tests/test_crash_recovery.py 2>&1 | tee "$OUT/suite_on_cuda.log" | tail -15
# 2. benchmarks
for bench in ${BENCHES:-txt2img vae}; do
  case $bench in
    txt2img) timeout 200 python3 benchmarks/bench_txt2img.py --size 512 --lo 5 --hi 25 --repeat 2 ;;
    vae) timeout 120 python3 benchmarks/bench_vae.py --size 1024 --upscale-size 512 &&
         timeout 120 python3 benchmarks/bench_vae.py --size 2048 --skip-upscale ;;
  esac 2>&1 | tee "$OUT/bench_$bench.log" | grep -v "^{"
done
