"""The planner end to end: memory limits shape the plan (and hold when it runs), infeasible
jobs name what binds, fixed fusion modes, per-phase re-planning and determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from user_path import default_tasks, write_job

from muxtune.compiler.compile import compile_job
from muxtune.compiler.cost.devices import MEMORY_RESERVE
from muxtune.compiler.errors import CompileError
from muxtune.plans import dump_plan, save_plan
from muxtune.specs import load_job_spec

GIB = 1 << 30


def big_batch_job(directory: Path, batch_size: int = 48, steps: int = 2) -> Path:
    tasks = default_tasks()
    for task in tasks:
        task.update(batch_size=batch_size, steps=steps, save_every=0)
    return write_job(directory, tasks)


def test_memory_limit_splits_micro_batches_and_is_respected_when_run(tmp_path: Path) -> None:
    job = big_batch_job(tmp_path)
    spec = load_job_spec(job)
    fused = compile_job(spec, fusion="fuse").plan
    lean = compile_job(spec, task_tokens=200).plan
    assert [h.num_microbatches for h in fused.phases[0].htasks] == [1]
    high, low = fused.predictions.est_peak_memory_bytes, lean.predictions.est_peak_memory_bytes
    limit = (high + low) / 2
    limited = compile_job(load_job_spec(job, [f"cluster.memory_gb={limit / GIB:.4f}"])).plan
    assert limited.predictions.est_peak_memory_bytes <= limit < high
    assert sum(h.num_microbatches for h in limited.phases[0].htasks) > 1
    plan_path = save_plan(limited, tmp_path / "plan.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "muxtune.runtime.cli", str(plan_path)], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    peak = json.loads((Path(limited.job.output_dir) / "summary.json").read_text())["peak_memory_bytes"]
    assert peak <= limit, f"measured peak {peak / GIB:.3f} GB over the {limit / GIB:.3f} GB limit"


def test_infeasible_memory_names_the_binding_constraint(tmp_path: Path) -> None:
    job = big_batch_job(tmp_path)
    with pytest.raises(CompileError, match=r"cluster\.memory_gb: .* need .* GB on stage 0 of a 0\.10 GB device"):
        compile_job(load_job_spec(job, ["cluster.memory_gb=0.1"]))
    spec = load_job_spec(job)
    static = compile_job(spec, fusion="no_fuse", task_tokens=1, streams=1).plan.predictions.est_peak_memory_bytes
    tight = load_job_spec(job, [f"cluster.memory_gb={(static * 0.999) / (1 - MEMORY_RESERVE) / GIB:.4f}"])
    with pytest.raises(CompileError, match=r"tasks\.\w+: needs .* of activations at max_seq_len \d+ and batch_size 48"):
        compile_job(tight)


def test_fixed_modes_and_per_phase_replanning(tmp_path: Path) -> None:
    spec = load_job_spec(write_job(tmp_path))
    planned = compile_job(spec).plan
    unfused = compile_job(spec, fusion="no_fuse").plan
    assert [len(p.htasks) for p in unfused.phases] == [len(p.tasks) for p in unfused.phases]
    assert all(r.method == "fixed" for r in unfused.solver)
    assert [r.method for r in planned.solver] == ["cp-sat"] * len(planned.phases)
    for phase in planned.phases:
        assert sorted(n for h in phase.htasks for n in h.tasks) == sorted(phase.tasks), "each phase re-fuses its tasks"
    assert planned.predictions.est_seconds_per_round <= unfused.predictions.est_seconds_per_round * 1.0001
    assert dump_plan(planned) == dump_plan(compile_job(spec).plan)


def test_declared_cluster_uses_every_device(tmp_path: Path) -> None:
    spec = load_job_spec(write_job(tmp_path), ["cluster.device=h100", "cluster.num_devices=4"])
    plan = compile_job(spec).plan
    p = plan.placement
    assert p.num_ranks == 4 == p.pipeline_parallel * p.tensor_parallel * p.data_parallel
    assert len(plan.programs) == 4
    assert len(plan.predictions.phases[0].peak_memory_bytes) == 4
    fixed = compile_job(
        load_job_spec(
            write_job(tmp_path / "pp"), ["cluster.device=h100", "cluster.num_devices=2", "cluster.pipeline_parallel=2"]
        )
    ).plan
    assert fixed.placement.pipeline_parallel == 2 and {s.stage for s in fixed.partition.subgraphs} == {0, 1}
