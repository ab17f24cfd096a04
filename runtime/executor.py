"""The plan executor: replays a rank's instruction program on the fused engine.

The executor decides nothing: hTasks, token budgets and the order of operations come from the
plan. It owns the run's files: per task `adapter_*` (PEFT format), `metrics.jsonl`,
`manifest.jsonl` and `checkpoints/`, plus the job's `summary.json` and `run.json`.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from muxtune.common.files import atomic_write_bytes
from muxtune.plans import (
    BuildTasks,
    Checkpoint,
    ExportAdapters,
    ForwardBackward,
    Instruction,
    LoadBackbone,
    OptimizerStep,
    Plan,
    TaskPlan,
    compute_fingerprint,
)

from .adapters import load_adapter, save_adapter
from .backbone import LoadedBackbone, load_model
from .checkpoint import (
    CHECKPOINTS,
    prune_checkpoints,
    remove_partial_checkpoints,
    restore_checkpoint,
    resume_record,
    save_checkpoint,
    write_job_record,
)
from .data import DataError, Example, batch_indices, load_dataset
from .engine import MultiTaskEngine, StepResult, TaskStatus, TaskTraining
from .peft import TaskPeftConfig
from .progress import ProgressDisplay
from .run_folder import RunError, RunFolder
from .run_logs import StepLog

SUMMARY = "summary.json"


def task_training(task: TaskPlan) -> TaskTraining:
    """The engine's view of a planned task."""
    return TaskTraining(
        name=task.name,
        peft=TaskPeftConfig(
            method=task.peft.method,
            r=task.peft.r,
            alpha=float(task.peft.alpha),
            dropout=task.peft.dropout,
            target_modules=tuple(task.peft.target_modules),
            use_rslora=task.peft.use_rslora,
        ),
        lr=task.lr,
        steps=task.steps,
        weight_decay=task.weight_decay,
        max_grad_norm=task.max_grad_norm,
        schedule=task.schedule.name,
        warmup_steps=task.schedule.warmup_steps,
        seed=task.seed,
    )


@dataclass
class TaskRun:
    """A task's data stream and files during a run."""

    plan: TaskPlan
    directory: Path
    examples: tuple[Example, ...]
    batches: Iterator[list[int]]
    metrics: StepLog
    manifest: StepLog
    current_batch: list[Example] = field(default_factory=list)
    last_step_time: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    tokens: int = 0  # over the whole run, resumed parts included
    tokens_this_process: int = 0  # what throughput is measured on
    diverged_at: int | None = None
    checkpoint: Path | None = None


