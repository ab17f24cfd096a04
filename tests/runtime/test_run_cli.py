"""The user path end to end: muxtune-compile -> plan -> muxtune-run -> adapters, logs, summary;
resume after SIGKILL; a diverging task stopped without touching the others."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from user_path import default_tasks, kill_run_when, read_jsonl, run_cli, snapshot, write_job

from muxtune.common.allocator import chosen_allocator
from muxtune.runtime.adapters import WEIGHTS_NAME
from muxtune.runtime.checkpoint import JOB_RECORD


def compile_and_run(
    directory: Path, *overrides: str, tasks: list[dict] | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    job = write_job(directory, tasks)
    compiled = run_cli("compile", str(job), "-o", str(directory / "plan.yaml"), *overrides)
    assert compiled.returncode == 0, compiled.stderr
    return run_cli("run", str(directory / "plan.yaml"), env=env)


def adapters(out: Path, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(out / name / WEIGHTS_NAME)) for name in names}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("reference")
    result = compile_and_run(directory)
    assert result.returncode == 0, result.stderr
    return directory


def test_compile_run_outputs(reference_run: Path) -> None:
    out = reference_run / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens_per_second"] > 0 and summary["peak_memory_bytes"] > 0
    tcmalloc = chosen_allocator()  # the run restarted itself on it when this machine has it
    assert ("tcmalloc" in summary["allocator"]) if tcmalloc else summary["allocator"] == "system"
    for task in default_tasks():
        name, steps = task["name"], task["steps"]
        assert summary["tasks"][name]["status"] == "finished"
        metrics = read_jsonl(out / name / "metrics.jsonl")
        assert [m["step"] for m in metrics] == list(range(1, steps + 1))
        assert all(set(m) >= {"step", "loss", "lr", "tokens", "seconds"} for m in metrics)
        manifest = read_jsonl(out / name / "manifest.jsonl")
        assert [m["step"] for m in manifest] == list(range(1, steps + 1))
        assert all(len(m["indices"]) == task["batch_size"] for m in manifest)
        assert (out / name / "adapter_config.json").is_file()


def test_exported_adapters_load_in_peft(reference_run: Path) -> None:
    import transformers
    from peft import PeftModel

    from muxtune.runtime.adapters import load_adapter
    from muxtune.runtime.backbone import load_model
    from muxtune.runtime.engine import MultiTaskEngine, TaskTraining
    from muxtune.runtime.layout import MicroBatchLayout

    loaded = load_model("builtin:tiny-llama")
    config, state = load_adapter(reference_run / "out" / "qa")
    engine = MultiTaskEngine(loaded.model)
    engine.add_task(TaskTraining("qa", config, lr=1e-3, steps=1), init_state=state)
    ids = loaded.tokenizer.encode("Which color is the door?", add_special_tokens=True)
    with torch.no_grad():
        ours = loaded.model(torch.tensor(ids), torch.arange(len(ids)), MicroBatchLayout.single_task("qa", len(ids)))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(loaded.model_dir), dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(hf, str(reference_run / "out" / "qa")).eval()
        theirs = peft_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_resume_after_sigkill_equals_uninterrupted(reference_run: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path)
    assert run_cli("compile", str(job), "-o", str(tmp_path / "plan.yaml")).returncode == 0
    kill_run_when(tmp_path / "plan.yaml", tmp_path / "out" / JOB_RECORD)
    assert not (tmp_path / "out" / "summary.json").exists()

    refused = run_cli("run", str(tmp_path / "plan.yaml"))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = run_cli("run", str(tmp_path / "plan.yaml"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    names = [t["name"] for t in default_tasks()]
    expected, got = adapters(reference_run / "out", names), adapters(tmp_path / "out", names)
    for name in names:
        for key, value in expected[name].items():
            assert torch.equal(got[name][key], value), f"{name}:{key} differs after resume"
        assert read_jsonl(tmp_path / "out" / name / "manifest.jsonl") == read_jsonl(
            reference_run / "out" / name / "manifest.jsonl"
        )
        assert [m["loss"] for m in read_jsonl(tmp_path / "out" / name / "metrics.jsonl")] == [
            m["loss"] for m in read_jsonl(reference_run / "out" / name / "metrics.jsonl")
        ]


def test_diverging_task_is_stopped_and_others_unaffected(tmp_path: Path) -> None:
    # Bitwise equality across runs with different task sets needs row-independent GEMMs:
    # multi-threaded MKL splits some GEMMs by shape, so both runs use one intra-op thread.
    single_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    without = compile_and_run(tmp_path / "without", env=single_thread)
    assert without.returncode == 0, without.stderr
    tasks = default_tasks()
    tasks.append(
        {
            **tasks[0],
            "name": "unstable",
            "lr": 1e30,
            "save_every": 1,
            "steps": 6,
            "peft": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj"]},
        }
    )
    result = compile_and_run(tmp_path, tasks=tasks, env=single_thread)
    assert result.returncode == 3, result.stderr
    assert "unstable" in result.stderr and "non-finite" in result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tasks"]["unstable"]["status"] == "diverged"
    assert not (tmp_path / "out" / "unstable" / WEIGHTS_NAME).exists()
    checkpoints = list((tmp_path / "out" / "unstable" / "checkpoints").iterdir())
    assert len(checkpoints) == 1, "the last good checkpoint is kept"
    names = [t["name"] for t in default_tasks()]
    expected, got = adapters(tmp_path / "without" / "out", names), adapters(tmp_path / "out", names)
    for name in names:
        assert summary["tasks"][name]["status"] == "finished"
        for key, value in expected[name].items():
            assert torch.equal(got[name][key], value), f"{name}:{key} changed next to a diverging task"


def test_edited_plan_is_refused_by_run(reference_run: Path, tmp_path: Path) -> None:
    text = (reference_run / "plan.yaml").read_text()
    (tmp_path / "plan.yaml").write_text(text.replace("r: 8", "r: 9", 1))
    before = snapshot(reference_run / "out")
    result = run_cli("run", str(tmp_path / "plan.yaml"))
    assert result.returncode == 2 and "fingerprint" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(reference_run / "out") == before


@pytest.mark.parametrize("variable", ["MUXTUNE_LORA_BACKEND", "MUXTUNE_CPU_KERNELS"])
def test_unknown_kernel_setting_is_refused_before_anything_is_written(
    variable: str, reference_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    (tmp_path / "plan.yaml").write_text(
        (reference_run / "plan.yaml").read_text().replace(str(reference_run / "out"), str(out))
    )
    result = run_cli("run", str(tmp_path / "plan.yaml"), env={variable: "cuda"})
    assert result.returncode == 2 and variable in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_init_from_and_validate(reference_run: Path, tmp_path: Path) -> None:
    tasks = [{**default_tasks()[1], "init_from": str(reference_run / "out" / "qa"), "steps": 1, "save_every": 0}]
    job = write_job(tmp_path, tasks, cluster={"num_devices": 2, "tensor_parallel": 2})
    validated = run_cli("compile", str(job), "--validate")
    assert validated.returncode == 0 and "valid" in validated.stdout
    assert not (tmp_path / "plan.yaml").exists() and not (tmp_path / "out").exists()
    result = compile_and_run(tmp_path, tasks=tasks)
    assert result.returncode == 0, result.stderr
    first_loss = read_jsonl(tmp_path / "out" / "qa" / "metrics.jsonl")[0]["loss"]
    reference_losses = [m["loss"] for m in read_jsonl(reference_run / "out" / "qa" / "metrics.jsonl")]
    assert first_loss < reference_losses[0], "starting from the trained adapter starts lower"


def test_run_takes_exactly_the_planned_instructions(reference_run: Path) -> None:
    from muxtune.plans import load_plan

    plan = load_plan(reference_run / "plan.yaml")
    program = plan.programs[0]
    assert len(plan.phases) == 3, "tasks of 6, 5 and 7 steps: one phase per active set"
    planned = len(program.prologue) + len(program.epilogue)
    planned += sum(phase.num_rounds * len(body) for phase, body in zip(plan.phases, program.phases))
    summary = json.loads((reference_run / "out" / "summary.json").read_text())
    assert summary["instructions_executed"] == planned
    timings = summary["phases"]
    assert [t["phase"] for t in timings] == [0, 1, 2]
    assert [t["rounds_run"] for t in timings] == [phase.num_rounds for phase in plan.phases]
    for timing, predicted in zip(timings, plan.predictions.phases):
        assert 0 < timing["median_round_seconds"] <= timing["seconds"] <= summary["train_seconds"]
        assert timing["predicted_round_seconds"] == predicted.seconds_per_round


def test_profile_writes_operator_table_and_trace_and_changes_nothing(reference_run: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path)
    assert run_cli("compile", str(job), "-o", str(tmp_path / "plan.yaml")).returncode == 0
    result = run_cli("run", str(tmp_path / "plan.yaml"), "--profile")
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "out" / "profile" / "rank-0.txt").read_text()
    assert "round body(ies) after the first 1" in table and "aten::mm" in table
    trace = json.loads((tmp_path / "out" / "profile" / "rank-0.json").read_text())
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
    names = [t["name"] for t in default_tasks()]
    profiled, plain = adapters(tmp_path / "out", names), adapters(reference_run / "out", names)
    for name in names:
        for key, value in plain[name].items():
            assert torch.equal(profiled[name][key], value), f"{name}:{key}"
