"""muxtune-inspect: tables and JSON describing a compiled plan, user errors exit 2, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from user_path import write_job

from muxtune.compiler.compile import compile_job
from muxtune.plans import Plan, load_plan, save_plan
from muxtune.specs import load_job_spec
from muxtune.tools.inspect_plan import main

MODULE = "muxtune.tools.inspect_plan"


@pytest.fixture(scope="module")
def single_rank_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("single")
    return save_plan(compile_job(load_job_spec(write_job(directory))).plan, directory / "plan.yaml")


@pytest.fixture(scope="module")
def four_rank_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("four")
    overrides = ["cluster.device=h100", "cluster.num_devices=4", "cluster.pipeline_parallel=2"]
    return save_plan(compile_job(load_job_spec(write_job(directory), overrides)).plan, directory / "plan.yaml")


def inspect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_shows_job_tasks_phases_programs_predictions_and_solver(
    four_rank_plan: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = load_plan(four_rank_plan)
    code, out, err = inspect(capsys, str(four_rank_plan))
    assert code == 0 and err == ""
    for heading in ("Job", "Tasks (3)", f"Phases ({len(plan.phases)})", "Programs (4 ranks)", "Predictions", "Solver"):
        assert f"\n{heading}\n" in out
    assert "builtin:tiny-llama" in out and "4 ranks (pipeline 2 x tensor 1 x data 2)" in out
    for task in plan.tasks:
        assert task.name in out and f"{task.num_tokens:,}" in out
    for phase in plan.phases:
        assert f"{phase.first_round}..{phase.last_round}" in out
        for htask in phase.htasks:
            assert ", ".join(f"{n} {b:,}" for n, b in zip(htask.tasks, htask.token_budgets)) in out
    header = next(line.split() for line in out.splitlines() if line.split()[:4] == ["rank", "stage", "phase", "total"])
    for opcode in ("forward", "backward", "loss_backward", "send", "recv", "all_reduce", "optimizer_step"):
        assert opcode in header
    body_rows = [line.split() for line in out.splitlines() if len(line.split()) == len(header)]
    listed = {(int(row[0]), int(row[2])) for row in body_rows if row[0].isdigit()}
    assert listed == {(program.rank, phase.id) for program in plan.programs for phase in plan.phases}
    assert "cp-sat" in out and plan.solver[0].status in out
    assert f"est_total_seconds      {plan.predictions.est_total_seconds:,.3f}" in out
    assert "%" in out and "GiB" in out


def test_json_numbers_equal_the_plan(four_rank_plan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = load_plan(four_rank_plan)
    code, out, err = inspect(capsys, str(four_rank_plan), "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["file"] == str(four_rank_plan)
    assert data["placement"]["num_ranks"] == 4 == len(data["programs"])
    assert [s["ranks"] for s in data["placement"]["stages"]] == [list(s.ranks) for s in plan.placement.stages]
    assert [t["name"] for t in data["tasks"]] == [t.name for t in plan.tasks]
    assert [t["r"] for t in data["tasks"]] == [t.peft.r for t in plan.tasks]
    predictions = data["predictions"]
    assert predictions["est_total_seconds"] == plan.predictions.est_total_seconds
    assert predictions["est_tokens_per_second"] == plan.predictions.est_tokens_per_second
    assert predictions["est_peak_memory_bytes"] == plan.predictions.est_peak_memory_bytes
    for shown, predicted in zip(predictions["phases"], plan.predictions.phases, strict=True):
        assert shown["seconds_per_round"] == predicted.seconds_per_round
        assert shown["bubble_fraction"] == predicted.bubble_fraction
        assert shown["peak_memory_bytes"] == list(predicted.peak_memory_bytes)
    assert [r["objective_seconds"] for r in data["solver"]] == [r.objective_seconds for r in plan.solver]
    assert_programs_match(data, plan)
    sends = sum(b["opcode_counts"].get("send", 0) for p in data["programs"] for b in p["phases"])
    receives = sum(b["opcode_counts"].get("recv", 0) for p in data["programs"] for b in p["phases"])
    assert sends == receives > 0


def assert_programs_match(data: dict, plan: Plan) -> None:
    """Per rank: prologue/epilogue lengths, and per phase body opcode counts that sum to its length."""
    for shown, program in zip(data["programs"], plan.programs, strict=True):
        assert shown["prologue_length"] == len(program.prologue)
        assert shown["epilogue_length"] == len(program.epilogue)
        for body_summary, body in zip(shown["phases"], program.phases, strict=True):
            assert body_summary["length"] == len(body) == sum(body_summary["opcode_counts"].values())
            assert body_summary["opcode_counts"]["forward"] == sum(i.op.value == "forward" for i in body)
            loads = [i for i in body if i.op.value == "load_batches"]
            assert body_summary["htask_streams"] == {str(i.htask): i.stream for i in loads}


def test_single_rank_plan(single_rank_plan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = inspect(capsys, str(single_rank_plan))
    assert code == 0 and "Programs (1 rank)" in out and "1 rank (pipeline 1" in out
    code, out, _ = inspect(capsys, str(single_rank_plan), "--json")
    data = json.loads(out)
    assert code == 0 and data["placement"]["num_ranks"] == 1
    assert "send" not in data["programs"][0]["phases"][0]["opcode_counts"]
    assert_programs_match(data, load_plan(single_rank_plan))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.yaml", None, "file not found"),
        ("broken.yaml", "job: [", "invalid YAML"),
        ("empty.yaml", "", "empty"),
        ("wrong_version.yaml", "VERSION", "schema_version"),
    ],
)
def test_bad_input_exits_2_naming_the_file(
    single_rank_plan: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    if content == "VERSION":
        content = single_rank_plan.read_text().replace("schema_version: 2", "schema_version: 9", 1)
    if content is not None:
        path.write_text(content)
    code, out, err = inspect(capsys, str(path))
    assert code == 2 and out == ""
    assert err.startswith("muxtune-inspect: error: ") and str(path) in err and message in err
    assert "Traceback" not in err


def test_module_runs_without_torch(single_rank_plan: Path, tmp_path: Path) -> None:
    script = (
        "import sys\n"
        f"from {MODULE} import main\n"
        f"assert main([{str(single_rank_plan)!r}, '--json']) == 0\n"
        "assert 'torch' not in sys.modules, 'inspect imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["placement"]["num_ranks"] == 1
    bad = subprocess.run(
        [sys.executable, "-m", MODULE, str(tmp_path / "nope.yaml")], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("muxtune-inspect: error: ") and "nope.yaml" in bad.stderr
    assert "Traceback" not in bad.stderr
