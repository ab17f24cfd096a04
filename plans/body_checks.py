"""One rank's round body of one phase, simulated in order: every buffer is produced before it is
used, every micro-batch runs forward, backward and free exactly once on the rank, and every task
of the phase steps once after its micro-batches (the guarantee behind "a plan that loads always
runs"). In a body of several rounds the same holds per hTask instance, each task steps once per
round, and an instance loads only after its tasks' step of the round before (across streams:
through events). Program order is the order checked; `stream_checks` adds what running the
streams apart needs (one stream per hTask instance, stream 0's global instructions after joins)."""

from __future__ import annotations

from dataclasses import dataclass, field

from muxtune.common.text import quote
from muxtune.specs.checks import add_error, at

from .check_text import describe, listing, missing_numbers
from .dataflow import Dataflow
from .instructions import (
    AllReduce,
    Backward,
    Checkpoint,
    Forward,
    Free,
    Instruction,
    LoadBatches,
    LossBackward,
    OptimizerStep,
    RecordEvent,
    Recv,
    Send,
    WaitEvent,
)
from .schema import Plan, RankProgram
from .stream_checks import StreamOrder

MAX_BODY_ERRORS = 20
"""Problems reported per round body; the rest are counted."""


@dataclass
class _MicroBatch:
    """What exists of one micro-batch on this rank at the current instruction."""

    forwarded: set[int] = field(default_factory=set)
    available: set[str] = field(default_factory=set)
    loss: bool = False
    backwarded: set[int] = field(default_factory=set)
    grads_received: set[int] = field(default_factory=set)
    sent: dict[tuple[int, bool, int], int] = field(default_factory=dict)
    received: dict[tuple[int, bool], int] = field(default_factory=dict)
    freed_at: int | None = None


