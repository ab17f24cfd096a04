"""Cross-reference checks of a plan whose fields have been read (some may be `INVALID`)."""

from __future__ import annotations

from typing import Any

from muxtune.common.text import quote
from muxtune.specs.checks import INVALID, add_error, at, did_you_mean, join

from .instructions import (
    BuildTasks,
    Checkpoint,
    ExportAdapters,
    ForwardBackward,
    LoadBackbone,
    OptimizerStep,
)
from .schema import HTask, Plan, RankProgram, TaskPlan

_SECTIONS = ("prologue", "round", "epilogue")
_ALLOWED_SECTIONS: dict[type, tuple[str, ...]] = {
    LoadBackbone: ("prologue",),
    BuildTasks: ("prologue",),
    ForwardBackward: ("round",),
    OptimizerStep: ("round",),
    Checkpoint: ("round", "epilogue"),
    ExportAdapters: ("epilogue",),
}


def _unknown_task(name: str, tasks: dict[str, TaskPlan]) -> str:
    return f"unknown task {quote(name)}{did_you_mean(name, list(tasks))}"


def _check_budgets(htask: HTask, path: str, chunk: Any, errors: list[str]) -> None:
    """One budget per task, each a multiple of the chunk size, summing to micro_batch_tokens."""
    budgets, total = htask.token_budgets, htask.micro_batch_tokens
    if budgets is INVALID or htask.tasks is INVALID:
        return
    where = join(path, "token_budgets")
    if len(budgets) != len(htask.tasks):
        add_error(errors, where, f"must hold one budget per task ({len(htask.tasks)}), got {len(budgets)}")
        return
    if chunk is not INVALID:
        for i, budget in enumerate(budgets):
            if budget % chunk:
                add_error(
                    errors,
                    at(where, i),
                    f"must be a multiple of alignment.chunk_size ({chunk}), got {budget}",
                )
    if total is not INVALID and total != sum(budgets):
        add_error(
            errors,
            join(path, "micro_batch_tokens"),
            f"must be the sum of token_budgets ({sum(budgets)}), got {total}",
        )


def check_htasks(plan: Plan, tasks: dict[str, TaskPlan], errors: list[str]) -> None:
    """Ids are positions, every task is in exactly one hTask, budgets are consistent."""
    owner: dict[str, int] = {}
    chunk = plan.alignment.chunk_size
    for index, htask in enumerate(plan.htasks):
        path = at("htasks", index)
        if htask.id is not INVALID and htask.id != index:
            add_error(
                errors,
                join(path, "id"),
                f"must be {index} (an hTask's id is its position), got {htask.id}",
            )
        members = () if htask.tasks is INVALID else htask.tasks
        for j, name in enumerate(members):
            where = at(join(path, "tasks"), j)
            if name not in tasks:
                add_error(errors, where, _unknown_task(name, tasks))
            elif name in owner:
                add_error(errors, where, f"task {quote(name)} is already in htasks[{owner[name]}]")
            else:
                owner[name] = index
        _check_budgets(htask, path, chunk, errors)
    for name in tasks:
        if name not in owner:
            add_error(errors, "htasks", f"task {quote(name)} is in no hTask")


def check_programs(plan: Plan, tasks: dict[str, TaskPlan], errors: list[str]) -> None:
    """One program per rank in rank order, non-empty rounds, instruction references exist."""
    num_ranks = plan.cluster.num_ranks
    if num_ranks is not INVALID and len(plan.programs) != num_ranks:
        add_error(
            errors,
            "programs",
            f"must hold one program per rank (cluster.num_ranks = {num_ranks}), got {len(plan.programs)}",
        )
    num_htasks = len(plan.htasks)
    for index, program in enumerate(plan.programs):
        path = at("programs", index)
        if program.rank is not INVALID and program.rank != index:
            add_error(
                errors,
                join(path, "rank"),
                f"must be {index} (programs are listed by rank), got {program.rank}",
            )
        if program.round is not INVALID and not program.round:
            add_error(errors, join(path, "round"), "must hold at least one instruction")
        for section in _SECTIONS:
            instructions = getattr(program, section)
            for i, instruction in enumerate(() if instructions is INVALID else instructions):
                if instruction is INVALID:
                    continue
                where = at(join(path, section), i)
                htask = getattr(instruction, "htask", None)
                if htask is not None and not 0 <= htask < num_htasks:
                    add_error(errors, join(where, "htask"), f"no hTask {htask} (the plan has {num_htasks})")
                for name in getattr(instruction, "tasks", ()):
                    if name not in tasks:
                        add_error(errors, join(where, "tasks"), _unknown_task(name, tasks))


