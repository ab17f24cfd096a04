"""Placement, per-stage partition and multi-rank emission: every emitted plan passes the plan
validator (body simulation, send/recv matching, all-reduce groups, deadlock replay), one rank
gets exactly the single-rank program, and pipeline stages follow 1F1B on their own subgraphs."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import pytest
import torch.fx

from muxtune.compiler.passes import partition, policy_from_name, trace_model
from muxtune.compiler.passes.emit import emit_programs, one_f_one_b, single_rank_program
from muxtune.compiler.passes.placement import MeshPosition, first_layers, placement, position_of, rank_of
from muxtune.plans import (
    Alignment,
    AllReduce,
    Backward,
    Forward,
    HTask,
    JobSummary,
    LoadBatches,
    OptimizerStep,
    Partition,
    Phase,
    Placement,
    Plan,
    PlanError,
    Predictions,
    RankProgram,
    Recv,
    Send,
    TaskPlan,
    compute_fingerprint,
    validate_plan,
)
from muxtune.runtime.execution import per_layers, per_stage, stage_of_layer
from muxtune.runtime.execution.plan_partition import plan_partition
from muxtune.runtime.model_sources import tiny_llama_hf_config
from muxtune.runtime.models import BackboneConfig
from muxtune.specs import DataSpec, LoraSpec, ScheduleSpec

NUM_LAYERS = 4
CONFIG = BackboneConfig.from_hf_dict({**tiny_llama_hf_config(96), "num_hidden_layers": NUM_LAYERS})
"""builtin:tiny-llama's architecture with 4 decoder layers (the builtin has 2), so 4 stages fit."""

MESHES = [(1, 1, 1), (2, 1, 1), (4, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 2, 2)]
"""(pipeline, tensor, data) parallel degrees."""


def make_task(name: str, steps: int, r: int = 4) -> TaskPlan:
    return TaskPlan(
        name=name,
        peft=LoraSpec(r=r, alpha=8, target_modules=("q_proj", "v_proj")),
        data=DataSpec(path=f"/data/{name}.jsonl", format="prompt_completion"),
        max_seq_len=128,
        lr=2e-4,
        schedule=ScheduleSpec(name="cosine", warmup_steps=1),
        steps=steps,
        save_every=2,
        num_examples=50,
        num_targetless_examples=0,
        num_tokens=2000,
    )


TASKS = (make_task("a", 5), make_task("b", 3, r=8), make_task("c", 3), make_task("d", 2))


def make_phases(num_htasks: int, microbatches: Sequence[int] = (3, 2, 4)) -> tuple[Phase, ...]:
    """One phase per distinct step count; a phase's tasks dealt round-robin into at most
    ``num_htasks`` hTasks, hTask i with ``microbatches[i]`` micro-batches (256-token budgets)."""
    phases = []
    first = 1
    for last in sorted({t.steps for t in TASKS}):
        names = tuple(t.name for t in TASKS if t.steps >= last)
        groups = [names[i::num_htasks] for i in range(min(num_htasks, len(names)))]
        htasks = tuple(HTask(i, g, 256 * len(g), (256,) * len(g), microbatches[i]) for i, g in enumerate(groups))
        phases.append(Phase(len(phases), first, last - first + 1, names, htasks))
        first = last + 1
    return tuple(phases)


@pytest.fixture(scope="module")
def traced() -> torch.fx.GraphModule:
    return trace_model(CONFIG, {t.name: t.peft for t in TASKS}, head=False)


