"""The plan executor: replays one rank's program.

It decides nothing: phases, hTasks, micro-batch counts, the order of every forward and backward
and the checkpoint rounds all come from the plan. `run` replays the prologue, each phase's round
body once per round of the phase, and the epilogue, dispatching each instruction through one
handler table built once: run-level handlers here (backbone, tasks, batches, optimizer steps,
checkpoints, adapters), compute handlers in `execution.interpreter`, pipeline sends and
receives in `distributed.p2p`. Around the loop: the run folder (lock, records), progress, logs
and the summary.

In a multi-rank plan (`world` given), a rank loads its stage's layers only (its
tensor-parallel shard of them) and runs its stage's subgraphs; every rank lays out every
micro-batch itself (a data-parallel replica takes every D-th piece of each task's batch);
per-task figures are reduced over all ranks; rank 0 alone writes the run folder, from task
states gathered from the ranks that own them.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from muxtune.common.allocator import active_allocator
from muxtune.common.files import atomic_write_bytes
from muxtune.kernels import configured_backend, cpu_build
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
    Recv,
    Send,
    TaskPlan,
    compute_fingerprint,
)

from .adapters import load_adapter, save_adapter
from .backbone import LoadedBackbone, load_model
from .checkpoint import (
    CHECKPOINTS,
    TaskSnapshot,
    checkpoint_dir,
    prune_checkpoints,
    remove_partial_checkpoints,
    restore_checkpoint,
    resume_record,
    save_checkpoint,
    write_job_record,
)
from .data import DataError, Example, batch_indices, load_dataset
from .distributed.p2p import StageExchange
from .distributed.reductions import (
    all_reduce_gradients,
    gather_peak_memory,
    gather_task_state,
    optimizer_steps,
    owned_anchors,
    owned_parameters,
)
from .distributed.world import World, wait_for_all
from .engine import MultiTaskEngine, StepResult, TaskState, TaskStatus
from .execution import rebuild_partition
from .execution.interpreter import SubgraphInterpreter
from .execution.lanes import LaneRunner
from .execution.plan_partition import partition_description
from .execution.streams import StreamSet
from .model_sources import base_model_name_or_path
from .models.loading import decoder_layer_prefix
from .packing import pack_pieces, split_task_batch
from .progress import ProgressDisplay
from .round_profile import RoundProfiler
from .run_folder import RunError, RunFolder
from .run_logs import StepLog
from .sharding import TensorSplit
from .task_runs import TaskRun, peak_memory_bytes, task_training
from .tensorboard_log import TensorBoardLogs
from .trace import ExecutionTrace

SUMMARY = "summary.json"


class PlanExecutor:
    """Replays one rank's program of a plan."""

    def __init__(
        self,
        plan: Plan,
        *,
        resume: bool = False,
        progress: ProgressDisplay | None = None,
        world: World | None = None,
        trace: bool = False,
        profile: bool = False,
    ):
        self.plan = plan
        self.world = world
        self.lead = world is None or world.lead
        self.program = plan.programs[world.rank if world is not None else 0]
        self.stage = plan.placement.stages[self.program.stage]
        self.resume = resume
        self.progress = progress or ProgressDisplay([(t.name, t.steps) for t in plan.tasks])
        self.output_dir = Path(plan.job.output_dir)
        self.backbone: LoadedBackbone | None = None
        self.engine: MultiTaskEngine | None = None
        self.runs: dict[str, TaskRun] = {}
        self.tensorboard = TensorBoardLogs(plan.job.report_to if self.lead else ())
        self.folder: RunFolder | None = None
        self.last_job_record: dict | None = None  # what the next checkpoint keeps as the previous record
        self.round_index = 0  # the last round of the body being replayed (the resumed one before any)
        self.body_first_round = 0
        self.interpreter: SubgraphInterpreter | None = None
        self.exchange: StageExchange | None = None
        self.owned: set[str] = set()
        self.trace = ExecutionTrace(self.program.rank) if trace else None
        self.profile = profile
        self.handlers = self._handler_table()
        self.executed = 0
        self._count_lock = threading.Lock()
        self._step_lock = threading.Lock()  # lanes step their own hTasks' tasks in bodies of several rounds
        on_cpu = torch.device(self.program.device).type == "cpu"
        self.lanes = LaneRunner(torch.get_num_threads() if on_cpu else 1)
        self.round_seconds: list[list[float]] = [[] for _ in plan.phases]
        self.phase_lanes = [0] * len(plan.phases)
        self.started = time.perf_counter()
        self.training_started = self.started

    def run(self) -> dict:
        """Replay the prologue, each phase's body once per round of the phase (after the resumed
        round, when resuming), and the epilogue; returns the summary."""
        if (self.world is None) != (self.plan.placement.num_ranks == 1):
            raise RunError(
                f"the plan places the job on {self.plan.placement.num_ranks} ranks; start them with muxtune-run "
                "(or torchrun -m muxtune.runtime.launch)"
            )
        self.tensorboard.require_packages()
        # Bad MUXTUNE_LORA_BACKEND or MUXTUNE_CPU_KERNELS values stop the run before anything is
        # written; the CPU kernels are built here once, not by the lanes' first instructions.
        configured_backend()
        if torch.device(self.program.device).type == "cpu":
            cpu_build.library()
        else:
            cpu_build.switch_value()
        folder_context = RunFolder(self.plan, resume=self.resume) if self.lead else contextlib.nullcontext()
        with folder_context as folder, self.tensorboard:
            self.folder = folder
            if folder is not None and folder.restarted:
                self.progress.message(f"{self.output_dir}: the last attempt left no checkpoint; starting over")
            for instruction in self.program.prologue:
                self.execute(instruction)
            if self.world is not None:
                wait_for_all(self.world, "every rank loads its stage and builds the tasks")
            self.training_started = time.perf_counter()
            self.progress.restart_clock()
            try:
                self._run_rounds()
            finally:
                self.lanes.close()
            for instruction in self.program.epilogue:
                self.execute(instruction)
            if self.trace is not None:
                self.trace.write(self.output_dir)
            self.progress.close()
            return self._write_summary()

    def _run_rounds(self) -> None:
        """Every phase's body once per round still to run (its streams as lanes on the CPU:
        `LaneRunner`; under the profiler with ``profile``)."""
        profiler = RoundProfiler(self.output_dir, self.program.rank, self.program.device) if self.profile else None
        resumed_after = self.round_index
        with profiler if profiler is not None else contextlib.nullcontext():
            for phase, body in zip(self.plan.phases, self.program.phases):
                first = max(phase.first_round, resumed_after + 1)
                if first <= phase.last_round and not phase.ends_body(first - 1):
                    raise RunError(
                        f"the checkpoint to resume from ends round {resumed_after}, inside a round body of phase "
                        f"{phase.id} ({phase.rounds_per_body} rounds from round {phase.first_round}): compile again"
                    )
                for body_first in range(first, phase.last_round + 1, phase.rounds_per_body):
                    self.body_first_round = body_first
                    self.round_index = body_first + phase.rounds_per_body - 1
                    started = time.perf_counter()
                    lanes = self.lanes.run(body, lambda instruction: self.execute(instruction, traced=True))
                    self.phase_lanes[phase.id] = max(self.phase_lanes[phase.id], lanes)
                    if self.exchange is not None:
                        self.exchange.drain()
                    per_round = (time.perf_counter() - started) / phase.rounds_per_body
                    self.round_seconds[phase.id] += [per_round] * phase.rounds_per_body
                    if profiler is not None:
                        profiler.step()
        if profiler is not None and self.lead:
            self.progress.message(profiler.report())

    def _handler_table(self) -> dict[type, Callable[[Any], None]]:
        """The run-level handlers; the compute handlers join once every task is built."""
        return {
            LoadBackbone: self._load_backbone,
            BuildTasks: self._build_tasks,
            LoadBatches: self._load_batches,
            AllReduce: self._all_reduce,
            Send: lambda ins: self._exchange().send(ins),
            Recv: lambda ins: self._exchange().recv(ins),
            OptimizerStep: self._optimizer_step,
            Checkpoint: self._checkpoint,
            ExportAdapters: self._export_adapters,
        }

    def execute(self, instruction: Instruction, traced: bool = False) -> None:
        """Dispatch one instruction to its handler (into the trace too, when ``traced``)."""
        if traced and self.trace is not None:
            start = time.perf_counter()
            self.handlers[type(instruction)](instruction)
            self.trace.record(instruction, self._round_of(instruction), start, time.perf_counter())
        else:
            self.handlers[type(instruction)](instruction)
        with self._count_lock:
            self.executed += 1

    def _round_of(self, instruction: Instruction) -> int:
        """The round an instruction of the current body belongs to (its hTask instance's)."""
        instance = getattr(instruction, "htask", None)
        if instance is None:
            return self.round_index
        return self.body_first_round + self._phase().round_of_instance(instance)

    def _active(self, names: tuple[str, ...] | None = None) -> list[str]:
        assert self.engine is not None
        names = names if names is not None else tuple(self.engine.tasks)
        return [n for n in names if self.engine.tasks[n].status is TaskStatus.ACTIVE]

    def _exchange(self) -> StageExchange:
        assert self.exchange is not None, "sends and receives need a multi-rank plan and built tasks"
        return self.exchange

    def _load_backbone(self, ins: LoadBackbone) -> None:
        stage = self.plan.placement.stages[ins.stage]
        layers = range(stage.first_layer, stage.last_layer + 1) if self.plan.placement.pipeline_parallel > 1 else None
        tensor_parallel = self.plan.placement.tensor_parallel
        split = (
            TensorSplit(tensor_parallel, self.world.position.tp_index) if self.world and tensor_parallel > 1 else None
        )
        try:
            self.backbone = load_model(self.plan.job.model, self.plan.job.dtype, self.program.device, layers, split)
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
        job_record = self._resume_record()
        self.last_job_record = job_record
        if job_record is not None:
            self.round_index = int(job_record["round"])
        for name in instruction.tasks:
            entry = job_record["tasks"].get(name) if job_record is not None else None
            self._build_task(self.plan.task(name), datasets[name].usable, entry)
        if len(self.runs) == len(self.plan.tasks):
            self._build_interpreter()

    def _resume_record(self) -> dict | None:
        """Rank 0 writes the run record and picks the job record to resume from; every rank
        gets that record."""
        job_record = None
        if self.lead:
            assert self.folder is not None, "build_tasks runs inside run()"
            self.folder.write_record()
            job_record, notes = resume_record(self.output_dir) if self.resume else (None, [])
            for note in notes:
                self.progress.message(note)
        if self.world is not None:
            shared = [job_record]
            with self.world.exchanging("sharing the job record to resume from"):
                torch.distributed.broadcast_object_list(shared, src=0)
            job_record = shared[0]
        return job_record

    def _build_interpreter(self) -> None:
        """Rebuild the plan's partition on this rank's model, all tasks attached (a host carrying
        PEFT modules is a PEFT subgraph), and join the compute handlers to the table."""
        assert self.backbone is not None and self.engine is not None
        description = partition_description(self.plan.partition, self.backbone.config.num_layers)
        graph = rebuild_partition(self.backbone.model, description, head=False)
        streams = StreamSet(self.engine.device)
        if self.world is None:
            self.interpreter = SubgraphInterpreter(graph, self.engine, streams)
        else:
            world = self.world
            self.interpreter = SubgraphInterpreter(
                graph, self.engine, streams, guard=lambda: world.exchanging("a tensor-parallel collective")
            )
        self.handlers.update(self.interpreter.handlers())
        if self.world is not None:
            anchors = {anchor for state in self.engine.tasks.values() for anchor in state.modules}
            last = self.stage.id == self.plan.placement.pipeline_parallel - 1
            layers = range(self.stage.first_layer, self.stage.last_layer + 1)
            prefix = decoder_layer_prefix(self.backbone.model)
            self.owned = owned_anchors(anchors, prefix, layers, self.stage.id == 0, last)
            self.exchange = StageExchange(self.plan.partition, self.world, self.interpreter.buffers)

    def _build_task(self, task: TaskPlan, examples: tuple[Example, ...], resume_from: dict | None) -> None:
        assert self.engine is not None
        init_state = load_adapter(task.init_from)[1] if task.init_from else None
        state = self.engine.add_task(task_training(task), init_state=init_state)
        directory = self.output_dir / task.name
        if self.lead:
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
        if self.lead:
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
        htask = self._phase().htask_of_instance(instruction.htask)
        pieces: dict[str, list[list[Example]]] = {}
        for name in self._active(htask.tasks):
            run = self.runs[name]
            run.current_batch = [run.examples[i] for i in next(run.batches)]
            batch = self.engine.prepare(name, run.current_batch)
            self.engine.begin_batch(name, batch)
            pieces[name] = split_task_batch(batch, htask.budget_of(name))[self._replica :: self._num_replicas]
            if len(pieces[name]) > htask.num_microbatches:
                raise RunError(
                    f"task {name}: round {self._round_of(instruction)} needs {len(pieces[name])} micro-batches, "
                    f"the plan has {htask.num_microbatches}; the data changed since the plan was compiled: "
                    "compile again"
                )
        self.interpreter.load(instruction.htask, pack_pieces(pieces, htask.num_microbatches), instruction.stream)

    @property
    def _replica(self) -> int:
        return self.world.position.replica if self.world is not None else 0

    @property
    def _num_replicas(self) -> int:
        return self.plan.placement.data_parallel

    def _phase(self) -> Phase:
        return next(p for p in self.plan.phases if p.first_round <= self.round_index <= p.last_round)

    def _all_reduce(self, instruction: AllReduce) -> None:
        """Sum the active tasks' owned gradients over the data-parallel replicas of the group."""
        assert self.engine is not None
        if self.world is None:
            assert instruction.group == (self.program.rank,), "a single-rank plan reduces over itself"
            return
        params = [
            p
            for name in self._active(instruction.tasks)
            for _, p in owned_parameters(self.engine.tasks[name], self.owned)
        ]
        all_reduce_gradients(params, self.world.data_groups[instruction.group], self.world)

    def _optimizer_step(self, instruction: OptimizerStep) -> None:
        assert self.engine is not None
        names = self._active(instruction.tasks)
        if self.world is None:
            results = [self.engine.optimizer_step(name) for name in names]
        else:
            results = optimizer_steps(self.engine, names, self.world)
        with self._step_lock:
            for result in results:
                self._record_step(self.runs[result.task], result)

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
        if self.lead:
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
                whole = self._whole_state(state, with_optimizer=True)
                run.checkpoint = checkpoint_dir(run.directory, state.step)
                if whole is not None:
                    adapter, optimizer = whole
                    rng = state.dropout_generator.get_state()
                    save_checkpoint(run.directory, TaskSnapshot(adapter, optimizer, rng, state.step, state.status))
        if not self.lead:
            return
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

    def _whole_state(self, state: TaskState, with_optimizer: bool) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The task's adapter tensors and (``with_optimizer``) optimizer state dict, whole: on
        rank 0, gathered from the ranks owning its parts; None on the other ranks."""
        if self.world is None:
            return state.adapter_state(), state.optimizer.state_dict() if with_optimizer else {}
        return gather_task_state(state, self.owned, self.world, with_optimizer=with_optimizer)

    def _saved_step(self, name: str) -> int:
        checkpoint = self.runs[name].checkpoint
        return int(checkpoint.name.removeprefix("step-")) if checkpoint is not None else 0

    def _export_adapters(self, _: ExportAdapters) -> None:
        assert self.engine is not None and self.backbone is not None
        for name, state in self.engine.tasks.items():
            if state.status is not TaskStatus.FINISHED:
                continue
            whole = self._whole_state(state, with_optimizer=False)
            if whole is not None:
                save_adapter(
                    self.runs[name].directory,
                    state.config.peft,
                    whole[0],
                    base_model=base_model_name_or_path(self.plan.job.model, self.backbone.model_dir),
                    backbone=self.backbone.config,
                )

    def _phase_timings(self) -> list[dict[str, Any]]:
        """Per phase: rounds run in this process, their seconds, the median round (the first
        round of a run warms up) and the plan's predicted round time, side by side, and how many
        CPU lanes ran its hTasks at once (0 when no round ran here)."""
        predicted = {p.phase: p.seconds_per_round for p in self.plan.predictions.phases}
        return [
            {
                "phase": phase.id,
                "rounds_run": len(times),
                "seconds": sum(times),
                "median_round_seconds": statistics.median(times) if times else None,
                "predicted_round_seconds": predicted.get(phase.id),
                "lanes": lanes,
            }
            for phase, times, lanes in zip(self.plan.phases, self.round_seconds, self.phase_lanes)
        ]

    def _write_summary(self) -> dict:
        peak = peak_memory_bytes()
        rank_peaks = gather_peak_memory(peak, self.world) if self.world is not None else [peak]
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
            "peak_memory_bytes": max(rank_peaks),
            "rank_peak_memory_bytes": rank_peaks,
            "allocator": active_allocator(),
            "instructions_executed": self.executed,
            "phases": self._phase_timings(),
            "tasks": tasks,
        }
        if self.lead:
            atomic_write_bytes(self.output_dir / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
        return summary