def _check_section_ops(program: RankProgram, path: str, errors: list[str]) -> None:
    """Each opcode only in the sections that can run it."""
    for section in _SECTIONS:
        for i, instruction in enumerate(getattr(program, section)):
            allowed = _ALLOWED_SECTIONS[type(instruction)]
            if section not in allowed:
                add_error(
                    errors,
                    at(join(path, section), i),
                    f"{instruction.op.value} cannot run in the {section} (only in: {', '.join(allowed)})",
                )


def _check_setup(program: RankProgram, path: str, names: list[str], errors: list[str]) -> None:
    """The prologue loads the backbone once, first, then builds every task exactly once."""
    prologue = program.prologue
    loads = [i for i, instruction in enumerate(prologue) if isinstance(instruction, LoadBackbone)]
    if not loads:
        add_error(errors, join(path, "prologue"), "must load the backbone (load_backbone) before anything else")
    elif loads[0] != 0 or len(loads) > 1:
        add_error(errors, join(path, "prologue"), "must start with the one load_backbone and hold no other")
    built: dict[str, int] = {}
    for i, instruction in enumerate(prologue):
        if not isinstance(instruction, BuildTasks):
            continue
        for name in instruction.tasks:
            if name in built:
                add_error(
                    errors,
                    at(join(path, "prologue"), i),
                    f"builds task {quote(name)} again (already built by prologue[{built[name]}])",
                )
            built[name] = i
    missing = [name for name in names if name not in built]
    if missing:
        add_error(errors, join(path, "prologue"), f"never builds task(s) {_names(missing)}")


def _check_round(plan: Plan, program: RankProgram, path: str, names: list[str], errors: list[str]) -> None:
    """Every task is passed forward once and stepped once per round, the pass first."""
    forwarded: dict[str, int] = {}
    stepped: dict[str, int] = {}
    where = join(path, "round")
    for i, instruction in enumerate(program.round):
        if isinstance(instruction, ForwardBackward):
            for name in plan.htasks[instruction.htask].tasks:
                if name in forwarded:
                    add_error(errors, at(where, i), f"passes task {quote(name)} forward twice in one round")
                forwarded[name] = i
        elif isinstance(instruction, OptimizerStep):
            for name in instruction.tasks:
                if name in stepped:
                    add_error(errors, at(where, i), f"steps task {quote(name)} twice in one round")
                elif name in forwarded:
                    stepped[name] = i
                else:
                    add_error(
                        errors,
                        at(where, i),
                        f"steps task {quote(name)} before its forward_backward in the round",
                    )
                    stepped[name] = i
    never_forward = [name for name in names if name not in forwarded]
    if never_forward:
        add_error(errors, where, f"has no forward_backward for task(s) {_names(never_forward)}")
    never_stepped = [name for name in names if name not in stepped]
    if never_stepped:
        add_error(
            errors,
            where,
            f"has no optimizer_step for task(s) {_names(never_stepped)}; they would never finish",
        )


def _names(names: list[str]) -> str:
    return ", ".join(quote(name) for name in names)


def check_program_structure(plan: Plan, errors: list[str]) -> None:
    """A plan that loads always runs: per rank, the backbone is loaded first and once, every task
    is built once after it, and each round passes every task forward and then steps it once
    (a round without them would never end, or step a task without a batch)."""
    names = [t.name for t in plan.tasks]
    for index, program in enumerate(plan.programs):
        path = at("programs", index)
        _check_section_ops(program, path, errors)
        _check_setup(program, path, names, errors)
        _check_round(plan, program, path, names, errors)


def check_references(plan: Plan, errors: list[str]) -> None:
    """All cross-reference checks; the liveness check runs only on an otherwise valid plan."""
    tasks = {t.name: t for t in plan.tasks if isinstance(t.name, str)}
    check_htasks(plan, tasks, errors)
    check_programs(plan, tasks, errors)
    if not errors:
        check_program_structure(plan, errors)
