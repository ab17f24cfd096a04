"""How the console commands end: running threads are waited for, atexit handlers run and buffered
output is written, the exit status is kept, and the interpreter's teardown of modules and
objects is skipped."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import atexit, sys, threading, time
from muxtune.common.cli import exit_process

class Kept:
    def __del__(self):
        print("torn down")

kept = Kept()
atexit.register(lambda: print("atexit ran"))
threading.Thread(target=lambda: (time.sleep(0.3), print("thread done, ", end=""))).start()
sys.stdout.write("buffered, ")
sys.stderr.write("to stderr")
exit_process(3)
"""


def test_exit_process_flushes_runs_atexit_and_skips_teardown() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout == "buffered, thread done, atexit ran\n", "no object is torn down after the atexit handlers"
    assert done.stderr == "to stderr"


def test_under_a_profiler_the_process_exits_normally(tmp_path) -> None:
    script = tmp_path / "command.py"
    script.write_text("from muxtune.common.cli import exit_process\nexit_process(3)\n")
    profile = tmp_path / "command.prof"
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(profile), str(script)], capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr  # cProfile catches the command's SystemExit and ends itself
    assert profile.stat().st_size > 0, "cProfile wrote its results after the command ended"
