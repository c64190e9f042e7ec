#!/usr/bin/env bash
# Set up .venv (pinned versions) and run the demo: the main job on the bundled sample CT with shipped defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/diffusionseg demo "$@"
