"""`muxtune-bench-kernels --quick` on the CPU: every case and implementation is timed and checked
against the per-task loop; a wrong implementation fails its check; a bad option exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from muxtune.tools import bench_kernels, bench_kernels_cases
from muxtune.tools.bench_kernels_cases import IMPLS


def test_quick_run_times_and_checks_every_implementation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    record = tmp_path / "BENCHMARKS.md"
    path = tmp_path / "r.json"
    assert bench_kernels.main(["--quick", "--device", "cpu", "--json", str(path), "--record", str(record)]) == 0
    report = json.loads(path.read_text())
    assert report["backend"] == "torch" and report["failed_checks"] == []
    assert report["ceilings"]["matmul_flops"] > 0 and report["ceilings"]["bandwidth"] > 0
    cases = report["cases"]
    assert {(c["tasks"], c["dist"]) for c in cases} == {(1, "uniform"), (4, "uniform"), (1, "skewed"), (4, "skewed")}
    for case in cases:
        assert sum(case["sizes"]) == case["tokens"] and case["flops"]["fwd+bwd"] == 3 * case["flops"]["fwd"]
        assert set(case["results"]) == set(IMPLS)
        for impl, result in case["results"].items():
            assert result["check"] == ("reference" if impl == "loop" else "passed"), (case["label"], impl, result)
            assert result["fwd_ms"] > 0 and result["fwd+bwd_ms"] > 0
    skewed = next(c for c in cases if c["tasks"] == 4 and c["dist"] == "skewed")
    assert 0 in skewed["sizes"] and max(skewed["sizes"]) > skewed["tokens"] // 2
    out = capsys.readouterr().out
    assert "fwd+bwd:" in out and "vs padded" in out
    text = record.read_text()
    assert text.startswith("# Benchmarks") and "## muxtune-bench-kernels" in text and "| segmented |" in text


def test_a_wrong_implementation_fails_its_check(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def wrong(c: bench_kernels_cases.CaseTensors):
        return bench_kernels_cases.run_loop(c) * 1.5

    monkeypatch.setitem(bench_kernels_cases.RUNNERS, "padded", wrong)
    argv = ["--quick", "--device", "cpu", "--tasks", "4", "--dist", "skewed", "--no-backward"]
    assert bench_kernels.main(argv) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "check(s) failed" in captured.err


@pytest.mark.parametrize(
    ("argv", "option"),
    [(["--tasks", "0,x"], "--tasks"), (["--dims", "64"], "--dims"), (["--dist", "zipf"], "--dist")],
)
def test_a_bad_option_exits_2_naming_it(argv: list[str], option: str, capsys: pytest.CaptureFixture) -> None:
    assert bench_kernels.main(["--quick", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"muxtune-bench-kernels: error: {option}:") and "Traceback" not in err
