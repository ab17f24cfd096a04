"""Multi-rank runs under gloo, started by `muxtune-run` itself: pipeline, data and pipeline x
data parallel plans give the single-process run's adapters; a rank that dies or hangs stops the
job within a minute naming the rank, and `--resume` ends with the same adapters."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from user_path import default_tasks, run_cli, write_job

from muxtune.tools.bench_pipeline import trace_figures

TOLERANCE = 1e-4
STOP_WITHIN_S = 60
TWO_RANKS = [{"pipeline_parallel": 2}, {"pipeline_parallel": 1, "tensor_parallel": 2}]


def two_tasks(steps: int = 3, save_every: int = 2) -> list[dict]:
    """Two tasks of different ranks and targets (attention q/v at r4; q/k/v/o at r8)."""
    tasks = default_tasks()[:2]
    for task in tasks:
        task.update(steps=steps, save_every=save_every)
    return tasks


def compile_job(directory: Path, tasks: list[dict], **cluster: int) -> Path:
    """Compile a fp32 job; with ``cluster`` degrees on that many CPU ranks."""
    fields: dict = {"dtype": "fp32", "output_dir": str(directory / "out")}
    if cluster:
        fields["cluster"] = {"device": "cpu", "tensor_parallel": 1, **cluster}
    job = write_job(directory, tasks, **fields)
    plan = directory / "plan.yaml"
    result = run_cli("compile", str(job), "-o", str(plan))
    assert result.returncode == 0, result.stderr
    return plan


def adapters(out: Path, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(out / name / "adapter_model.safetensors")) for name in names}


def assert_same_adapters(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].keys() == expected[name].keys(), name
        for key, value in expected[name].items():
            scale = value.abs().max().clamp_min(1e-12)
            difference = float((got[name][key] - value).abs().max() / scale)
            assert difference <= TOLERANCE, f"{name}:{key} differs by {difference:.2e} (relative)"


def run_on_one_process(factory: pytest.TempPathFactory, name: str, tasks: list[dict]) -> Path:
    """The output folder of ``tasks`` compiled for and run on one process."""
    directory = factory.mktemp(name)
    result = run_cli("run", str(compile_job(directory, tasks)))
    assert result.returncode == 0, result.stderr
    return directory / "out"


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_on_one_process(tmp_path_factory, "single", two_tasks())


@pytest.mark.parametrize(
    "cluster",
    [
        {"num_devices": 2, "pipeline_parallel": 2},
        {"num_devices": 2, "pipeline_parallel": 1},
        {"num_devices": 4, "pipeline_parallel": 2},
        {"num_devices": 2, "pipeline_parallel": 1, "tensor_parallel": 2},
        {"num_devices": 4, "pipeline_parallel": 2, "tensor_parallel": 2},
        {"num_devices": 4, "pipeline_parallel": 1, "tensor_parallel": 2},
    ],
    ids=["pipeline2", "data2", "pipeline2xdata2", "tensor2", "pipeline2xtensor2", "tensor2xdata2"],
)
def test_multi_rank_run_equals_single_process(single_run: Path, tmp_path: Path, cluster: dict) -> None:
    plan = compile_job(tmp_path, two_tasks(), **cluster)
    placement = yaml.safe_load(plan.read_text())["placement"]
    assert placement["num_ranks"] == cluster["num_devices"]
    assert placement["pipeline_parallel"] == cluster["pipeline_parallel"]
    assert placement["tensor_parallel"] == cluster.get("tensor_parallel", 1)
    result = run_cli("run", str(plan), "--trace")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    figures = trace_figures(tmp_path / "out", cluster["num_devices"])
    assert 0.0 <= figures.bubble_fraction < 1.0
    assert (figures.transfers > 0) == (cluster["pipeline_parallel"] > 1)
    names = ["sentiment", "qa"]
    assert_same_adapters(adapters(tmp_path / "out", names), adapters(single_run, names))
    for name in names:
        got = [json.loads(line) for line in (tmp_path / "out" / name / "metrics.jsonl").read_text().splitlines()]
        expected = [json.loads(line) for line in (single_run / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["tokens"] for m in got] == [m["tokens"] for m in expected]
        assert [m["target_tokens"] for m in got] == [m["target_tokens"] for m in expected]
        for a, b in zip(got, expected):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(
                b["grad_norm"], rel=1e-4
            )
        assert (tmp_path / "out" / name / "checkpoints" / "step-000002" / "state.json").is_file()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["rank_peak_memory_bytes"]) == cluster["num_devices"]


def other_methods() -> list[dict]:
    """Six tasks: (IA)^3 scaling outputs and (feedforward) inputs, bias deltas and DoRA (at
    column- and row-parallel operators), bottleneck adapters (on row-parallel operators' whole
    outputs), prompt tuning's soft tokens and prefix tuning's keys and values (used by every
    stage; split by heads over tensor-parallel ranks)."""
    tasks = default_tasks()[:3]
    tasks += [{**tasks[0], "name": "prefixes"}, {**tasks[1], "name": "dora"}, {**tasks[0], "name": "bottleneck"}]
    for task in tasks:
        task.update(steps=2, save_every=2, lr=1e-2)
    tasks[0]["peft"] = {
        "method": "ia3",
        "target_modules": ["k_proj", "v_proj", "up_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
    }
    tasks[1]["peft"] = {"method": "bias", "target_modules": ["q_proj", "o_proj", "down_proj"]}
    tasks[2]["peft"] = {"method": "prompt_tuning", "num_virtual_tokens": 4}
    tasks[3]["peft"] = {"method": "prefix_tuning", "num_virtual_tokens": 3, "prefix_projection": True}
    tasks[4]["peft"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "o_proj", "down_proj"], "use_dora": True}
    tasks[5]["peft"] = {"method": "adapter", "bottleneck_size": 8}
    return tasks


@pytest.fixture(scope="module")
def other_methods_single_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_on_one_process(tmp_path_factory, "other-methods-single", other_methods())


@pytest.mark.parametrize(
    "degrees",
    [
        {"num_devices": 2, "pipeline_parallel": 1, "tensor_parallel": 2},
        {"num_devices": 4, "pipeline_parallel": 2},
        {"num_devices": 4, "pipeline_parallel": 2, "tensor_parallel": 2},
    ],
    ids=["tensor2", "pipeline2xdata2", "pipeline2xtensor2"],
)
def test_other_methods_over_several_ranks_equal_one_process(
    tmp_path: Path, other_methods_single_run: Path, degrees: dict
) -> None:
    """Every other PEFT method (`other_methods`) trained on pipeline stages, data-parallel
    replicas and tensor-parallel ranks equals the single-process run."""
    names = [task["name"] for task in other_methods()]
    result = run_cli("run", str(compile_job(tmp_path, other_methods(), **degrees)))
    assert result.returncode == 0, result.stderr
    expected = adapters(other_methods_single_run, names)
    assert_same_adapters(adapters(tmp_path / "out", names), expected)
    assert all(float((v - 1).abs().max()) > 1e-4 for v in expected["sentiment"].values()), "the scales moved"


def parent_pid(pid: int) -> int | None:
    """The parent of process ``pid`` (from /proc; None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process ``pid`` runs under ``ancestor`` (its child, grandchild, ...)."""
    while pid > 1:
        parent = parent_pid(pid)
        if parent is None:
            return False
        if parent == ancestor:
            return True
        pid = parent
    return False


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker process of ``rank`` started under ``launcher`` (from /proc; other
    jobs' ranks on the machine are not this one's)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        launched = b"muxtune.runtime.launch" in command and f"RANK={rank}".encode() in environ
        if launched and descends_from(int(entry.name), launcher.pid):
            return int(entry.name)
    return None


def start_and_wait_for_step(plan: Path, metrics: Path, step: int, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "muxtune.runtime.cli", str(plan)]
    launcher = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return launcher
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.2)
    launcher.kill()
    raise AssertionError(f"the run did not reach step {step}")


def stop_rank(launcher: subprocess.Popen, rank: int, how: signal.Signals) -> tuple[int, str, float]:
    """Send ``how`` to the rank's process; the launcher's exit status, its stderr and the
    seconds it took to exit."""
    pid = rank_pid(launcher, rank)
    assert pid is not None, "the rank's process was not found"
    os.kill(pid, how)
    started = time.monotonic()
    try:
        _, stderr = launcher.communicate(timeout=STOP_WITHIN_S + 30)
    finally:
        launcher.kill()
        if how == signal.SIGSTOP:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return launcher.returncode, stderr, time.monotonic() - started


@pytest.fixture(scope="module")
def long_tasks() -> list[dict]:
    return two_tasks(steps=60, save_every=3)


@pytest.fixture(scope="module")
def long_single_run(tmp_path_factory: pytest.TempPathFactory, long_tasks: list[dict]) -> Path:
    return run_on_one_process(tmp_path_factory, "long-single", long_tasks)


@pytest.mark.parametrize("degrees", TWO_RANKS, ids=["pipeline2", "tensor2"])
def test_killed_rank_stops_the_job_and_resume_finishes_it(
    tmp_path: Path, long_tasks: list[dict], long_single_run: Path, degrees: dict
) -> None:
    plan = compile_job(tmp_path, long_tasks, num_devices=2, **degrees)
    launcher = start_and_wait_for_step(plan, tmp_path / "out" / "qa" / "metrics.jsonl", 4)
    code, stderr, seconds = stop_rank(launcher, 1, signal.SIGKILL)
    assert code == 1 and seconds < STOP_WITHIN_S, (code, seconds, stderr)
    assert "rank 1 was killed by SIGKILL" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "out" / "summary.json").exists()
    resumed = run_cli("run", str(plan), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    names = ["sentiment", "qa"]
    assert_same_adapters(adapters(tmp_path / "out", names), adapters(long_single_run, names))
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "qa" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61)), "every step logged once across the kill"


@pytest.mark.parametrize("degrees", TWO_RANKS, ids=["pipeline2", "tensor2"])
def test_hung_rank_stops_the_job_within_a_minute(tmp_path: Path, long_tasks: list[dict], degrees: dict) -> None:
    plan = compile_job(tmp_path, long_tasks, num_devices=2, **degrees)
    launcher = start_and_wait_for_step(plan, tmp_path / "out" / "qa" / "metrics.jsonl", 2)
    code, stderr, seconds = stop_rank(launcher, 1, signal.SIGSTOP)
    assert code == 1 and seconds < STOP_WITHIN_S, (code, seconds, stderr)
    assert "rank 1" in stderr and "Traceback" not in stderr
