#!/usr/bin/env bash
# Set up (first run) and launch sdstudio's web UI at http://127.0.0.1:7860.
# A1111 launch flags pass through: ./webui.sh --api --nowebui --port 7861 --api-auth user:pass
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
exec .venv/bin/sdstudio serve "$@"
