"""Checks of the rank programs of a plan whose other parts are valid: one program per rank on
its stage, every instruction in a section that can run it and referring to things that exist,
the prologue's setup, then each round body simulated (`body_checks`) and the programs checked
against each other (`exchange_checks`)."""

from __future__ import annotations

from muxtune.common.text import quote
from muxtune.specs.checks import add_error, at, join

from .body_checks import check_body
from .check_text import listing, unknown_task
from .dataflow import Dataflow
from .exchange_checks import check_exchanges
from .instructions import (
    MICROBATCH_OPS,
    AllReduce,
    BuildTasks,
    Checkpoint,
    ExportAdapters,
    Instruction,
    LoadBackbone,
    LoadBatches,
    OptimizerStep,
    Recv,
    Send,
)
from .schema import Phase, Plan, RankProgram, TaskPlan

_ONLY_IN: dict[type, str] = {LoadBackbone: "prologue", BuildTasks: "prologue", ExportAdapters: "epilogue"}
_SECTION_WORDS = {"prologue": "the prologue", "phases": "a phase body", "epilogue": "the epilogue"}


def _check_section(instruction: Instruction, section: str, where: str, errors: list[str]) -> bool:
    """Each opcode only in the sections that can run it; False (error recorded) elsewhere."""
    allowed = _ONLY_IN.get(type(instruction), "phases")
    if section == allowed:
        return True
    add_error(
        errors,
        where,
        f"{instruction.op.value} cannot run in {_SECTION_WORDS[section]} (only in {_SECTION_WORDS[allowed]})",
    )
    return False


def _check_payload(
    instruction: Instruction,
    where: str,
    plan: Plan,
    phase: Phase,
    rank: int,
    tasks: dict[str, TaskPlan],
    errors: list[str],
) -> None:
    """The hTask, micro-batch, subgraph, peer, group, tasks and rounds an instruction of a round
    body names exist (in this phase)."""
    if isinstance(instruction, (LoadBatches, *MICROBATCH_OPS)):
        h = instruction.htask
        if h >= phase.num_instances:
            rounds = f" over {phase.rounds_per_body} rounds" if phase.rounds_per_body > 1 else ""
            add_error(
                errors, join(where, "htask"), f"no hTask {h} (phase {phase.id} has {phase.num_instances}{rounds})"
            )
        elif (
            not isinstance(instruction, LoadBatches)
            and instruction.microbatch >= phase.htask_of_instance(h).num_microbatches
        ):
            count = phase.htask_of_instance(h).num_microbatches
            add_error(
                errors,
                join(where, "microbatch"),
                f"no micro-batch {instruction.microbatch} (hTask {h} of phase {phase.id} has {count})",
            )
    subgraph = getattr(instruction, "subgraph", None)
    num_subgraphs = len(plan.partition.subgraphs)
    if subgraph is not None and subgraph >= num_subgraphs:
        add_error(errors, join(where, "subgraph"), f"no subgraph {subgraph} (the partition has {num_subgraphs})")
    num_ranks = plan.placement.num_ranks
    if isinstance(instruction, (Send, Recv)):
        if instruction.peer >= num_ranks:
            add_error(errors, join(where, "peer"), f"no rank {instruction.peer} (the placement has {num_ranks})")
        elif instruction.peer == rank:
            add_error(errors, join(where, "peer"), f"must be another rank, got {rank} (this program's rank)")
    if isinstance(instruction, AllReduce):
        absent = [r for r in instruction.group if r >= num_ranks]
        if absent:
            add_error(errors, join(where, "group"), f"no rank(s) {listing(absent)} (the placement has {num_ranks})")
        if rank not in instruction.group:
            add_error(
                errors,
                join(where, "group"),
                f"must include this program's rank {rank}, got {quote(list(instruction.group))}",
            )
    if isinstance(instruction, (AllReduce, OptimizerStep)):
        for name in instruction.tasks:
            if name not in tasks:
                add_error(errors, join(where, "tasks"), unknown_task(name, tasks))
            elif name not in phase.tasks:
                add_error(errors, join(where, "tasks"), f"task {quote(name)} is not active in phase {phase.id}")
    if isinstance(instruction, Checkpoint):
        rounds = instruction.rounds
        outside = [r for r in rounds if not phase.first_round <= r <= phase.last_round]
        if outside:
            add_error(
                errors,
                join(where, "rounds"),
                f"round(s) {listing(outside)} lie outside phase {phase.id} "
                f"(rounds {phase.first_round}..{phase.last_round})",
            )
        elif list(rounds) != sorted(rounds):
            add_error(errors, join(where, "rounds"), f"must be strictly increasing, got {quote(list(rounds))}")
        else:
            inside = [r for r in rounds if not phase.ends_body(r)]
            if inside:
                add_error(
                    errors,
                    join(where, "rounds"),
                    f"round(s) {listing(inside)} end no round body (phase {phase.id} runs "
                    f"{phase.rounds_per_body} rounds per body from round {phase.first_round})",
                )


