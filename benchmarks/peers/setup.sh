#!/usr/bin/env bash
# Set up the peers that benchmarks/peers/bench_peers.py compares sdstudio with, each in its own venv
# outside the repository (never in .venv). Nothing here installs or changes torch:
#   - sdcpp: stable-diffusion-cpp-python from PyPI, built from source (C++, CPU, -march=native), with numpy.
#   - comfy: ComfyUI's engine from a local copy of its git repository (ComfyUI is not on PyPI), running on
#     sdstudio's own torch/diffusers/transformers: the venv reads .venv's site-packages through a .pth file
#     and gets only the few packages .venv lacks (einops, av, torchvision without deps).
#   - invokeai: InvokeAI from PyPI on .venv's torch the same way; its other pins (diffusers 0.40,
#     transformers 5.5, numpy 1.26, fastapi 0.141, ...) go into its own venv, which shadows .venv's.
# Usage: bash benchmarks/peers/setup.sh [sdcpp] [comfy] [invokeai]     (no argument: all three)
# Environment:
#   SDSTUDIO_PEERS   where the venvs go (default /work/peers; bench_peers.py looks there too)
#   COMFYUI_SRC      a ComfyUI checkout to copy, or COMFYUI_GIT a (bare) git repository of ComfyUI to
#                    extract HEAD from (default /work/.mirror/Comfy-Org+ComfyUI/repo)
#   SDCPP_CMAKE_ARGS extra CMake flags for stable-diffusion.cpp (default: CPU, native instructions)
# The sd.cpp build runs at nice 19 with one compile job: it takes a while (about 30 min on 2 cores).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PEERS="${SDSTUDIO_PEERS:-/work/peers}"
VENV_PY="$REPO/.venv/bin/python"
BASE_PY="$("$VENV_PY" -c 'import sys; print(sys.base_prefix)')/bin/python3"  # .venv's own interpreter
VENV_SITE="$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
TORCH="$("$VENV_PY" -c 'import torch; print(torch.__version__)')"
mkdir -p "$PEERS"
echo "peers in $PEERS; .venv torch $TORCH"

shares_venv() {  # a venv on .venv's interpreter that also sees .venv's packages (after its own)
  local dir="$1"
  [ -x "$dir/bin/python" ] || "$BASE_PY" -m venv "$dir"
  local site
  site="$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$VENV_SITE" > "$site/zz-sdstudio-venv.pth"
}

setup_sdcpp() {
  local dir="$PEERS/sdcpp"
  [ -x "$dir/bin/python" ] || "$BASE_PY" -m venv "$dir"
  CMAKE_BUILD_PARALLEL_LEVEL=1 CMAKE_ARGS="${SDCPP_CMAKE_ARGS:--DGGML_NATIVE=ON -DSD_BUILD_EXAMPLES=OFF}" \
    nice -n 19 "$dir/bin/pip" install "stable-diffusion-cpp-python==0.4.7" numpy
  "$dir/bin/python" -c 'import stable_diffusion_cpp; print("sdcpp ok", stable_diffusion_cpp.__version__)'
}

setup_comfy() {
  local dir="$PEERS/comfy" src="$PEERS/comfy/ComfyUI"
  shares_venv "$dir"
  # torchvision matching .venv's torch (2.13 -> 0.28), without deps so torch stays as it is; its CUDA ops
  # do not load on a CPU torch, which ComfyUI's SD 1.5 path does not need (see bench_peers.py)
  local tv
  tv="$("$VENV_PY" -c 'import torch; v = torch.__version__.split("+")[0].split("."); print(f"0.{int(v[1]) + 15}.{v[2]}")')"
  "$dir/bin/pip" install --no-deps einops av "torchvision==$tv"
  if [ ! -f "$src/comfy/sd.py" ]; then
    if [ -n "${COMFYUI_SRC:-}" ]; then
      cp -r "$COMFYUI_SRC" "$src"
    else
      local git="${COMFYUI_GIT:-/work/.mirror/Comfy-Org+ComfyUI/repo}"
      [ -d "$git" ] || { echo "no ComfyUI source: set COMFYUI_SRC or COMFYUI_GIT" >&2; return 1; }
      mkdir -p "$src"
      # file by file: a mirror may lack a few large blobs (a llama tokenizer SD 1.5 does not use)
      git --git-dir="$git" ls-tree -r HEAD | awk '$2 == "blob" {print $4}' | while read -r path; do
        mkdir -p "$src/$(dirname "$path")"
        git --git-dir="$git" show "HEAD:$path" > "$src/$path" 2>/dev/null || { rm -f "$src/$path"; echo "skipped $path"; }
      done
      git --git-dir="$git" log -1 --format='%H %cd' > "$src/.sdstudio-source-commit"
    fi
  fi
  (cd "$src" && "$dir/bin/python" -c 'import sys; sys.path.insert(0, "."); import comfyui_version; print("comfy ok", comfyui_version.__version__)')
}

setup_invokeai() {
  local dir="$PEERS/invokeai" constraints
  shares_venv "$dir"
  constraints="$(mktemp)"
  printf 'torch==%s\ntorchvision==%s\ndiffusers==0.40.0\n' "${TORCH%%+*}" \
    "$("$VENV_PY" -c 'import torch; v = torch.__version__.split("+")[0].split("."); print(f"0.{int(v[1]) + 15}.{v[2]}")')" > "$constraints"
  nice -n 19 "$dir/bin/pip" install -c "$constraints" "invokeai==6.14.2"
  rm -f "$constraints"
  "$dir/bin/python" -c 'import invokeai.version as v; print("invokeai ok", v.__version__)'
}

for peer in "${@:-sdcpp comfy invokeai}"; do
  for p in $peer; do
    case "$p" in
      sdcpp) setup_sdcpp ;;
      comfy) setup_comfy ;;
      invokeai) setup_invokeai ;;
      *) echo "unknown peer $p (sdcpp, comfy, invokeai)" >&2; exit 2 ;;
    esac
  done
done
after="$("$VENV_PY" -c 'import torch; print(torch.__version__)')"
[ "$after" = "$TORCH" ] || { echo "torch in .venv changed: $TORCH -> $after" >&2; exit 1; }
echo "done; .venv torch still $after"
