"""Build and load `cpu_fused.c`, `cpu_lora.c` and `cpu_attention.c`, the CPU kernels, as one
shared library called through ctypes.

The library is compiled once per machine with the system's C compiler (``$CC``, else ``cc``)
and kept in a cache folder (``$MUXTUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/muxtune``, else
``~/.cache/muxtune``) under a name that hashes the source, the flags, the compiler's version and
the CPU's features, so an edit, another compiler or another machine builds afresh. Compiling takes
about a second; concurrent processes (the ranks of a job) each write a private file and move it
into place. Without a compiler, or with ``MUXTUNE_CPU_KERNELS=0``, there is no library and
callers keep torch's eager operators.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from muxtune.common.errors import UserError

FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp-simd",
    "--param=vect-partial-vector-usage=1",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fPIC",
)
SOURCES: dict[Path, tuple[str, ...]] = {
    Path(__file__).with_name("cpu_fused.c"): ("-ffp-contract=off",),
    Path(__file__).with_name("cpu_lora.c"): ("-ffp-contract=fast",),
    Path(__file__).with_name("cpu_attention.c"): ("-ffp-contract=fast",),
}
"""Each source with its own flags: the element-wise kernels round where eager torch rounds (no
fused multiply-adds), the products accumulate with them as BLAS does."""
HEADERS = tuple(Path(__file__).with_name(name) for name in ("cpu_bf16.h", "cpu_math.h", "cpu_vector.h"))
SWITCH = "MUXTUNE_CPU_KERNELS"
"""Environment switch: ``auto`` (default: build and use the kernels where a compiler exists), ``0``
(never), ``1`` (always: a failed build is an error)."""

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_f32 = ctypes.c_float
_u64 = ctypes.c_uint64
SIGNATURES: dict[str, tuple[type, ...]] = {
    "rms_norm_forward": (_ptr, _ptr, _ptr, _i64, _i64, _f32),
    "rms_norm_backward": (_ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32),
    "swiglu_forward": (_ptr, _ptr, _ptr, _i64, _i64),
    "swiglu_backward": (_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64),
    "rotary_forward": (_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64),
    "rotary_backward": (_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64),
    "cross_entropy": (_ptr, _ptr, _ptr, _ptr, _f32, _i64, _i64),
    "dropout_forward": (_ptr, _ptr, _i64, _i64, _u64, _i64, _f32),
    "dropout_backward": (_ptr, _ptr, _i64, _i64, _u64, _i64, _f32),
}
DTYPE_SUFFIXES = ("bf16", "f32")
SINGLE_SIGNATURES: dict[str, tuple[type | None, tuple[type, ...]]] = {
    "lora_rows_dot_bf16": (None, (_ptr, _ptr, _ptr, _i64, _i64, _i64, _f32)),
    "lora_expand_bf16": (None, (_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _f32)),
    "lora_outer_bf16": (None, (_ptr, _ptr, _ptr, _i64, _i64, _i64, _f32, _i64, _i64)),
    "attention_scratch_bytes": (_i64, (_i64, _i64)),
    "attention_forward_bf16": (None, (_ptr,) * 6 + (_i64,) * 6 + (_f32, _ptr, _i64)),
    "attention_backward_bf16": (None, (_ptr,) * 9 + (_i64,) * 6 + (_f32, _ptr, _i64)),
}
"""Kernels of one dtype: each name with its result type and argument types."""


class KernelBuildError(UserError):
    """``MUXTUNE_CPU_KERNELS=1`` and the fused CPU kernels could not be built."""


def cache_dir() -> Path:
    """Where built libraries are kept."""
    if os.environ.get("MUXTUNE_CACHE_DIR"):
        return Path(os.environ["MUXTUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "muxtune"


def switch_value() -> str:
    """The `SWITCH` setting: "auto", "0" or "1"."""
    value = os.environ.get(SWITCH, "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise KernelBuildError(f"{SWITCH} must be auto, 0 or 1, got {value!r}")
    return value


def _cpu_features() -> str:
    """The CPU's feature flags (what ``-march=native`` compiles for), else its name."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.processor()


def _library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256()
    parts = [" ".join(FLAGS).encode(), version.encode(), _cpu_features().encode()]
    for source, flags in SOURCES.items():
        parts += [source.read_bytes(), " ".join(flags).encode()]
    parts += [header.read_bytes() for header in HEADERS]
    for part in parts:
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / "kernels" / f"cpu_fused-{digest.hexdigest()[:16]}.so"


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=target.stem, dir=target.parent) as scratch_dir:
        objects = []
        for index, (source, flags) in enumerate(SOURCES.items()):
            objects.append(str(Path(scratch_dir) / f"{index}-{source.stem}.o"))
            _run_compiler([compiler, *FLAGS, *flags, "-c", str(source), "-o", objects[-1]])
        scratch = str(Path(scratch_dir) / "library.so")
        _run_compiler([compiler, "-shared", *objects, "-o", scratch, "-lm"])
        os.replace(scratch, target)


def _run_compiler(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise OSError(f"{command[0]} failed: {result.stderr.strip()[-2000:]}")


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        for suffix in DTYPE_SUFFIXES:
            function = getattr(library, f"{name}_{suffix}")
            function.argtypes = argtypes
            function.restype = None
    for name, (restype, argtypes) in SINGLE_SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = restype
    return library


_BUILD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built first where needed; None where they are switched off or cannot
    be built (a warning says why, once)."""
    with _BUILD_LOCK:
        return _build_and_load()


def _build_and_load() -> ctypes.CDLL | None:
    setting = switch_value()
    if setting == "0":
        return None
    try:
        compiler = os.environ.get("CC") or "cc"
        if shutil.which(compiler) is None:
            raise OSError(f"no C compiler ({compiler!r} not found)")
        path = _library_path(compiler)
        if not path.exists():
            _compile(compiler, path)
        return _load(path)
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        if setting == "1":
            raise KernelBuildError(f"the fused CPU kernels could not be built: {error}") from error
        warnings.warn(f"fused CPU kernels unavailable, using eager operators: {error}", RuntimeWarning, stacklevel=2)
        return None
