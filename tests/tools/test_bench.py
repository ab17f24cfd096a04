"""`muxtune-bench` end to end on builtin:tiny-llama (fp32, two tasks, one step): every row runs
in its own processes and the table's ratios come from the rows; `--record` writes a dated
section; the mixed-batch baseline trains each adapter exactly as that task alone; the ablation
switches change the plan as they should."""

from __future__ import annotations

import datetime
import io
import re
from pathlib import Path

import pytest
import torch
from peft import set_peft_model_state_dict

from muxtune.compiler import cli as compile_cli
from muxtune.compiler.compile import compile_job
from muxtune.plans import load_plan
from muxtune.runtime.model_sources import resolve_model_dir
from muxtune.runtime.tokenizer import load_tokenizer
from muxtune.specs import load_job_spec
from muxtune.tools import bench
from muxtune.tools.bench import BenchOptions, run_benchmark
from muxtune.tools.bench_hf import adapter_state, load_base, single_task_model, task_batches, train_single
from muxtune.tools.bench_mixed import MixedBatchLora
from muxtune.tools.bench_report import GIB, ROW_LABELS, ConfigResult, RowResult, record_section
from muxtune.tools.bench_rows import BenchFailure, Finished, checked, htasks_overlap
from muxtune.tools.bench_workload import workload, write_job

TINY = ("tasks.sentiment.max_seq_len=200", "tasks.qa.max_seq_len=360", "tasks.*.batch_size=2")
"""The tiny tokenizer makes sequences ~2.6x longer than SmolLM2's: caps that keep targets."""


@pytest.fixture(scope="module")
def config() -> ConfigResult:
    options = BenchOptions(models=("builtin:tiny-llama",), task_counts=(2,), steps=1, dtype="fp32", overrides=TINY)
    progress = io.StringIO()
    [result] = run_benchmark(options, progress)
    peak, *rows = progress.getvalue().splitlines()
    assert peak.startswith("bf16 peak: ") and len(rows) == len(ROW_LABELS)
    return result


