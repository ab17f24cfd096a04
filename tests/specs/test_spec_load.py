"""Loading job specs: defaults, path resolution, round trip, file errors, no torch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_helpers import base_spec

from muxtune.specs import (
    ClusterSpec,
    DataSpec,
    JobSpec,
    LoraSpec,
    ScheduleSpec,
    SpecError,
    TaskSpec,
    job_spec_to_dict,
    load_job_spec,
    parse_job_spec,
)

WriteSpec = Callable[..., Path]


def test_defaults_are_resolved(write_spec: WriteSpec, job_dir: Path) -> None:
    spec = load_job_spec(write_spec())
    assert spec.model == "builtin:tiny-llama"
    assert spec.dtype == "fp32"
    assert spec.cluster == ClusterSpec()
    assert spec.cluster.memory_gb == "auto" and spec.cluster.num_devices == 1
    qa = spec.task("qa")
    assert qa == TaskSpec(
        name="qa",
        peft=LoraSpec(method="lora", r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj")),
        data=DataSpec(path=str(job_dir / "data" / "qa.jsonl"), format="text"),
        max_seq_len=128,
        batch_size=8,
        lr=2e-4,
        weight_decay=0.0,
        max_grad_norm=1.0,
        schedule=ScheduleSpec(name="constant", warmup_steps=0),
        steps=50,
        seed=0,
        init_from=None,
        save_every=0,
    )
    assert spec.task("sentiment").schedule == ScheduleSpec("cosine", 5)
    assert isinstance(spec.tasks, tuple) and isinstance(qa.peft.target_modules, tuple)


def test_dtype_defaults_to_fp32(write_spec: WriteSpec) -> None:
    raw = base_spec()
    del raw["dtype"]
    assert load_job_spec(write_spec(raw)).dtype == "fp32"


def test_relative_paths_resolve_against_the_spec_folder(
    write_spec: WriteSpec,
    job_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    (job_dir / "adapters" / "init").mkdir(parents=True)
    raw = base_spec()
    raw["tasks"][0]["init_from"] = "adapters/init"
    path = write_spec(raw)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    spec = load_job_spec(path)
    assert spec.output_dir == str(job_dir / "runs" / "demo")
    assert spec.tasks[0].data.path == str(job_dir / "data" / "sentiment.jsonl")
    assert spec.tasks[0].init_from == str(job_dir / "adapters" / "init")


def test_relative_spec_path_argument(write_spec: WriteSpec, job_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_spec()
    monkeypatch.chdir(job_dir.parent)
    spec = load_job_spec(Path(job_dir.name) / "job.yaml")
    assert Path(spec.output_dir).is_absolute()
    assert spec.tasks[1].data.path == str(job_dir / "data" / "qa.jsonl")


def test_model_path_is_resolved_and_checked(write_spec: WriteSpec, job_dir: Path) -> None:
    (job_dir / "model").mkdir()
    raw = base_spec()
    raw["model"] = "model"
    assert load_job_spec(write_spec(raw)).model == str(job_dir / "model")
    raw["model"] = "missing-model"
    with pytest.raises(SpecError) as info:
        load_job_spec(write_spec(raw))
    assert info.value.errors == [f"model: not found: {job_dir / 'missing-model'}"]


def test_round_trip(write_spec: WriteSpec) -> None:
    raw = base_spec()
    raw["cluster"] = {
        "device": "h100",
        "num_devices": 4,
        "memory_gb": 80,
        "pipeline_parallel": 2,
        "tensor_parallel": "auto",
    }
    spec = load_job_spec(write_spec(raw))
    data = job_spec_to_dict(spec)
    assert list(data) == ["model", "dtype", "output_dir", "cluster", "tasks"]
    assert data["tasks"][0]["peft"]["target_modules"] == ["q_proj", "v_proj"]
    assert parse_job_spec(data) == spec
    assert spec.cluster.memory_gb == 80.0


@settings(max_examples=40, deadline=None, database=None)
@given(
    r=st.integers(1, 512),
    alpha=st.one_of(st.integers(1, 1024), st.floats(min_value=1e-3, max_value=1e3)),
    lr=st.floats(min_value=1e-9, max_value=10.0),
    steps=st.integers(1, 10_000),
    data=st.data(),
)
def test_round_trip_property(r: int, alpha: float, lr: float, steps: int, data: st.DataObject) -> None:
    warmup = data.draw(st.integers(0, steps))
    task = TaskSpec(
        name="t-1",
        peft=LoraSpec(r=r, alpha=alpha, dropout=data.draw(st.floats(0, 0.99)), target_modules=("mlp.up_proj",)),
        data=DataSpec(path=__file__, format="text"),
        lr=lr,
        steps=steps,
        schedule=ScheduleSpec("linear", warmup),
        seed=data.draw(st.integers(0, 2**31)),
    )
    spec = JobSpec(model="builtin:x", dtype="bf16", output_dir="/tmp/out", cluster=ClusterSpec(), tasks=(task,))
    assert parse_job_spec(job_spec_to_dict(spec)) == spec


def test_missing_file() -> None:
    with pytest.raises(SpecError) as info:
        load_job_spec("/nonexistent/job.yaml")
    assert info.value.errors == ["/nonexistent/job.yaml: file not found"]


def test_invalid_yaml_names_file_and_line(write_spec: WriteSpec) -> None:
    path = write_spec("model: builtin:x\ntasks:\n  - name: a\n    data: {path: x\n")
    with pytest.raises(SpecError) as info:
        load_job_spec(path)
    (message,) = info.value.errors
    assert message.startswith(f"{path}:")
    assert "invalid YAML" in message
    line = int(message[len(str(path)) + 1 :].split(":")[0])
    assert line in (4, 5)


def test_empty_and_non_mapping_files(write_spec: WriteSpec) -> None:
    with pytest.raises(SpecError, match="empty"):
        load_job_spec(write_spec(""))
    path = write_spec("- 1\n- 2\n")
    with pytest.raises(SpecError) as info:
        load_job_spec(path)
    assert info.value.errors == [f"{path}: must hold a mapping at the top level, got list"]
    with pytest.raises(SpecError) as info:
        parse_job_spec([1, 2])
    assert info.value.errors == ["job spec: must be a mapping, got [1, 2]"]


def test_no_torch_import() -> None:
    code = "import sys\nimport muxtune.specs, muxtune.plans\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    subprocess.run([sys.executable, "-c", code], check=True)
