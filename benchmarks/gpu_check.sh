#!/usr/bin/env bash
# The checks that need a CUDA machine, as one script (run from the repo root on a lent GPU machine).
# Pure-Python wheels the machine lacks travel in .whl/ (see benchmarks/README.md); results go to $OUT.
set -o pipefail
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# 1. CUDA-only tests, then the engine-level suite on CUDA (every Engine picks CUDA + fp16 by itself);
#    API/UI tests need packages this machine lacks and run in CI instead.
timeout 120 python3 -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py -s 2>&1 | tee "$OUT/test_cuda.log" | tail -40
timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider tests --ignore=tests/test_cuda.py \
  --ignore=tests/test_api_jobs.py --ignore=tests/test_fuzz_api.py --ignore=tests/test_server.py \
  --ignore=tests/test_styles.py --ignore=tests/test_ui_page.py --ignore=tests/test_webuiapi.py \
  --ignore=tests/test_cli.py --ignore=tests/test_crash_recovery.py 2>&1 | tee "$OUT/suite_on_cuda.log" | tail -40
# 2. per-step time vs bare diffusers, fp16 at 512x512
timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_txt2img.py --size 512 --lo 5 --hi 25 --repeat 2 2>&1 | tee "$OUT/bench_txt2img.log" | tail -5
