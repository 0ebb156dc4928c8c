#!/usr/bin/env bash
# The checks that need a CUDA machine, as one prepared script. Run from the repository root.
#
# 1. Here (a machine with internet), once: fetch the pure-Python wheels the GPU machine lacks into .whl/
#    (git-ignored through .git/info/exclude; about 20 MB, it travels with the working tree):
#        bash benchmarks/gpu_check.sh --fetch-wheels
#    The tool sends at most 64 MiB (tracked + untracked-not-ignored files + carried paths); the tracked tree
#    alone is about 69 MiB, 54 of it the two demo checkpoints, which none of the steps below reads. So move
#    them aside for the call and put them back after (--fetch-wheels prints the size that would travel):
#        mkdir -p /tmp/demo-aside && mv models/Stable-diffusion/sdstudio-*.safetensors /tmp/demo-aside/
#        ...the run...;  mv /tmp/demo-aside/sdstudio-*.safetensors models/Stable-diffusion/
# 2. On the lent GPU machine (device tool `run`, carry [".whl"], timeout_s 600; about 5-7 minutes on an H200):
#        bash benchmarks/gpu_check.sh
#    That machine has python3 with CUDA torch (and accelerate, safetensors, tokenizers, scipy, opencv,
#    pytest, pytest-xdist, hypothesis...) but no internet and no diffusers / torchsde / spandrel, and an
#    older transformers: the wheels are installed into /tmp/site and put first on PYTHONPATH with the
#    checkout itself (no venv, no `pip install -e .` needed: the package runs from the source tree).
# 3. Results come back from $OUT: gpu.txt (machine and versions), bench_families.log, families.jsonl,
#    RESULTS.md (benchmarks/families/RESULTS.md with the new section appended: copy it over the repo's),
#    test_cuda.log, tests_families.log (and the optional steps' logs).
#
# STEPS picks what runs, in order (default "families cuda familytests"):
#   families     benchmarks/bench_families.py --size reduced: sd1, sdxl, sdxl+refiner, sd3, flux-dev at real
#                widths with fewer blocks, each family's native size, fp16, ours vs diffusers' pipelines
#   cuda         tests/test_cuda.py (fp16 vs fp32, NV noise vs torch.randn on CUDA, placements, LoRA)
#   familytests  the SD3 / Flux / refiner / SDXL-file engine tests, on CUDA (every Engine picks CUDA + fp16)
#   full         bench_families.py --size full for sd1 and sdxl (real architectures; about 2-3 more minutes)
#   suite        the engine-level suite on CUDA (API/UI tests need packages that machine lacks)
#   txt2img vae  the older per-step and VAE-memory benchmarks
# SIZE (default reduced) is the families step's --size; ALLOW_CPU=1 lets the script run without CUDA (a dry run
# of the script itself, e.g. here: ALLOW_CPU=1 SIZE=tiny STEPS=families PATH=$PWD/.venv/bin:$PATH bash ...).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
WHEELS="diffusers==0.42.1 transformers==5.24.0 torchsde==0.2.6 trampoline==0.1.2 spandrel==0.4.2"

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .git/info
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  PY=${PYTHON:-python3}; [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS || exit 1
  ls -la .whl
  sent=$( { git ls-files -z; git ls-files -z -o --exclude-standard; find .whl -type f -print0; } \
          | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {printf "%.1f", s / 1048576}')
  echo "would travel now (present files): $sent MiB of at most 64 MiB"; exit 0
fi

OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/gpu.txt"
if ! python3 -c "import torch, diffusers, torchsde; assert torch.cuda.is_available() or '${ALLOW_CPU:-}'" \
    2>/dev/null; then
  echo "missing CUDA or packages: carry .whl (made here by 'bash benchmarks/gpu_check.sh --fetch-wheels')" | tee -a "$OUT/gpu.txt"
  exit 2
fi
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$OUT/gpu.txt"
start=$SECONDS
stamp() { echo "== $1 done at $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"; }

for step in ${STEPS:-families cuda familytests}; do
  case $step in
    families)  # files are written in fp16 (the engine's CUDA plan), one family folder at a time
      timeout 290 python3 benchmarks/bench_families.py --size "${SIZE:-reduced}" --repeats 3 \
        --json "$OUT/families.jsonl" --label "gpu_check.sh" 2>&1 | tee "$OUT/bench_families.log" | grep -v '^{'
      cp benchmarks/families/RESULTS.md "$OUT/RESULTS.md" ;;
    full)
      timeout 240 python3 benchmarks/bench_families.py --size full --families sd1,sdxl --repeats 3 \
        --json "$OUT/families.jsonl" --label "gpu_check.sh" 2>&1 | tee "$OUT/bench_families_full.log" | grep -v '^{'
      cp benchmarks/families/RESULTS.md "$OUT/RESULTS.md" ;;
    cuda)  # prints its measured differences (-s)
      timeout 150 python3 -m pytest -q -rfE -s -p no:cacheprovider -m "not full" tests/test_cuda.py 2>&1 \
        | tee "$OUT/test_cuda.log" | grep -E "mean|max|passed|failed|Error" | tail -30 ;;
    familytests)
      timeout 75 python3 -m pytest -q -rfE -n 4 -p no:cacheprovider -m "not full" tests/test_flow_models.py \
        tests/test_dit_models.py tests/test_refiner.py tests/test_sdxl_files.py 2>&1 | tee "$OUT/tests_families.log" | tail -15 ;;
    suite)
      timeout 200 python3 -m pytest -q -rfE -n 8 -p no:cacheprovider -m "not full" tests --ignore=tests/test_cuda.py \
        --ignore=tests/test_api_jobs.py --ignore=tests/test_fuzz_api.py --ignore=tests/test_server.py \
        --ignore=tests/test_styles.py --ignore=tests/test_ui_page.py --ignore=tests/test_webuiapi.py \
        --ignore=tests/test_cli.py --ignore=tests/test_crash_recovery.py 2>&1 | tee "$OUT/suite_on_cuda.log" | tail -15 ;;
    txt2img)
      timeout 200 python3 benchmarks/bench_txt2img.py --size 512 --lo 5 --hi 25 --repeat 2 2>&1 \
        | tee "$OUT/bench_txt2img.log" | grep -v '^{' ;;
    vae)
      { timeout 120 python3 benchmarks/bench_vae.py --size 1024 --upscale-size 512 &&
        timeout 120 python3 benchmarks/bench_vae.py --size 2048 --skip-upscale; } 2>&1 | tee "$OUT/bench_vae.log" | grep -v '^{' ;;
    *) echo "unknown step $step" ;;
  esac
  stamp "$step"
done