def even_split(num_stages: int) -> list[int]:
    return [NUM_LAYERS // num_stages] * num_stages


def staged_partition(traced: torch.fx.GraphModule, mesh: Placement, block: int = 1) -> Partition:
    starts = first_layers(mesh)
    return plan_partition(partition(traced, per_stage(starts, block)), stage_of=stage_of_layer(starts))


def build_plan(mesh: Placement, part: Partition, phases: tuple[Phase, ...]) -> Plan:
    """A full plan around the emitted programs, with its fingerprint."""
    backbone = CONFIG.to_dict()
    return Plan(
        job=JobSummary("builtin:tiny-llama", "fp32", "/runs/demo"),
        fingerprint=compute_fingerprint(backbone, TASKS, phases, part),
        backbone=backbone,
        placement=mesh,
        partition=part,
        tasks=TASKS,
        alignment=Alignment(chunk_size=64),
        phases=phases,
        programs=emit_programs(TASKS, phases, part, mesh),
        predictions=Predictions(num_rounds=phases[-1].last_round, tokens_per_round=4096),
    )


@pytest.mark.parametrize("num_htasks", [1, 2, 3])
@pytest.mark.parametrize(("pp", "tp", "dp"), MESHES)
def test_emitted_programs_validate(traced: torch.fx.GraphModule, pp: int, tp: int, dp: int, num_htasks: int) -> None:
    mesh = placement("cpu", NUM_LAYERS, even_split(pp), tp, dp)
    part = staged_partition(traced, mesh)
    plan = build_plan(mesh, part, make_phases(num_htasks))
    assert validate_plan(plan) == plan
    assert len(plan.programs) == pp * tp * dp
    for program in plan.programs:
        assert program.device == "cpu" and program.stage == position_of(mesh, program.rank).stage
        for body, phase in zip(program.phases, plan.phases):
            loads = [i.htask for i in body if isinstance(i, LoadBatches)]
            assert loads == [h.id for h in phase.htasks], "every hTask loaded once, in the phase's order"
            assert isinstance(body[-1], OptimizerStep) or isinstance(body[-2], OptimizerStep)
            assert all(getattr(i, "stream", 0) == 0 for i in body)


@pytest.mark.parametrize("stage_layers", [(1, 3), (3, 1), (1, 2, 1)])
def test_uneven_stages_validate(traced: torch.fx.GraphModule, stage_layers: tuple[int, ...]) -> None:
    mesh = placement("cuda", NUM_LAYERS, stage_layers, 1, 2)
    validate_plan(build_plan(mesh, staged_partition(traced, mesh, block=2), make_phases(2, (1, 5))))


@pytest.mark.parametrize("policy", [per_layers(1), per_layers(1024), per_stage((0,), 2)])
def test_one_rank_is_the_single_rank_program(traced: torch.fx.GraphModule, policy: object) -> None:
    part = plan_partition(partition(traced, policy))  # type: ignore[arg-type]
    for num_htasks in (1, 3):
        phases = make_phases(num_htasks)
        mesh = placement("cuda", NUM_LAYERS, (NUM_LAYERS,), 1, 1)
        assert emit_programs(TASKS, phases, part, mesh) == (single_rank_program(TASKS, phases, part, "cuda"),)


def test_single_rank_body_order(traced: torch.fx.GraphModule) -> None:
    """Load an hTask, then per micro-batch every forward, the loss, every backward reversed, free."""
    part = plan_partition(partition(traced, per_layers(1024)))
    phases = make_phases(2, (2, 1))
    body = single_rank_program(TASKS, phases, part, "cpu").phases[0]
    ops = [type(i).__name__ for i in body]
    n = len(part.subgraphs)
    one = ["Forward"] * n + ["LossBackward"] + ["Backward"] * n + ["Free"]
    assert ops == ["LoadBatches", *one, *one, "LoadBatches", *one, "OptimizerStep", "Checkpoint"]


@pytest.mark.parametrize(("num_microbatches", "num_stages"), [(1, 1), (5, 1), (6, 2), (7, 4), (2, 4), (1, 4)])
def test_one_f_one_b(num_microbatches: int, num_stages: int) -> None:
    for stage in range(num_stages):
        steps = one_f_one_b(num_microbatches, num_stages, stage)
        warmup = min(num_stages - stage - 1, num_microbatches)
        assert steps[:warmup] == tuple(("forward", i) for i in range(warmup))
        assert sorted(steps) == sorted((k, i) for k in ("forward", "backward") for i in range(num_microbatches))
        in_flight = peak = 0
        for kind, i in steps:
            in_flight += 1 if kind == "forward" else -1
            peak = max(peak, in_flight)
            if kind == "backward":
                assert ("forward", i) in steps[: steps.index((kind, i))]
        assert peak == min(warmup + 1, num_microbatches)


@pytest.mark.parametrize(("pp", "microbatches"), [(2, (3, 2)), (4, (3, 2)), (4, (1, 1)), (4, (1,))])
def test_warmup_counts(traced: torch.fx.GraphModule, pp: int, microbatches: tuple[int, ...]) -> None:
    mesh = placement("cpu", NUM_LAYERS, even_split(pp), 1, 1)
    part = staged_partition(traced, mesh)
    phases = make_phases(len(microbatches), microbatches)
    plan = validate_plan(build_plan(mesh, part, phases))
    for program in plan.programs:
        body = program.phases[0]
        first = min(s.id for s in part.subgraphs if s.stage == program.stage)
        total = sum(h.num_microbatches for h in phases[0].htasks)
        first_backward = next(i for i, ins in enumerate(body) if isinstance(ins, Backward))
        forwards = [ins for ins in body[:first_backward] if isinstance(ins, Forward) and ins.subgraph == first]
        assert len(forwards) == min(pp - program.stage - 1, total - 1) + 1, "warm-up forwards, then one more"


@pytest.mark.parametrize(("pp", "tp", "dp"), MESHES)
def test_ranks_run_their_stage_and_pair_with_their_peers(
    traced: torch.fx.GraphModule, pp: int, tp: int, dp: int
) -> None:
    mesh = placement("cpu", NUM_LAYERS, even_split(pp), tp, dp)
    part = staged_partition(traced, mesh)
    plan = build_plan(mesh, part, make_phases(2))
    for program in plan.programs:
        own = {s.id for s in part.subgraphs if s.stage == program.stage}
        where = position_of(mesh, program.rank)
        for body, phase in zip(program.phases, plan.phases):
            assert {i.subgraph for i in body if isinstance(i, Forward)} == own
            assert {i.subgraph for i in body if isinstance(i, Backward)} == own
            for ins in body:
                if isinstance(ins, (Send, Recv)):
                    peer = position_of(mesh, ins.peer)
                    assert (peer.tp_index, peer.replica) == (where.tp_index, where.replica)
                    assert abs(peer.stage - where.stage) == 1
                    assert part.subgraphs[ins.subgraph].stage == min(peer.stage, where.stage)
                    assert ins.subgraph == max(s.id for s in part.subgraphs if s.stage == min(peer.stage, where.stage))
            reduces = [i for i in body if isinstance(i, AllReduce)]
            group = tuple(rank_of(mesh, MeshPosition(where.stage, where.tp_index, r)) for r in range(dp))
            assert reduces == ([AllReduce(phase.tasks, group)] if dp > 1 else [])
    for stage in mesh.stages:
        bodies = {}
        for rank in stage.ranks:
            body = plan.programs[rank].phases
            no_peers = tuple(tuple(_without_peer(i) for i in b) for b in body)
            bodies.setdefault(position_of(mesh, rank).replica, set()).add(no_peers)
        assert all(len(same) == 1 for same in bodies.values()), "a stage's tensor-parallel shards run one body"


def _without_peer(instruction: object) -> object:
    if isinstance(instruction, (Send, Recv)):
        return dataclasses.replace(instruction, peer=-1)
    if isinstance(instruction, AllReduce):
        return dataclasses.replace(instruction, group=())
    return instruction


def test_validator_refuses_a_deadlocked_or_unmatched_emission(traced: torch.fx.GraphModule) -> None:
    """The checks above mean something: a recv moved before the send it waits for deadlocks,
    and a replica that skips its all-reduce is refused."""
    mesh = placement("cpu", NUM_LAYERS, (2, 2), 1, 1)
    plan = build_plan(mesh, staged_partition(traced, mesh), make_phases(1))
    body = list(plan.programs[0].phases[0])
    recv = next(i for i, ins in enumerate(body) if isinstance(ins, Recv))
    send = next(i for i, ins in enumerate(body) if isinstance(ins, Send))
    body.insert(send, body.pop(recv))
    with pytest.raises(PlanError, match="deadlock"):
        validate_plan(_with_body(plan, 0, tuple(body)))
    mesh = placement("cpu", NUM_LAYERS, (2, 2), 1, 2)
    plan = build_plan(mesh, staged_partition(traced, mesh), make_phases(1))
    skipped = tuple(ins for ins in plan.programs[1].phases[0] if not isinstance(ins, AllReduce))
    with pytest.raises(PlanError, match="all-reduces"):
        validate_plan(_with_body(plan, 1, skipped))


def _reduce_per_htask(body: Sequence[object], phase: Phase, early: bool) -> tuple[object, ...]:
    """The body with its all-reduce split per hTask: each right after that hTask's own
    instructions (``early``, no longer 1F1B), or all where the one was."""
    at, reduce = next((i, ins) for i, ins in enumerate(body) if isinstance(ins, AllReduce))
    split = [AllReduce(tuple(t for t in reduce.tasks if t in h.tasks), reduce.group) for h in phase.htasks]
    if not early:
        return (*body[:at], *split, *body[at + 1 :])
    assert all(hasattr(ins, "htask") for ins in body[:at])
    ordered = [ins for h, r in zip(phase.htasks, split) for ins in [*(i for i in body[:at] if i.htask == h.id), r]]
    return (*ordered, *body[at + 1 :])


def test_deadlock_at_an_all_reduce_names_it(traced: torch.fx.GraphModule) -> None:
    """Replicas that all-reduce hTask 0's tasks at different points wait on each other in a
    cycle through both pipelines; the message names the stuck all-reduce."""
    mesh = placement("cpu", NUM_LAYERS, (2, 2), 1, 2)
    phases = make_phases(2, (1, 1))
    plan = build_plan(mesh, staged_partition(traced, mesh), phases)
    for rank in range(4):
        early = rank in (0, 3)
        plan = _with_body(plan, rank, _reduce_per_htask(plan.programs[rank].phases[0], phases[0], early))
    with pytest.raises(PlanError) as refused:
        validate_plan(plan)
    stuck = [e for e in refused.value.errors if "waits forever" in e]
    assert any(
        re.match(
            r"programs\[0\]\.phases\[0\]\[\d+\]: all_reduce of tasks \['a', 'c'\] over ranks 0, 2 waits forever "
            r"\(deadlock: rank 2 is itself blocked at programs\[2\]",
            e,
        )
        for e in stuck
    ), stuck


def _with_body(plan: Plan, rank: int, body: tuple[object, ...]) -> Plan:
    program: RankProgram = plan.programs[rank]
    changed = dataclasses.replace(program, phases=(body, *program.phases[1:]))  # type: ignore[arg-type]
    return dataclasses.replace(plan, programs=(*plan.programs[:rank], changed, *plan.programs[rank + 1 :]))


def test_placement_numbering() -> None:
    mesh = placement("h100", 6, (2, 3, 1), 2, 2)
    assert (mesh.num_ranks, mesh.num_devices) == (12, 12)
    assert [(s.first_layer, s.last_layer) for s in mesh.stages] == [(0, 1), (2, 4), (5, 5)]
    assert [s.ranks for s in mesh.stages] == [(0, 1, 6, 7), (2, 3, 8, 9), (4, 5, 10, 11)]
    for rank in range(12):
        where = position_of(mesh, rank)
        assert rank == where.tp_index + 2 * (where.stage + 3 * where.replica) == rank_of(mesh, where)
        assert rank in mesh.stages[where.stage].ranks
    assert first_layers(mesh) == (0, 2, 5)
    for bad in [(6,), (2, 3, 0), ()]:
        with pytest.raises(ValueError):
            placement("cpu", 5, bad, 1, 1)
    with pytest.raises(ValueError, match="tensor_parallel"):
        placement("cpu", 2, (1, 1), 0, 1)


@pytest.mark.parametrize(
    ("starts", "block"), [((0,), 1), ((0,), 3), ((0, 2), 1), ((0, 1), 2), ((0, 3), 2), ((0, 1, 2, 3), 4)]
)
def test_per_stage_never_crosses_a_stage(traced: torch.fx.GraphModule, starts: tuple[int, ...], block: int) -> None:
    policy = per_stage(starts, block)
    description = partition(traced, policy)
    stage_of = stage_of_layer(starts)
    assert description.policy == policy.__name__ == f"per_stage({','.join(map(str, starts))};{block})"
    assert policy_from_name(description.policy).__name__ == description.policy
    assert partition(traced, policy_from_name(description.policy)) == description
    for sub in description.subgraphs:
        first, last = sub.layers
        assert stage_of(first) == stage_of(last)
        if 0 <= first and last < NUM_LAYERS:
            assert last - first < block
    assert description.subgraphs[0].layers == (-1, -1)
    assert description.subgraphs[-1].layers == (NUM_LAYERS, NUM_LAYERS)
    part = plan_partition(description, stage_of=stage_of)
    assert [s.stage for s in part.subgraphs] == [stage_of(s.first_layer) for s in part.subgraphs]
    assert part.subgraphs[0].stage == 0 and part.subgraphs[-1].stage == len(starts) - 1
    one_stage = partition(traced, per_layers(block))
    if len(starts) == 1:
        assert dataclasses.replace(description, policy=one_stage.policy) == one_stage


def test_per_stage_refusals(traced: torch.fx.GraphModule) -> None:
    for starts, block in [((), 1), ((1, 2), 1), ((0, 2, 2), 1), ((0,), 0), ((0, True), 1)]:
        with pytest.raises(ValueError):
            per_stage(starts, block)
    with pytest.raises(ValueError, match="beyond"):
        partition(traced, per_stage((0, NUM_LAYERS), 1))
    with pytest.raises(ValueError, match="crosses from stage 0 to stage 1"):
        plan_partition(partition(traced, per_layers(4)), stage_of=stage_of_layer((0, 2)))
    with pytest.raises(ValueError, match="unknown partition policy"):
        policy_from_name("per_stage(0,2)")
    assert plan_partition(partition(traced, per_layers(2))).subgraphs[-1].stage == 0


def test_emit_refuses_a_partition_that_misses_a_stage(traced: torch.fx.GraphModule) -> None:
    mesh = placement("cpu", NUM_LAYERS, (2, 2), 1, 1)
    one_stage = plan_partition(partition(traced, per_layers(1)))
    with pytest.raises(ValueError, match="hold no subgraph"):
        emit_programs(TASKS, make_phases(1), one_stage, mesh)
