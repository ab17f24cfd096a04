"""`bench_planner` end to end on builtin:tiny-llama: every mode compiled, each distinct plan run
through the user's path, predicted beside measured round times."""

from __future__ import annotations

from pathlib import Path

import pytest
from user_path import write_job

from muxtune.tools.bench_planner import main


def test_bench_planner_runs_each_distinct_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path)
    assert main(["--spec", str(job), "--steps", "2"]) == 0
    out, err = capsys.readouterr()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()[2:]]
    assert [row[0].split(" (run")[0] for row in rows] == ["planner", "fuse all", "no fusion"]
    runs = {row[0].split("(run ")[1].rstrip(")") for row in rows}
    assert err.count("done:") == len(runs) >= 2, "fuse-all and no-fusion differ; equal plans run once"
    for row in rows:
        predicted, measured = float(row[3]), float(row[4])
        assert predicted > 0 and measured > 0
        error = float(row[5].rstrip("%")) / 100
        rounding = 0.0005 / measured * (1 + predicted / measured) + 0.0006  # 3-decimal seconds, 0.1% error
        assert error == pytest.approx(predicted / measured - 1, abs=rounding)
        assert float(row[6].replace(",", "")) > 0 and float(row[8]) > 0
    assert rows[0][7] == "1.00x"