def _check_program(plan: Plan, program: RankProgram, index: int, tasks: dict[str, TaskPlan], errors: list[str]) -> None:
    path = at("programs", index)
    stages = plan.placement.stages
    if program.rank != index:
        add_error(errors, join(path, "rank"), f"must be {index} (programs are listed by rank), got {program.rank}")
    if program.stage >= len(stages):
        add_error(errors, join(path, "stage"), f"no stage {program.stage} (the placement has {len(stages)})")
    elif index not in stages[program.stage].ranks:
        ranks = listing(stages[program.stage].ranks)
        add_error(errors, join(path, "stage"), f"stage {program.stage} does not hold rank {index} (its ranks: {ranks})")
    if len(program.phases) != len(plan.phases):
        add_error(
            errors,
            join(path, "phases"),
            f"must hold one round body per phase (the plan has {len(plan.phases)}), got {len(program.phases)}",
        )
    sections = [("prologue", join(path, "prologue"), program.prologue, None)]
    for p, body in enumerate(program.phases):
        sections.append(("phases", at(join(path, "phases"), p), body, plan.phases[p] if p < len(plan.phases) else None))
    sections.append(("epilogue", join(path, "epilogue"), program.epilogue, None))
    for section, where, instructions, phase in sections:
        for i, instruction in enumerate(instructions):
            item = at(where, i)
            if not _check_section(instruction, section, item, errors):
                continue
            if isinstance(instruction, BuildTasks):
                for name in instruction.tasks:
                    if name not in tasks:
                        add_error(errors, join(item, "tasks"), unknown_task(name, tasks))
            elif phase is not None:
                _check_payload(instruction, item, plan, phase, index, tasks, errors)


def _check_prologue(plan: Plan, program: RankProgram, path: str, errors: list[str]) -> None:
    """The prologue loads this rank's stage of the backbone first and once, then builds every
    task exactly once."""
    where = join(path, "prologue")
    prologue = program.prologue
    loads = [i for i, instruction in enumerate(prologue) if isinstance(instruction, LoadBackbone)]
    if not loads:
        add_error(errors, where, "must load the backbone (load_backbone) before anything else")
    elif loads[0] != 0 or len(loads) > 1:
        add_error(errors, where, "must start with the one load_backbone and hold no other")
    elif prologue[0].stage != program.stage:
        add_error(
            errors,
            join(at(where, 0), "stage"),
            f"must be {program.stage} (this program's stage), got {prologue[0].stage}",
        )
    built: dict[str, int] = {}
    for i, instruction in enumerate(prologue):
        if not isinstance(instruction, BuildTasks):
            continue
        for name in instruction.tasks:
            if name in built:
                add_error(
                    errors, at(where, i), f"builds task {quote(name)} again (already built by prologue[{built[name]}])"
                )
            built[name] = i
    missing = [t.name for t in plan.tasks if t.name not in built]
    if missing:
        add_error(errors, where, f"never builds task(s) {listing(missing)}")


def check_programs(plan: Plan, tasks: dict[str, TaskPlan], errors: list[str]) -> None:
    """A plan that loads always runs: see the module docstring. The bodies are simulated only
    when every reference is sound, and the ranks replayed together only when nothing else is
    wrong (their findings would repeat earlier ones as consequences)."""
    num_ranks = plan.placement.num_ranks
    if len(plan.programs) != num_ranks:
        add_error(
            errors,
            "programs",
            f"must hold one program per rank (placement.num_ranks = {num_ranks}), got {len(plan.programs)}",
        )
    for index, program in enumerate(plan.programs):
        _check_program(plan, program, index, tasks, errors)
    if errors:
        return
    flow = Dataflow.of(plan.partition)
    for index, program in enumerate(plan.programs):
        path = at("programs", index)
        _check_prologue(plan, program, path, errors)
        for p in range(len(program.phases)):
            check_body(plan, flow, program, p, at(join(path, "phases"), p), errors)
    check_exchanges(plan, errors, replay=not errors)
