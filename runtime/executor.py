"""The plan executor: replays one rank's program.

It decides nothing: phases, hTasks, micro-batch counts, the order of every forward and backward
and the checkpoint rounds all come from the plan. `run` replays the prologue, each phase's round
body once per round of the phase, and the epilogue, dispatching each instruction through one
handler table built once: run-level handlers here (backbone, tasks, batches, optimizer steps,
checkpoints, adapters), compute handlers in `execution.interpreter`. Around the loop: the run
folder (lock, records), progress, logs and the summary.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from muxtune.common.files import atomic_write_bytes
from muxtune.plans import (
    AllReduce,
    BuildTasks,
    Checkpoint,
    ExportAdapters,
    Instruction,
    LoadBackbone,
    LoadBatches,
    OptimizerStep,
    Phase,
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
from .engine import MultiTaskEngine, StepResult, TaskStatus
from .execution import rebuild_partition
from .execution.interpreter import SubgraphInterpreter
from .execution.plan_partition import partition_description
from .execution.streams import StreamSet
from .model_sources import base_model_name_or_path
from .packing import pack_pieces, split_task_batch
from .progress import ProgressDisplay
from .run_folder import RunError, RunFolder
from .run_logs import StepLog
from .task_runs import TaskRun, peak_memory_bytes, task_training
from .tensorboard_log import TensorBoardLogs

SUMMARY = "summary.json"


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
        self.tensorboard = TensorBoardLogs(plan.job.report_to)
        self.folder: RunFolder | None = None
        self.last_job_record: dict | None = None  # what the next checkpoint keeps as the previous record
        self.round_index = 0
        self.interpreter: SubgraphInterpreter | None = None
        self.handlers = self._handler_table()
        self.executed = 0
        self.round_seconds: list[list[float]] = [[] for _ in plan.phases]
        self.started = time.perf_counter()
        self.training_started = self.started

    def run(self) -> dict:
        """Replay the prologue, each phase's body once per round of the phase (after the resumed
        round, when resuming), and the epilogue; returns the summary."""
        if self.plan.placement.num_ranks > 1:
            raise RunError(
                f"the plan places the job on {self.plan.placement.num_ranks} ranks; this runtime runs single-rank "
                "plans: compile for one device (cluster.num_devices: 1)"
            )
        self.tensorboard.require_packages()
        with RunFolder(self.plan, resume=self.resume) as folder, self.tensorboard:
            self.folder = folder
            if folder.restarted:
                self.progress.message(f"{self.output_dir}: the last attempt left no checkpoint; starting over")
            for instruction in self.program.prologue:
                self.execute(instruction)
            self.training_started = time.perf_counter()
            self.progress.restart_clock()
            resumed_after = self.round_index
            for phase, body in zip(self.plan.phases, self.program.phases):
                for round_index in range(max(phase.first_round, resumed_after + 1), phase.last_round + 1):
                    self.round_index = round_index
                    started = time.perf_counter()
                    for instruction in body:
                        self.execute(instruction)
                    self.round_seconds[phase.id].append(time.perf_counter() - started)
            for instruction in self.program.epilogue:
                self.execute(instruction)
            self.progress.close()
            return self._write_summary()

    def _handler_table(self) -> dict[type, Callable[[Any], None]]:
        """The run-level handlers; the compute handlers join once every task is built."""
        return {
            LoadBackbone: self._load_backbone,
            BuildTasks: self._build_tasks,
            LoadBatches: self._load_batches,
            AllReduce: self._all_reduce,
            OptimizerStep: self._optimizer_step,
            Checkpoint: self._checkpoint,
            ExportAdapters: self._export_adapters,
        }

    def execute(self, instruction: Instruction) -> None:
        """Dispatch one instruction to its handler."""
        self.handlers[type(instruction)](instruction)
        self.executed += 1

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
        fingerprint = compute_fingerprint(backbone_dict, self.plan.tasks, self.plan.phases, self.plan.partition)
        if fingerprint != self.plan.fingerprint:
            raise RunError(
                f"fingerprint: the plan says {self.plan.fingerprint}, this backbone and plan give {fingerprint}"
            )
        tokenizer = self.backbone.tokenizer
        self.engine = MultiTaskEngine(
            self.backbone.model, encode=lambda text: tokenizer.encode(text, add_special_tokens=True)
        )

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
        if len(self.runs) == len(self.plan.tasks):
            self._build_interpreter()

    def _build_interpreter(self) -> None:
        """Rebuild the plan's partition on this rank's model, all tasks attached (a host carrying
        PEFT modules is a PEFT subgraph), and join the compute handlers to the table."""
        assert self.backbone is not None and self.engine is not None
        description = partition_description(self.plan.partition, self.backbone.config.num_layers)
        graph = rebuild_partition(self.backbone.model, description, head=False)
        self.interpreter = SubgraphInterpreter(graph, self.engine, StreamSet(self.engine.device))
        self.handlers.update(self.interpreter.handlers())

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
        self.tensorboard.open_task(task.name, directory, logged_steps)
        for record in run.metrics.records():
            run.first_loss = run.first_loss if run.first_loss is not None else record["loss"]
            run.last_loss, run.tokens = record["loss"], run.tokens + record["tokens"]
        self.runs[task.name] = run
        self.progress.set_progress(task.name, state.step, "resumed" if state.step else "waiting")
        run.last_step_time = time.perf_counter()

    def _load_batches(self, instruction: LoadBatches) -> None:
        """Each active task's next global batch, split by its budget into the phase's exact
        number of micro-batches (piece i of every task in micro-batch i)."""
        assert self.engine is not None and self.interpreter is not None
        htask = self._phase().htasks[instruction.htask]
        pieces: dict[str, list[list[Example]]] = {}
        for name in self._active(htask.tasks):
            run = self.runs[name]
            run.current_batch = [run.examples[i] for i in next(run.batches)]
            batch = self.engine.prepare(name, run.current_batch)
            self.engine.begin_batch(name, batch)
            pieces[name] = split_task_batch(batch, htask.budget_of(name))
            if len(pieces[name]) > htask.num_microbatches:
                raise RunError(
                    f"task {name}: round {self.round_index} needs {len(pieces[name])} micro-batches, the plan has "
                    f"{htask.num_microbatches}; the data changed since the plan was compiled: compile again"
                )
        self.interpreter.load(instruction.htask, pack_pieces(pieces, htask.num_microbatches))

    def _phase(self) -> Phase:
        return next(p for p in self.plan.phases if p.first_round <= self.round_index <= p.last_round)

    def _all_reduce(self, instruction: AllReduce) -> None:
        """A group of this rank alone holds the whole sum already."""
        assert instruction.group == (self.program.rank,), "multi-rank plans are refused before they start"

    def _optimizer_step(self, instruction: OptimizerStep) -> None:
        assert self.engine is not None
        for name in self._active(instruction.tasks):
            self._record_step(self.runs[name], self.engine.optimizer_step(name))

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
        record = {
            "step": result.step,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens": result.num_tokens,
            "target_tokens": result.num_target_tokens,
            "seconds": round(seconds, 6),
        }
        run.metrics.append(record)
        self.tensorboard.log_step(name, record)
        run.manifest.append({"step": result.step, "indices": [e.index for e in run.current_batch]})
        status = "done" if result.step >= run.plan.steps else "running"
        self.progress.step(name, result.step, result.loss, result.num_tokens, status)

    def _checkpoint(self, instruction: Checkpoint) -> None:
        """In the rounds the plan lists, checkpoint every task that stepped since its last
        checkpoint; the job keeps this round's record and the one before it."""
        assert self.engine is not None
        if self.round_index not in instruction.rounds:
            return
        states = self.engine.tasks
        for name, state in states.items():
            run = self.runs[name]
            if state.status is not TaskStatus.DIVERGED and state.step > self._saved_step(name):
                run.checkpoint = save_checkpoint(run.directory, state)
        self.tensorboard.flush()
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
                    base_model=base_model_name_or_path(self.plan.job.model, self.backbone.model_dir),
                    backbone=self.backbone.config,
                )

    def _phase_timings(self) -> list[dict[str, Any]]:
        """Per phase: rounds run in this process, their seconds, the median round (the first
        round of a run warms up) and the plan's predicted round time, side by side."""
        predicted = {p.phase: p.seconds_per_round for p in self.plan.predictions.phases}
        return [
            {
                "phase": phase.id,
                "rounds_run": len(times),
                "seconds": sum(times),
                "median_round_seconds": statistics.median(times) if times else None,
                "predicted_round_seconds": predicted.get(phase.id),
            }
            for phase, times in zip(self.plan.phases, self.round_seconds)
        ]

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
            "instructions_executed": self.executed,
            "phases": self._phase_timings(),
            "tasks": tasks,
        }
        atomic_write_bytes(self.output_dir / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
        return summary