class PlanExecutor:
    """Replays one rank's program of a plan."""

    def __init__(self, plan: Plan, *, resume: bool = False, progress: ProgressDisplay | None = None, rank: int = 0):
        self.plan = plan
        self.program = plan.programs[rank]
        self.resume = resume
        self.progress = progress or ProgressDisplay([(t.name, t.steps) for t in plan.tasks])
        self.output_dir = Path(plan.job.output_dir)
        self.backbone: LoadedBackbone | None = None
        self.engine: MultiTaskEngine | None = None
        self.runs: dict[str, TaskRun] = {}
        self.folder: RunFolder | None = None
        self.last_job_record: dict | None = None  # what the next checkpoint keeps as the previous record
        self.round_index = 0
        self.started = time.perf_counter()
        self.training_started = self.started

    def run(self) -> dict:
        """Execute prologue, rounds until every task is done, epilogue; returns the summary."""
        with RunFolder(self.plan, resume=self.resume) as folder:
            self.folder = folder
            if folder.restarted:
                self.progress.message(f"{self.output_dir}: the last attempt left no checkpoint; starting over")
            for instruction in self.program.prologue:
                self.execute(instruction)
            self.training_started = time.perf_counter()
            self.progress.restart_clock()
            while self.engine is not None and self._active():
                self.round_index += 1
                for instruction in self.program.round:
                    self.execute(instruction)
            for instruction in self.program.epilogue:
                self.execute(instruction)
            self.progress.close()
            return self._write_summary()

    def execute(self, instruction: Instruction) -> None:
        """Dispatch one instruction to its handler."""
        handlers = {
            LoadBackbone: self._load_backbone,
            BuildTasks: self._build_tasks,
            ForwardBackward: self._forward_backward,
            OptimizerStep: self._optimizer_step,
            Checkpoint: self._checkpoint,
            ExportAdapters: self._export_adapters,
        }
        handlers[type(instruction)](instruction)

    def _active(self, names: tuple[str, ...] | None = None) -> list[str]:
        assert self.engine is not None
        names = names if names is not None else tuple(self.engine.tasks)
        return [n for n in names if self.engine.tasks[n].status is TaskStatus.ACTIVE]

    def _load_backbone(self, _: LoadBackbone) -> None:
        try:
            self.backbone = load_model(self.plan.job.model, self.plan.job.dtype, self.program.device)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        backbone_dict = self.backbone.config.to_dict()
        if backbone_dict != self.plan.backbone:
            differing = sorted(
                k
                for k in set(backbone_dict) | set(self.plan.backbone)
                if backbone_dict.get(k) != self.plan.backbone.get(k)
            )
            raise RunError(f"{self.plan.job.model}: the backbone differs from the plan's in {', '.join(differing)}")
        fingerprint = compute_fingerprint(backbone_dict, self.plan.tasks, self.plan.htasks)
        if fingerprint != self.plan.fingerprint:
            raise RunError(
                f"fingerprint: the plan says {self.plan.fingerprint}, this backbone and plan give {fingerprint}"
            )
        self.engine = MultiTaskEngine(self.backbone.model)

    def _build_tasks(self, instruction: BuildTasks) -> None:
        assert self.backbone is not None and self.engine is not None, "build_tasks needs load_backbone first"
        datasets = {}
        for name in instruction.tasks:
            task = self.plan.task(name)
            dataset = load_dataset(task.data.path, task.data.format, self.backbone.tokenizer, task.max_seq_len)
            stats = (len(dataset.examples), dataset.num_targetless, sum(len(e.input_ids) for e in dataset.usable))
            if stats != (task.num_examples, task.num_targetless_examples, task.num_tokens):
                raise DataError(f"{task.data.path}: the dataset changed since the plan was compiled; compile again")
            datasets[name] = dataset
        assert self.folder is not None, "build_tasks runs inside run()"
        self.folder.write_record()
        job_record, notes = resume_record(self.output_dir) if self.resume else (None, [])
        for note in notes:
            self.progress.message(note)
        self.last_job_record = job_record
        if job_record is not None:
            self.round_index = int(job_record["round"])
        for name in instruction.tasks:
            entry = job_record["tasks"].get(name) if job_record is not None else None
            self._build_task(self.plan.task(name), datasets[name].usable, entry)

    def _build_task(self, task: TaskPlan, examples: tuple[Example, ...], resume_from: dict | None) -> None:
        assert self.engine is not None
        init_state = load_adapter(task.init_from)[1] if task.init_from else None
        state = self.engine.add_task(task_training(task), init_state=init_state)
        directory = self.output_dir / task.name
        remove_partial_checkpoints(directory)
        run = TaskRun(
            plan=task,
            directory=directory,
            examples=examples,
            batches=batch_indices(len(examples), task.batch_size, task.seed),
            metrics=StepLog(directory / "metrics.jsonl"),
            manifest=StepLog(directory / "manifest.jsonl"),
        )
        if resume_from is not None and resume_from["checkpoint"] is not None:
            run.checkpoint = directory / CHECKPOINTS / resume_from["checkpoint"]
            restore_checkpoint(run.checkpoint, state, root=self.output_dir)
            for _ in range(state.step):
                next(run.batches)
        logged_steps = state.step
        if resume_from is not None and resume_from["status"] == TaskStatus.DIVERGED.value:
            state.status = TaskStatus.DIVERGED
            run.diverged_at = int(resume_from["step"])
            logged_steps = run.diverged_at - 1
        run.metrics.truncate_after(logged_steps)
        run.manifest.truncate_after(logged_steps)
        for record in run.metrics.records():
            run.first_loss = run.first_loss if run.first_loss is not None else record["loss"]
            run.last_loss, run.tokens = record["loss"], run.tokens + record["tokens"]
        self.runs[task.name] = run
        self.progress.set_progress(task.name, state.step, "resumed" if state.step else "waiting")
        run.last_step_time = time.perf_counter()

    def _forward_backward(self, instruction: ForwardBackward) -> None:
        assert self.engine is not None
        htask = self.plan.htasks[instruction.htask]
        budgets = dict(zip(htask.tasks, htask.token_budgets))
        active = self._active(htask.tasks)
        batches = {}
        for name in active:
            run = self.runs[name]
            run.current_batch = [run.examples[i] for i in next(run.batches)]
            batches[name] = run.current_batch
        if batches:
            self.engine.forward_backward(batches, {n: budgets[n] for n in batches})

    def _optimizer_step(self, instruction: OptimizerStep) -> None:
        assert self.engine is not None
        for name in self._active(instruction.tasks):
            run = self.runs[name]
            if not run.current_batch:
                continue
            result = self.engine.optimizer_step(name)
            self._record_step(run, result)
            run.current_batch = []

    def _record_step(self, run: TaskRun, result: StepResult) -> None:
        now = time.perf_counter()
        seconds, run.last_step_time = now - run.last_step_time, now
        name = run.plan.name
        if result.diverged:
            run.diverged_at = result.step
            kept = run.checkpoint
            self.progress.step(name, result.step - 1, result.loss, 0, "diverged")
            self.progress.message(
                f"task {name}: loss or gradient became non-finite at step {result.step} "
                f"(loss {result.loss}); the task is stopped, "
                + (f"its last good checkpoint is {kept}" if kept else "it has no checkpoint")
                + "; the other tasks go on"
            )
            return
        run.first_loss = run.first_loss if run.first_loss is not None else result.loss
        run.last_loss = result.loss
        run.tokens += result.num_tokens
        run.tokens_this_process += result.num_tokens
        run.metrics.append(
            {
                "step": result.step,
                "loss": result.loss,
                "lr": result.lr,
                "grad_norm": result.grad_norm,
                "tokens": result.num_tokens,
                "target_tokens": result.num_target_tokens,
                "seconds": round(seconds, 6),
            }
        )
        run.manifest.append({"step": result.step, "indices": [e.index for e in run.current_batch]})
        status = "done" if result.step >= run.plan.steps else "running"
        self.progress.step(name, result.step, result.loss, result.num_tokens, status)

    def _checkpoint(self, _: Checkpoint) -> None:
        """When any task reached a multiple of its save_every or took its last step, checkpoint
        the whole round; the job keeps this round's record and the one before it."""
        assert self.engine is not None
        states = self.engine.tasks

        def due(name: str) -> bool:
            plan, state = self.runs[name].plan, states[name]
            if state.status is TaskStatus.DIVERGED or state.step <= self._saved_step(name):
                return False
            return state.step == plan.steps or (plan.save_every > 0 and state.step % plan.save_every == 0)

        if not any(due(name) for name in states):
            return
        for name, state in states.items():
            run = self.runs[name]
            if state.status is not TaskStatus.DIVERGED and state.step > self._saved_step(name):
                run.checkpoint = save_checkpoint(run.directory, state)
        previous = self.last_job_record
        self.last_job_record = write_job_record(
            self.output_dir,
            self.round_index,
            {
                name: {
                    "step": run.diverged_at if run.diverged_at is not None else states[name].step,
                    "status": states[name].status.value,
                    "checkpoint": run.checkpoint.name if run.checkpoint is not None else None,
                }
                for name, run in self.runs.items()
            },
            previous=previous,
        )
        kept = [record["tasks"] for record in (previous, self.last_job_record) if record is not None]
        for name, run in self.runs.items():
            prune_checkpoints(run.directory, keep={tasks[name]["checkpoint"] for tasks in kept if name in tasks})

    def _saved_step(self, name: str) -> int:
        checkpoint = self.runs[name].checkpoint
        return int(checkpoint.name.removeprefix("step-")) if checkpoint is not None else 0

    def _export_adapters(self, _: ExportAdapters) -> None:
        assert self.engine is not None and self.backbone is not None
        for name, state in self.engine.tasks.items():
            if state.status is TaskStatus.FINISHED:
                save_adapter(
                    self.runs[name].directory,
                    state.config.peft,
                    state.adapter_state(),
                    base_model=self.plan.job.model,
                    fan_in_fan_out=self.backbone.config.family == "gpt2",
                )

    def _write_summary(self) -> dict:
        now = time.perf_counter()
        wall, train = now - self.started, max(now - self.training_started, 1e-9)
        tasks = {}
        assert self.engine is not None
        for name, run in self.runs.items():
            state = self.engine.tasks[name]
            tasks[name] = {
                "status": state.status.value,
                "steps": state.step if run.diverged_at is None else run.diverged_at - 1,
                "diverged_at_step": run.diverged_at,
                "first_loss": run.first_loss,
                "last_loss": run.last_loss,
                "tokens": run.tokens,
                "tokens_per_second": run.tokens_this_process / train,
            }
        summary = {
            "wall_seconds": wall,
            "train_seconds": train,
            "tokens_per_second": sum(run.tokens_this_process for run in self.runs.values()) / train,
            "peak_memory_bytes": peak_memory_bytes(),
            "tasks": tasks,
        }
        atomic_write_bytes(self.output_dir / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
        return summary


def peak_memory_bytes() -> int:
    """Peak device memory on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
