#!/usr/bin/env bash
# Create .venv and install sdstudio with everything it needs; a no-op when nothing changed.
# torch: on a machine with an NVIDIA driver pip picks its default (CUDA) build; elsewhere we pin the
# CPU build (torch==2.13.0). Override with SDSTUDIO_TORCH="torch==X.Y.Z".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "sdstudio: creating $VENV"
  "$PY" -m venv "$VENV"
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  TORCH_SPEC="${SDSTUDIO_TORCH:-torch}"
else
  TORCH_SPEC="${SDSTUDIO_TORCH:-torch==2.13.0}"
fi
STAMP="$VENV/.sdstudio-install"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "sdstudio: installing dependencies (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q -e ".[test,mediapipe]"
  # spandrel, the upscaler tests' reference, without its dependencies: they pull torchvision, which has no
  # CPU build on PyPI and would replace the CPU torch (the tests load only its ESRGAN and compact networks)
  "$VENV/bin/python" -m pip install -q --no-deps "spandrel==0.4.2"
  # controlnet_aux, the annotator tests' reference networks, without its dependencies for the same reason (its
  # package __init__ needs torchvision; the tests import the network modules they compare one by one)
  "$VENV/bin/python" -m pip install -q --no-deps "controlnet-aux==0.0.10"
  # mediapipe_face: the last mediapipe with the legacy face mesh, without its declared numpy<2 (the [mediapipe]
  # extra above brings what it imports, protobuf 4.25 among them); its wheels stop at Python 3.12
  "$VENV/bin/python" -m pip install -q --no-deps "mediapipe==0.10.21" ||
    echo "sdstudio: mediapipe 0.10.21 has no wheel for this Python; the mediapipe_face preprocessor stays unavailable"
  echo "$WANT" > "$STAMP"
fi
# The bundled demo model ships in models/Stable-diffusion (trained by python -m training.demo_model).
if [ ! -f models/Stable-diffusion/sdstudio-demo.safetensors ]; then
  echo "sdstudio: models/Stable-diffusion/sdstudio-demo.safetensors is missing (git checkout it, or retrain it with" \
       "'.venv/bin/python -m training.demo_model'); the UI starts without a model until one is in that folder"
fi
