#!/usr/bin/env bash
# Set up .venv (pinned versions + test dependencies) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
# CI runs this command: a test whose data (../shared/data) or test dependency is missing fails instead of skipping
export DIFFUSIONSEG_REQUIRE_DATA="${DIFFUSIONSEG_REQUIRE_DATA:-1}"
exec .venv/bin/python -m pytest "$@"
