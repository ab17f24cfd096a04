"""The progress display: plain lines off a terminal, an in-place table on one."""

from __future__ import annotations

import io

from muxtune.runtime.progress import ProgressDisplay


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = ProgressDisplay([("sentiment", 3), ("qa", 2)], stream)
    progress.step("sentiment", 1, 2.5, 100)
    progress.message("task qa: diverged")
    progress.step("qa", 2, 1.25, 50, "done")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and "\x1b" not in stream.getvalue()
    assert lines[0].startswith("sentiment") and "step     1/3" in lines[0] and "2.5000" in lines[0]
    assert lines[1] == "task qa: diverged"
    assert "done" in lines[2] and "tok/s" in lines[2]


def test_table_redrawn_in_place_on_a_terminal() -> None:
    stream = FakeTerminal()
    progress = ProgressDisplay([("sentiment", 3), ("qa", 2)], stream)
    progress.step("sentiment", 1, 2.5, 100)
    progress.step("qa", 1, 3.0, 80)
    progress.close()
    text = stream.getvalue()
    assert "\x1b[2F\x1b[J" in text, "the previous two-line table is cleared before redrawing"
    last_table = text.split("\x1b[J")[-1].splitlines()
    assert [line.split()[0] for line in last_table] == ["sentiment", "qa"]