def markdown_rows(text: str) -> dict[str, list[str]]:
    """The table's rows by label: cells without the label."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| (") and cells[0] in ROW_LABELS.values():
            rows[cells[0]] = cells[1:]
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x%"))


def test_every_row_runs_with_sane_numbers(config: ConfigResult) -> None:
    rows = config.rows
    assert set(rows) == set(ROW_LABELS)
    measured = {key: r for key, r in rows.items() if r.measured}
    assert set(measured) == {"a", "b", "c", "d", "e-fuse"}
    assert len({r.tokens for r in measured.values()}) == 1, "every row trains the same batches"
    for r in measured.values():
        assert r.tokens > 0 and 0 < r.train_seconds < r.wall_seconds
        assert all(rss > 50 * 2**20 for rss in r.process_peak_rss)
    assert rows["a"].padding == rows["e-fuse"].padding == 0.0
    assert rows["d"].padded_tokens >= rows["b"].padded_tokens == rows["c"].padded_tokens >= rows["b"].tokens
    assert len(rows["a"].process_peak_rss) == 2 and rows["a"].peak_rss == max(rows["a"].process_peak_rss)
    c = rows["c"]
    assert c.concurrent and len(c.process_peak_rss) == 2 and c.peak_rss == sum(c.process_peak_rss)
    assert rows["e-align"].note.startswith("same plan as (a)")
    assert rows["e-interleave"].note.startswith("same program as (a) on one device")


def test_table_ratios_come_from_the_rows(config: ConfigResult) -> None:
    section = record_section([config], "muxtune-bench --tasks 2", 12.0, datetime.date(2026, 11, 24))
    table = markdown_rows(section)
    assert list(table) == list(ROW_LABELS.values())
    b, c = table[ROW_LABELS["b"]], table[ROW_LABELS["c"]]
    for key, r in config.rows.items():
        cells = table[ROW_LABELS[key]]
        if not r.measured:
            assert cells[-1] == r.note and not any(cells[:-1])
            continue
        assert number(cells[0]) == r.tokens and number(cells[2]) == pytest.approx(r.tokens_per_second, abs=0.05)
        assert number(cells[3]) == pytest.approx(100 * config.mfu(r), abs=0.06)
        assert number(cells[5]) == pytest.approx(number(cells[2]) / number(b[2]), abs=0.006)
        assert number(cells[6]) == pytest.approx(number(cells[2]) / number(c[2]), abs=0.006)
        assert number(cells[8]) == pytest.approx(r.peak_rss / GIB, abs=0.006)
        assert number(cells[10]) == pytest.approx(number(c[8]) / number(cells[8]), rel=0.05)
    assert number(c[8]) == pytest.approx(sum(config.rows["c"].process_peak_rss) / GIB, abs=0.006)
    assert "2 processes at once, RSS summed" in c[-1]
    assert re.search(r"- effective throughput \(a\) / \(b\): [\d.]+x; target >= 2.5x: (met|not met)", section)


def test_record_appends_a_dated_section(config: ConfigResult, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\nearlier results\n")
    monkeypatch.setattr(bench, "run_benchmark", lambda options: [config])
    argv = ["--model", "builtin:tiny-llama", "--tasks", "2", "--steps", "1", "--record", "--record-file", str(target)]
    assert bench.main(argv) == 0
    text = target.read_text()
    assert text.startswith("# Benchmarks\n\nearlier results\n\n## muxtune-bench:")
    today = datetime.date.today().isoformat()
    assert f"- Date: {today}" in text and f"- Command: `muxtune-bench {' '.join(argv)}`" in text
    cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    assert f"- Machine: {cpu.split(':', 1)[1].strip()}, " in text and " cores" in text
    assert list(markdown_rows(text)) == list(ROW_LABELS.values())


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--rows", "a,x"], "--rows"),
        (["--tasks", "9"], "--tasks"),
        (["--steps", "0"], "--steps"),
        (["--repeat", "0"], "--repeat"),
        (["--model", "layers=many"], "--model"),
        (["--model", "random:llama-99b"], "--model"),
        (["--peak-tflops", "0"], "--peak-tflops"),
        (["--model", "builtin:tiny-llama", "--tasks", "1", "tasks.*.lr=-1"], "tasks[0].lr"),
    ],
)
def test_bad_input_exits_2_naming_the_field(argv: list[str], field: str, capsys) -> None:
    assert bench.main(argv) == 2
    assert f"muxtune-bench: error: {field}" in capsys.readouterr().err


def test_mixed_batch_trains_each_adapter_as_that_task_alone(tmp_path: Path) -> None:
    overrides = [*TINY, "tasks.entailment.max_seq_len=800"]
    spec = write_job(tmp_path / "job.yaml", "builtin:tiny-llama", "fp32", workload(3), 2, overrides)
    model_dir = resolve_model_dir(spec.model)
    tokenizer = load_tokenizer(model_dir)
    batches = {t.name: task_batches(t, tokenizer) for t in spec.tasks}
    mixed = MixedBatchLora(load_base(model_dir, "fp32"), spec.tasks)
    initial = {t.name: adapter_state(mixed.model, t.name) for t in spec.tasks}
    for step in range(2):
        mixed.train_step({name: b[step] for name, b in batches.items()}, step)
    for task in spec.tasks:
        alone = single_task_model(model_dir, "fp32", task)
        set_peft_model_state_dict(alone, initial[task.name], adapter_name=task.name)
        train_single(alone, task, batches[task.name])
        trained = adapter_state(mixed.model, task.name)
        assert trained.keys() == initial[task.name].keys()
        for key, value in adapter_state(alone, task.name).items():
            assert not torch.equal(trained[key], initial[task.name][key]), f"{task.name}: {key} did not train"
            # Padded to other widths, the sums run in other orders, and Adam's first steps turn a
            # near-zero gradient's rounding into a sizeable update: entries are compared against
            # a hundredth of the tensor's largest (which the test's thread count can reach).
            scale = 1e-2 * value.abs().max().item()
            torch.testing.assert_close(
                trained[key], value, rtol=1e-4, atol=scale, msg=lambda m: f"{task.name}: {key}: {m}"
            )


def test_no_align_leaves_budgets_off_chunk_multiples(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    write_job(job, "builtin:tiny-llama", "fp32", workload(2), 2, TINY)
    spec = load_job_spec(job, ["cluster.device=h100"])
    aligned, unaligned = compile_job(spec).plan, compile_job(spec, align=False).plan
    assert aligned.alignment.chunk_size == 64 and unaligned.alignment.chunk_size == 1
    budgets = [[b for p in plan.phases for h in p.htasks for b in h.token_budgets] for plan in (aligned, unaligned)]
    assert all(b % 64 == 0 for b in budgets[0]) and any(b % 64 for b in budgets[1])
    plan_path = tmp_path / "plan.yaml"
    assert compile_cli.main([str(job), "-o", str(plan_path), "--no-align", "cluster.device=h100"]) == 0
    assert load_plan(plan_path).phases == unaligned.phases


def test_interleaving_matters_only_across_pipeline_stages(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    write_job(job, "builtin:tiny-llama", "fp32", workload(2), 2, TINY)
    one_device = compile_job(load_job_spec(job), fusion="no_fuse").plan
    assert len(one_device.phases[0].htasks) == 2 and not htasks_overlap(one_device)
    pipeline = ["cluster.device=h100", "cluster.num_devices=2", "cluster.pipeline_parallel=2"]
    staged = compile_job(load_job_spec(job, pipeline), fusion="no_fuse").plan
    assert htasks_overlap(staged), "1F1B over both hTasks' micro-batches keeps two hTasks in flight on stage 0"


def test_a_failing_row_names_itself_and_exits_1(monkeypatch, capsys) -> None:
    failed = Finished(("python", "-m", "muxtune.tools.bench_hf"), 1, "", "Traceback ...\nValueError: boom\n", 0)
    with pytest.raises(BenchFailure, match=r"(?s)row \(b\): `python -m muxtune.tools.bench_hf` exited with 1:\n.*boom"):
        checked("b", [failed])

    def fail(options: BenchOptions) -> list[ConfigResult]:
        raise BenchFailure("row (b): boom")

    monkeypatch.setattr(bench, "run_benchmark", fail)
    assert bench.main(["--tasks", "2"]) == 1
    assert "muxtune-bench: row (b): boom" in capsys.readouterr().err


def test_repeated_rows_run_in_turn_and_report_their_median_run(monkeypatch) -> None:
    """Rows alternate (a, b, a, b, a, b); each row's result is its median run; the ratio of every
    repetition is listed; a row that is not measured runs once."""
    speeds = {"a": [900.0, 1300.0, 1100.0], "b": [500.0, 450.0, 520.0]}
    order = []

    def fake_row(self, key: str) -> RowResult:
        order.append(key)
        if key == "e-align":
            return RowResult(key, measured=False, note="same plan as (a)")
        speed = speeds[key][sum(1 for k in order if k == key) - 1]
        return RowResult(
            key,
            tokens=1000,
            padded_tokens=1100,
            train_seconds=1000 / speed,
            wall_seconds=9.0,
            process_peak_rss=(2**30,),
        )

    monkeypatch.setattr(bench.ConfigurationRun, "row", fake_row)
    options = BenchOptions(
        models=("builtin:tiny-llama",), task_counts=(2,), rows=("a", "b", "e-align"), repeat=3, peak_tflops=1.0
    )
    [config] = run_benchmark(options, io.StringIO())
    assert order == ["a", "e-align", "b", "a", "b", "a", "b"]
    assert config.rows["a"].tokens_per_second == pytest.approx(1100.0)
    assert config.rows["b"].tokens_per_second == pytest.approx(500.0)
    assert not config.rows["e-align"].measured
    section = record_section([config], "muxtune-bench --repeat 3", 1.0, datetime.date(2026, 11, 24))
    assert "- effective throughput (a) / (b): 2.20x" in section
    assert "- (a) / (b) of each repetition: 1.80x, 2.89x, 2.12x (median 2.12x)" in section


def test_a_repeated_muxtune_row_runs_in_folders_of_its_own() -> None:
    options = BenchOptions(
        models=("builtin:tiny-llama",), task_counts=(2,), rows=("a",), steps=1, dtype="fp32", overrides=TINY, repeat=2
    )
    [config] = run_benchmark(options, io.StringIO())
    first, second = config.runs["a"]
    assert first.measured and second.measured and first.tokens == second.tokens