class _Body:
    """The simulation state of one round body."""

    def __init__(self, plan: Plan, flow: Dataflow, program: RankProgram, phase: int, path: str, errors: list[str]):
        self.phase = plan.phases[phase]
        self.flow = flow
        self.stage = program.stage
        self.last_stage = len(plan.placement.stages) - 1
        self.local = flow.on_stage(program.stage)
        self.path = path
        self.errors = errors
        self.count = 0
        self.loaded: dict[int, int] = {}
        self.micro: dict[int, dict[int, _MicroBatch]] = {i: {} for i in range(self.phase.num_instances)}
        self.num_freed = dict.fromkeys(self.micro, 0)
        self.num_backwarded = dict.fromkeys(self.micro, 0)
        self.recorded: set[str] = set()
        self.stepped: dict[str, list[int]] = {}
        self.checkpoint_at: int | None = None
        self.streams = StreamOrder(self.error, steps_on_own_streams=self.phase.rounds_per_body > 1)

    def error(self, index: int | None, message: str) -> None:
        self.count += 1
        if self.count <= MAX_BODY_ERRORS:
            add_error(self.errors, self.path if index is None else at(self.path, index), message)

    def run(self, body: tuple[Instruction, ...]) -> None:
        handlers = {
            LoadBatches: self.load_batches,
            Forward: self.forward,
            LossBackward: self.loss_backward,
            Backward: self.backward,
            Free: self.free,
            Send: self.send,
            Recv: self.recv,
            RecordEvent: self.record_event,
            WaitEvent: self.wait_event,
            AllReduce: self.all_reduce,
            OptimizerStep: self.optimizer_step,
            Checkpoint: self.checkpoint,
        }
        for index, instruction in enumerate(body):
            handlers[type(instruction)](index, instruction)
            self.streams.see(index, instruction)
        self.finish()
        if self.count > MAX_BODY_ERRORS:
            add_error(self.errors, self.path, f"{self.count - MAX_BODY_ERRORS} more problems in this round body")

    def open(self, index: int, instruction: Forward | LossBackward | Backward | Free | Send | Recv) -> _MicroBatch:
        """The micro-batch an instruction acts on: its hTask loaded, the micro-batch not freed."""
        h = instruction.htask
        if h not in self.loaded:
            self.error(index, f"{describe(instruction)} comes before load_batches of hTask {h}")
            self.loaded[h] = -1
        micro = self.micro[h].setdefault(instruction.microbatch, _MicroBatch())
        if micro.freed_at is not None:
            self.error(index, f"{describe(instruction)} comes after the micro-batch is freed (at [{micro.freed_at}])")
        return micro

    def on_this_stage(self, index: int, instruction: Instruction, subgraph: int) -> bool:
        stage = self.flow.stage_of[subgraph]
        if stage != self.stage:
            self.error(
                index,
                f"{describe(instruction)}: subgraph {subgraph} runs on stage {stage}, not this rank's {self.stage}",
            )
        return stage == self.stage

    def grad_pending(self, micro: _MicroBatch, value: str, cut: int) -> list[int]:
        """Readers after ``cut`` (`Dataflow.loss` for the loss) whose gradient contribution to
        ``value`` is still missing: neither run backward here nor received across a cut."""
        flow = self.flow
        made_by = flow.producer[value]
        return [
            r
            for r in flow.readers.get(value, ())
            if r > cut
            and not (micro.loss if r == flow.loss else r in micro.backwarded)
            and not any(made_by <= received < r for received in micro.grads_received)
        ]

    def missing_grads(self, micro: _MicroBatch, values: tuple[str, ...], cut: int) -> str | None:
        """``'v', ... (why)`` for the values whose gradient does not exist yet, or None."""
        missing = [(v, self.grad_pending(micro, v, cut)) for v in values]
        missing = [(v, pending) for v, pending in missing if pending]
        if not missing:
            return None
        value, pending = missing[0]
        flow = self.flow
        here = [r for r in pending if r != flow.loss and flow.stage_of[r] == self.stage]
        there = [r for r in pending if r != flow.loss and flow.stage_of[r] != self.stage]
        parts = ["loss_backward has not run"] if flow.loss in pending else []
        parts += [f"subgraph(s) {listing(here)} have not run backward"] if here else []
        parts += [f"no gradient from subgraph(s) {listing(there)} was received"] if there else []
        return f"{listing(v for v, _ in missing)}, which does not exist yet ({quote(value)}: {'; '.join(parts)})"

    def load_batches(self, index: int, instruction: LoadBatches) -> None:
        h = instruction.htask
        if self.loaded.get(h, -1) >= 0:
            self.error(index, f"loads the batches of hTask {h} again (already at [{self.loaded[h]}])")
            return
        self.loaded[h] = index
        body_round = self.phase.round_of_instance(h)
        if body_round == 0:
            return
        for name in self.phase.htask_of_instance(h).tasks:
            steps = self.stepped.get(name, [])
            if len(steps) < body_round:
                self.error(index, f"loads hTask {h} before task {quote(name)}'s optimizer_step of the round before")
            elif not self.streams.follows(instruction.stream, steps[body_round - 1]):
                self.error(
                    index,
                    f"loads hTask {h} on stream {instruction.stream} without waiting for task {quote(name)}'s "
                    f"optimizer_step of the round before (at [{steps[body_round - 1]}]; record an event after it and "
                    "wait for it here)",
                )

    def forward(self, index: int, instruction: Forward) -> None:
        micro = self.open(index, instruction)
        s = instruction.subgraph
        if not self.on_this_stage(index, instruction, s):
            return
        if s in micro.forwarded:
            self.error(index, f"runs {describe(instruction)} a second time")
            return
        flow = self.flow
        missing = [v for v in flow.inputs[s] if v in flow.producer and v not in micro.available]
        if missing:
            makers = sorted({flow.producer[v] for v in missing})
            self.error(
                index,
                f"{describe(instruction)} uses {listing(missing)} before it is produced "
                f"(by the forward of subgraph(s) {listing(makers)}, or a recv)",
            )
        micro.forwarded.add(s)
        micro.available.update(flow.outputs[s])

    def loss_backward(self, index: int, instruction: LossBackward) -> None:
        micro = self.open(index, instruction)
        if micro.loss:
            self.error(index, f"runs {describe(instruction)} a second time")
            return
        if self.stage != self.last_stage:
            self.error(
                index,
                f"{describe(instruction)}: the loss runs on the last stage ({self.last_stage}, which holds the "
                f"head), not this rank's {self.stage}",
            )
            return
        missing = [v for v in self.flow.graph_outputs if v not in micro.available]
        if missing:
            makers = sorted({self.flow.producer[v] for v in missing})
            self.error(
                index,
                f"{describe(instruction)} comes before the graph output(s) {listing(missing)} exist "
                f"(the forward of subgraph(s) {listing(makers)}, or a recv)",
            )
        micro.loss = True

    def backward(self, index: int, instruction: Backward) -> None:
        micro = self.open(index, instruction)
        s = instruction.subgraph
        if not self.on_this_stage(index, instruction, s):
            return
        if s in micro.backwarded:
            self.error(index, f"runs {describe(instruction)} a second time")
            return
        if s not in micro.forwarded:
            self.error(index, f"{describe(instruction)} comes before its forward")
        else:
            missing = self.missing_grads(micro, self.flow.outputs[s], s)
            if missing:
                self.error(index, f"{describe(instruction)} needs the gradient of {missing}")
        micro.backwarded.add(s)
        if len(micro.backwarded) == len(self.local):
            self.num_backwarded[instruction.htask] += 1

    def free(self, index: int, instruction: Free) -> None:
        micro = self.open(index, instruction)
        pending = [s for s in self.local if s not in micro.backwarded]
        if pending:
            self.error(index, f"{describe(instruction)} comes before the backward of subgraph(s) {listing(pending)}")
        if micro.freed_at is None:
            micro.freed_at = index
            self.num_freed[instruction.htask] += 1

    def crossing(self, index: int, instruction: Send | Recv, own_stage: bool) -> tuple[str, ...] | None:
        """The values crossing the cut after the instruction's subgraph, when the cut is one this
        rank can send or receive there (``own_stage``: the subgraph must run on this stage)."""
        s = instruction.subgraph
        stage = self.flow.stage_of[s]
        if (stage == self.stage) != own_stage:
            where = "this rank's stage" if stage == self.stage else f"stage {stage}"
            verb = "sends" if isinstance(instruction, Send) else "receives"
            what = "gradient" if instruction.grad else "activation"
            whose = "its own stage" if own_stage else "another stage"
            self.error(
                index,
                f"{describe(instruction)}: subgraph {s} runs on {where}, but a rank {verb} the {what} after "
                f"a subgraph of {whose}",
            )
            return None
        if not self.flow.boundaries[s]:
            self.error(index, f"{describe(instruction)}: no value crosses the cut after subgraph {s}")
            return None
        return self.flow.boundaries[s]

    def send(self, index: int, instruction: Send) -> None:
        micro = self.open(index, instruction)
        key = (instruction.subgraph, instruction.grad, instruction.peer)
        if key in micro.sent:
            self.error(index, f"{describe(instruction)} again (already at [{micro.sent[key]}])")
            return
        micro.sent[key] = index
        values = self.crossing(index, instruction, own_stage=not instruction.grad)
        if values is None:
            return
        if not instruction.grad:
            missing = [v for v in values if v not in micro.available]
            if missing:
                self.error(index, f"{describe(instruction)} sends {listing(missing)} before it is produced")
            return
        grads = self.missing_grads(micro, values, instruction.subgraph)
        if grads:
            self.error(index, f"{describe(instruction)} needs the gradient of {grads}")

    def recv(self, index: int, instruction: Recv) -> None:
        micro = self.open(index, instruction)
        key = (instruction.subgraph, instruction.grad)
        if key in micro.received:
            self.error(index, f"{describe(instruction)} again (already at [{micro.received[key]}])")
            return
        micro.received[key] = index
        values = self.crossing(index, instruction, own_stage=instruction.grad)
        if values is None:
            return
        if instruction.grad:
            micro.grads_received.add(instruction.subgraph)
        else:
            micro.available.update(values)

    def record_event(self, index: int, instruction: RecordEvent) -> None:
        self.recorded.add(instruction.event)

    def wait_event(self, index: int, instruction: WaitEvent) -> None:
        if instruction.event not in self.recorded:
            self.error(index, f"waits for event {quote(instruction.event)}, which is not recorded earlier in this body")

    def instance_of(self, name: str) -> int:
        """The hTask instance of task ``name``'s next optimizer step."""
        return self.phase.htask_of(name).id + len(self.stepped.get(name, ())) * len(self.phase.htasks)

    def not_backwarded(self, instance: int) -> str | None:
        """The micro-batches of hTask ``instance`` that have not run backward through every
        subgraph of this stage (listed), or None."""
        done, micro = self.num_backwarded[instance], self.micro[instance]
        count = self.phase.htask_of_instance(instance).num_microbatches
        if not self.local or done == count:
            return None
        complete = len(self.local)
        return missing_numbers(count, lambda m: m in micro and len(micro[m].backwarded) == complete, done)

    def not_freed(self, instance: int) -> str | None:
        """The micro-batches of hTask ``instance`` not freed yet (listed), or None."""
        done, micro = self.num_freed[instance], self.micro[instance]
        count = self.phase.htask_of_instance(instance).num_microbatches
        if done == count:
            return None
        return missing_numbers(count, lambda m: m in micro and micro[m].freed_at is not None, done)

    def all_reduce(self, index: int, instruction: AllReduce) -> None:
        for name in instruction.tasks:
            steps = self.stepped.get(name, [])
            if len(steps) == self.phase.rounds_per_body:
                self.error(index, f"all-reduces task {quote(name)} after its optimizer_step (at [{steps[-1]}])")
                continue
            instance = self.instance_of(name)
            pending = self.not_backwarded(instance)
            if pending:
                self.error(
                    index,
                    f"all-reduces task {quote(name)} before micro-batch(es) {pending} of hTask {instance} "
                    "have run backward",
                )

    def optimizer_step(self, index: int, instruction: OptimizerStep) -> None:
        per_body = self.phase.rounds_per_body
        for name in instruction.tasks:
            steps = self.stepped.setdefault(name, [])
            if len(steps) == per_body:
                often = "twice in one round" if per_body == 1 else f"{per_body + 1} times in {per_body} rounds"
                self.error(index, f"steps task {quote(name)} {often}")
                continue
            instance = self.instance_of(name)
            steps.append(index)
            pending = self.not_freed(instance)
            if pending:
                self.error(
                    index,
                    f"steps task {quote(name)} before micro-batch(es) {pending} of hTask {instance} are freed",
                )
            own = self.streams.htask_streams.get(instance, 0)
            if instruction.stream not in (0, own):
                self.error(
                    index,
                    f"steps task {quote(name)} on stream {instruction.stream}; its hTask {instance} runs on "
                    f"stream {own} (a step runs there, or on stream 0 after every stream is joined)",
                )

    def checkpoint(self, index: int, instruction: Checkpoint) -> None:
        if self.checkpoint_at is not None:
            self.error(index, f"checkpoints a second time in one round body (first at [{self.checkpoint_at}])")
            return
        self.checkpoint_at = index
        per_body = self.phase.rounds_per_body
        pending = [name for name in self.phase.tasks if len(self.stepped.get(name, ())) < per_body]
        if pending:
            self.error(
                index,
                f"checkpoints before the optimizer_step of task(s) {listing(pending)} "
                f"(a checkpoint holds the state after the {'round' if per_body == 1 else 'body'})",
            )

    def finish(self) -> None:
        """Every hTask loaded, every micro-batch run through and freed, every task stepped."""
        for instance in range(self.phase.num_instances):
            htask = self.phase.htask_of_instance(instance)
            if instance not in self.loaded:
                self.error(None, f"has no load_batches for hTask {instance}")
            touched = self.micro[instance]
            for m in sorted(touched):
                micro = touched[m]
                parts = []
                no_forward = [s for s in self.local if s not in micro.forwarded]
                no_backward = [s for s in self.local if s not in micro.backwarded]
                if no_forward:
                    parts.append(f"no forward of subgraph(s) {listing(no_forward)}")
                if no_backward:
                    parts.append(f"no backward of subgraph(s) {listing(no_backward)}")
                if micro.freed_at is None:
                    parts.append("no free")
                if parts:
                    self.error(None, f"hTask {instance} micro-batch {m} has {'; '.join(parts)}")
            if len(touched) < htask.num_microbatches:
                untouched = missing_numbers(htask.num_microbatches, touched.__contains__, len(touched))
                self.error(None, f"hTask {instance} micro-batch(es) {untouched} never run (no instruction names them)")
        per_body = self.phase.rounds_per_body
        never = [name for name in self.phase.tasks if name not in self.stepped]
        if never:
            self.error(None, f"has no optimizer_step for task(s) {listing(never)}; they would never finish")
        short = [name for name in self.phase.tasks if 0 < len(self.stepped.get(name, ())) < per_body]
        if short:
            self.error(None, f"steps task(s) {listing(short)} fewer than {per_body} times (once per round of the body)")


def check_body(plan: Plan, flow: Dataflow, program: RankProgram, phase: int, path: str, errors: list[str]) -> None:
    """Simulate ``program``'s round body of phase ``phase`` (at ``path``), recording problems."""
    _Body(plan, flow, program, phase, path, errors).run(program.phases[phase])
