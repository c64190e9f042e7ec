#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install DiffusionSeg with the pinned versions.
# Usage: source-free; prints nothing but pip's errors. Pass "test" to add the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.installed${extra}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # torch first, from the pinned CPU wheel, so no other package pulls a multi-GB CUDA build.
  .venv/bin/python -m pip install -q -c constraints.txt torch
  .venv/bin/python -m pip install -q -c constraints.txt -e ".${extra}"
  touch "$stamp"
fi
