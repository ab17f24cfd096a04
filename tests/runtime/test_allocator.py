"""The allocator a command restarts itself on (`muxtune.common.allocator`): what MUXTUNE_MALLOC
chooses, the restart itself in a real process, and a bad choice refused with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from muxtune.common import allocator
from muxtune.common.allocator import ALLOCATOR_ENV, chosen_allocator, preloaded_libraries
from muxtune.common.errors import UserError

PROBE = (
    "from muxtune.common.allocator import active_allocator, restart_with_allocator\n"
    "restart_with_allocator('probe')\n"
    "import os; print(active_allocator()); print(os.environ.get('LD_PRELOAD', ''))\n"
)


def probe(**env: str) -> subprocess.CompletedProcess:
    """Run a process that restarts itself as a command does and prints its allocator and LD_PRELOAD."""
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ALLOCATOR_ENV)}
    return subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, env={**environ, **env}
    )


def test_choice_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ALLOCATOR_ENV, "system")
    assert chosen_allocator() is None
    library = tmp_path / "libmalloc.so"
    library.write_bytes(b"")
    monkeypatch.setenv(ALLOCATOR_ENV, str(library))
    assert chosen_allocator() == str(library)
    monkeypatch.setenv(ALLOCATOR_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(UserError, match=f"{ALLOCATOR_ENV}=.*missing.so: no such file"):
        chosen_allocator()


def test_auto_takes_tcmalloc_when_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    found = {"tcmalloc": "libtcmalloc.so.4"}
    monkeypatch.setattr(allocator.ctypes.util, "find_library", found.get)
    assert chosen_allocator() == ("libtcmalloc.so.4" if sys.platform.startswith("linux") else None)
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    assert chosen_allocator() is None


def test_preload_list_takes_spaces_and_colons() -> None:
    assert preloaded_libraries({"LD_PRELOAD": " /a/libx.so:/b/liby.so  libz.so "}) == [
        "/a/libx.so",
        "/b/liby.so",
        "libz.so",
    ]
    assert preloaded_libraries({}) == []


def test_system_choice_runs_without_restart() -> None:
    done = probe(**{ALLOCATOR_ENV: "system"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["system", ""]


def test_bad_choice_exits_2_naming_the_variable(tmp_path: Path) -> None:
    done = probe(**{ALLOCATOR_ENV: str(tmp_path / "nothing.so")})
    assert done.returncode == 2
    assert done.stderr.strip() == f"probe: error: {ALLOCATOR_ENV}={tmp_path / 'nothing.so'}: no such file " + (
        "(give 'auto', 'system' or a malloc library's path)"
    )
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(chosen_allocator() is None, reason="no tcmalloc on this machine (apt: libtcmalloc-minimal4)")
def test_restart_preloads_tcmalloc_once() -> None:
    done = probe(**{ALLOCATOR_ENV: "auto"})
    assert done.returncode == 0, done.stderr
    active, preload = done.stdout.splitlines()
    assert "tcmalloc" in active
    assert preload == chosen_allocator()
    already = probe(**{ALLOCATOR_ENV: "auto", "LD_PRELOAD": preload})
    assert already.stdout.splitlines() == [active, preload]
