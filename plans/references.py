"""Cross-reference and structure checks of a plan whose fields have been read (any field may be
`INVALID`, its error already recorded): placement, partition, tasks and phases here; the rank
programs in `program_checks`, which run only on an otherwise valid plan."""

from __future__ import annotations

from typing import Any

from muxtune.common.text import quote
from muxtune.specs.checks import INVALID, add_error, at, join

from .check_text import missing_numbers, unknown_task
from .program_checks import check_programs
from .schema import HTask, Partition, Phase, Placement, Plan, Subgraph, TaskPlan

MAX_CROSSINGS = 10_000_000
"""Most (value, cut) pairs a partition may have: each is a buffer a pipeline send may carry."""


def _valid(*values: Any) -> bool:
    return all(value is not INVALID for value in values)


def _num_layers(backbone: Any, errors: list[str]) -> int | None:
    """``backbone.num_layers``, the decoder layer count the placement and partition refer to."""
    if not isinstance(backbone, dict):
        return None
    value = backbone.get("num_layers", INVALID)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    got = "it is missing" if value is INVALID else f"got {quote(value)}"
    add_error(errors, "backbone.num_layers", f"must be a positive integer (the decoder layer count), {got}")
    return None


def check_placement(placement: Placement, num_layers: int | None, errors: list[str]) -> None:
    """The mesh multiplies out, stage ids are positions, stages hold consecutive layers in order
    and their ranks are disjoint and together are every rank."""
    p = placement
    degrees = (p.pipeline_parallel, p.tensor_parallel, p.data_parallel)
    if _valid(p.num_ranks, *degrees) and p.num_ranks != p.pipeline_parallel * p.tensor_parallel * p.data_parallel:
        product = p.pipeline_parallel * p.tensor_parallel * p.data_parallel
        add_error(
            errors,
            "placement.num_ranks",
            f"must be pipeline_parallel x tensor_parallel x data_parallel ({' x '.join(map(str, degrees))} = "
            f"{product}), got {p.num_ranks}",
        )
    if p.stages is INVALID:
        return
    if _valid(p.pipeline_parallel) and len(p.stages) != p.pipeline_parallel:
        add_error(
            errors,
            "placement.stages",
            f"must hold one stage per pipeline stage (pipeline_parallel = {p.pipeline_parallel}), got {len(p.stages)}",
        )
    owner: dict[int, int] = {}
    per_stage = p.tensor_parallel * p.data_parallel if _valid(p.tensor_parallel, p.data_parallel) else None
    next_layer: int | None = 0
    for index, stage in enumerate(p.stages):
        path = at("placement.stages", index)
        if _valid(stage.id) and stage.id != index:
            add_error(errors, join(path, "id"), f"must be {index} (a stage's id is its position), got {stage.id}")
        if _valid(stage.ranks):
            if per_stage is not None and len(stage.ranks) != per_stage:
                add_error(
                    errors,
                    join(path, "ranks"),
                    f"must hold tensor_parallel x data_parallel = {per_stage} ranks, got {len(stage.ranks)}",
                )
            for j, rank in enumerate(stage.ranks):
                where = at(join(path, "ranks"), j)
                if _valid(p.num_ranks) and rank >= p.num_ranks:
                    add_error(errors, where, f"no rank {rank} (placement.num_ranks = {p.num_ranks})")
                elif rank in owner:
                    add_error(errors, where, f"rank {rank} is already in placement.stages[{owner[rank]}]")
                else:
                    owner[rank] = index
        if next_layer is None or not _valid(stage.first_layer, stage.last_layer):
            next_layer = None
            continue
        if stage.first_layer != next_layer:
            add_error(
                errors,
                join(path, "first_layer"),
                f"must be {next_layer} (stages hold consecutive layers, in order), got {stage.first_layer}",
            )
        if stage.last_layer < stage.first_layer:
            add_error(
                errors,
                join(path, "last_layer"),
                f"must be >= first_layer ({stage.first_layer}), got {stage.last_layer}",
            )
        next_layer = stage.last_layer + 1
    if next_layer is not None and num_layers is not None and next_layer != num_layers:
        add_error(
            errors,
            join(at("placement.stages", len(p.stages) - 1), "last_layer"),
            f"must be {num_layers - 1} (the last stage ends at the last layer, backbone.num_layers - 1), "
            f"got {next_layer - 1}",
        )
    if _valid(p.num_ranks) and all(_valid(s.ranks) for s in p.stages) and len(owner) < p.num_ranks:
        missing = missing_numbers(p.num_ranks, owner.__contains__, len(owner))
        add_error(errors, "placement.stages", f"rank(s) {missing} are in no stage")


def _layer_range(placement: Placement, stage: int, num_layers: int) -> tuple[int, int] | None:
    """Layers a subgraph of ``stage`` may cover: -1 (embeddings) on the first stage and
    ``num_layers`` (final norm and head) on the last one."""
    s = placement.stages[stage]
    if not _valid(s.first_layer, s.last_layer):
        return None
    low = -1 if stage == 0 else s.first_layer
    high = num_layers if stage == len(placement.stages) - 1 else s.last_layer
    return low, high


def _check_nodes(subgraph: Subgraph, path: str, owner: dict[str, int], index: int, errors: list[str]) -> None:
    """A subgraph's first and last nodes agree with its node count and belong to no other."""
    first, last, count = subgraph.first_node, subgraph.last_node, subgraph.num_nodes
    if _valid(first, last, count) and (first == last) != (count == 1):
        rule = "equal to first_node" if count == 1 else "another node than first_node"
        add_error(
            errors, join(path, "last_node"), f"must be {rule} for a subgraph of {count} node(s), got {quote(last)}"
        )
    for key, node in (("first_node", first), ("last_node", last)):
        if not _valid(node):
            continue
        if owner.get(node, index) != index:
            add_error(errors, join(path, key), f"node {quote(node)} is already in {_sub(owner[node])}")
        owner.setdefault(node, index)


def _check_layers(
    s: Subgraph, path: str, placement: Placement | None, num_layers: int | None, errors: list[str]
) -> None:
    """The subgraph's stage exists and its layers lie in that stage's."""
    if placement is None or not _valid(s.stage):
        return
    stages = placement.stages
    if s.stage >= len(stages):
        add_error(errors, join(path, "stage"), f"no stage {s.stage} (the placement has {len(stages)})")
        return
    if not _valid(s.first_layer, s.last_layer) or num_layers is None:
        return
    bounds = _layer_range(placement, s.stage, num_layers)
    if s.last_layer < s.first_layer:
        add_error(errors, join(path, "last_layer"), f"must be >= first_layer ({s.first_layer}), got {s.last_layer}")
    elif bounds is not None and not bounds[0] <= s.first_layer <= s.last_layer <= bounds[1]:
        add_error(
            errors,
            path,
            f"layers {s.first_layer}..{s.last_layer} lie outside stage {s.stage}'s {bounds[0]}..{bounds[1]}",
        )


def check_partition(
    partition: Partition, placement: Placement | None, num_layers: int | None, errors: list[str]
) -> None:
    """Subgraph ids are positions on existing stages, layer ranges lie in the stage and never go
    back, nodes belong to one subgraph, every value is produced once, every input is produced
    by an earlier subgraph or is a graph input, and a subgraph produces every graph output.
    Stages are checked only against a valid ``placement``."""
    if partition.subgraphs is INVALID:
        return
    num_errors = len(errors)
    producer: dict[str, int] = {}
    for index, subgraph in enumerate(partition.subgraphs):
        for name in subgraph.outputs if _valid(subgraph.outputs) else ():
            producer.setdefault(name, index)
    graph_inputs = set(partition.inputs) if _valid(partition.inputs) else None
    for j, value in enumerate(partition.inputs if _valid(partition.inputs) else ()):
        if value in producer:
            add_error(errors, at("partition.inputs", j), f"{quote(value)} is produced by {_sub(producer[value])}")
    for j, value in enumerate(partition.outputs if _valid(partition.outputs) else ()):
        if value not in producer:
            add_error(errors, at("partition.outputs", j), f"no subgraph produces {quote(value)}")
    node_owner: dict[str, int] = {}
    previous: tuple[Any, Any] = (INVALID, INVALID)
    for index, s in enumerate(partition.subgraphs):
        path = _sub(index)
        if _valid(s.id) and s.id != index:
            add_error(errors, join(path, "id"), f"must be {index} (a subgraph's id is its position), got {s.id}")
        _check_layers(s, path, placement, num_layers, errors)
        for key, value, before in (
            ("first_layer", s.first_layer, previous[0]),
            ("last_layer", s.last_layer, previous[1]),
        ):
            if _valid(value, before) and value < before:
                add_error(
                    errors,
                    join(path, key),
                    f"must be >= the previous subgraph's ({before}; subgraphs are in execution order), got {value}",
                )
        previous = (s.first_layer, s.last_layer)
        _check_nodes(s, path, node_owner, index, errors)
        for j, value in enumerate(s.outputs if _valid(s.outputs) else ()):
            if producer[value] != index:
                add_error(
                    errors,
                    at(join(path, "outputs"), j),
                    f"{quote(value)} is already produced by {_sub(producer[value])}",
                )
        for j, value in enumerate(s.inputs if _valid(s.inputs) else ()):
            made_by = producer.get(value)
            if made_by is not None and made_by >= index:
                by = "this subgraph itself" if made_by == index else f"{_sub(made_by)}, later,"
                add_error(errors, at(join(path, "inputs"), j), f"reads {quote(value)}, which {by} produces")
            elif made_by is None and graph_inputs is not None and value not in graph_inputs:
                add_error(
                    errors,
                    at(join(path, "inputs"), j),
                    f"reads {quote(value)}, which no subgraph produces and which is not in partition.inputs",
                )
    if len(errors) == num_errors and _valid(partition.outputs) and all(_valid(s.inputs) for s in partition.subgraphs):
        _check_crossings(partition, producer, errors)


def _check_crossings(partition: Partition, producer: dict[str, int], errors: list[str]) -> None:
    """The values crossing the cuts between subgraphs, counted once per cut, stay few enough to
    check a program against (a real partition has a few per cut)."""
    last_reader = {value: index for index, s in enumerate(partition.subgraphs) for value in s.inputs}
    last_reader.update((value, len(partition.subgraphs)) for value in partition.outputs)
    total = sum(last_reader.get(value, made_by) - made_by for value, made_by in producer.items())
    if total > MAX_CROSSINGS:
        add_error(
            errors,
            "partition",
            f"its values cross {total} cuts between subgraphs in all, more than the {MAX_CROSSINGS} a plan may hold",
        )


def _sub(index: int) -> str:
    return at("partition.subgraphs", index)


def _check_budgets(htask: HTask, path: str, chunk: Any, errors: list[str]) -> None:
    """One budget per task, each a multiple of the chunk size, summing to micro_batch_tokens."""
    budgets, total = htask.token_budgets, htask.micro_batch_tokens
    if not _valid(budgets, htask.tasks):
        return
    where = join(path, "token_budgets")
    if len(budgets) != len(htask.tasks):
        add_error(errors, where, f"must hold one budget per task ({len(htask.tasks)}), got {len(budgets)}")
        return
    if _valid(chunk):
        for i, budget in enumerate(budgets):
            if budget % chunk:
                add_error(errors, at(where, i), f"must be a multiple of alignment.chunk_size ({chunk}), got {budget}")
    if _valid(total) and total != sum(budgets):
        add_error(
            errors, join(path, "micro_batch_tokens"), f"must be the sum of token_budgets ({sum(budgets)}), got {total}"
        )


def _check_htasks(phase: Phase, path: str, tasks: dict[str, TaskPlan], chunk: Any, errors: list[str]) -> None:
    """hTask ids are positions and the hTasks partition the phase's tasks."""
    if phase.htasks is INVALID:
        return
    members = set(phase.tasks) if _valid(phase.tasks) else None
    owner: dict[str, int] = {}
    for index, htask in enumerate(phase.htasks):
        where = at(join(path, "htasks"), index)
        if _valid(htask.id) and htask.id != index:
            add_error(
                errors,
                join(where, "id"),
                f"must be {index} (an hTask's id is its position in its phase), got {htask.id}",
            )
        for j, name in enumerate(htask.tasks if _valid(htask.tasks) else ()):
            item = at(join(where, "tasks"), j)
            if name not in tasks:
                add_error(errors, item, unknown_task(name, tasks))
            elif members is not None and name not in members:
                add_error(errors, item, f"task {quote(name)} is not in {join(path, 'tasks')}")
            elif name in owner:
                add_error(errors, item, f"task {quote(name)} is already in {join(path, 'htasks')}[{owner[name]}]")
            else:
                owner[name] = index
        _check_budgets(htask, where, chunk, errors)
    if members is not None and all(_valid(h.tasks) for h in phase.htasks):
        for name in phase.tasks:
            if name in tasks and name not in owner:
                add_error(errors, join(path, "htasks"), f"task {quote(name)} is in no hTask")


def _check_activity(phase: Phase, path: str, tasks: dict[str, TaskPlan], errors: list[str]) -> None:
    """A task is in the phase exactly when the phase's rounds lie within its rounds 1..steps."""
    first, last = phase.first_round, phase.last_round
    listed = set(phase.tasks)
    for name, task in tasks.items():
        steps = task.steps
        if steps is INVALID:
            continue
        if first <= steps < last:
            add_error(
                errors,
                path,
                f"task {quote(name)} finishes at round {steps}, inside this phase (rounds {first}..{last}); "
                "a phase must end where a task finishes",
            )
        elif name in listed and steps < first:
            add_error(
                errors,
                join(path, "tasks"),
                f"task {quote(name)} is not active in rounds {first}..{last} (it takes {steps} steps)",
            )
        elif name not in listed and last <= steps:
            add_error(
                errors,
                join(path, "tasks"),
                f"misses task {quote(name)}, which is active in rounds {first}..{last} (it takes {steps} steps)",
            )


def _check_rounds_per_body(plan: Plan, phase: Phase, path: str, errors: list[str]) -> None:
    """A body of several rounds divides the phase and runs on one CPU rank (its lanes, threads,
    step their own hTasks' tasks; ranks would have to meet at every round's all-reduces and
    transfers, and CUDA streams order optimizer steps on the host's)."""
    per_body = phase.rounds_per_body
    if not _valid(per_body) or per_body == 1:
        return
    where = join(path, "rounds_per_body")
    placement = plan.placement
    if phase.num_rounds % per_body:
        add_error(errors, where, f"must divide the phase's {phase.num_rounds} rounds, got {per_body}")
    elif placement is not INVALID and _valid(placement.num_ranks) and placement.num_ranks > 1:
        add_error(errors, where, f"must be 1 in a plan of {placement.num_ranks} ranks (several rounds per body: one)")
    elif placement is not INVALID and _valid(placement.device) and placement.device != "cpu":
        add_error(errors, where, f"must be 1 on device {quote(placement.device)} (several rounds per body: CPU lanes)")


def check_phases(plan: Plan, tasks: dict[str, TaskPlan], errors: list[str]) -> None:
    """Phase ids are positions, phases follow each other from round 1 to the last task's last
    step, each holds exactly the tasks active in its rounds, and its hTasks partition them."""
    if plan.phases is INVALID or plan.tasks is INVALID:
        return
    next_round: int | None = 1
    for index, phase in enumerate(plan.phases):
        path = at("phases", index)
        if _valid(phase.id) and phase.id != index:
            add_error(errors, join(path, "id"), f"must be {index} (a phase's id is its position), got {phase.id}")
        for j, name in enumerate(phase.tasks if _valid(phase.tasks) else ()):
            if name not in tasks:
                add_error(errors, at(join(path, "tasks"), j), unknown_task(name, tasks))
        _check_htasks(phase, path, tasks, plan.alignment.chunk_size, errors)
        if next_round is None or not _valid(phase.first_round, phase.num_rounds):
            next_round = None
            continue
        if phase.first_round != next_round:
            rule = "the first phase starts at round 1" if index == 0 else "phases follow each other without gaps"
            add_error(errors, join(path, "first_round"), f"must be {next_round} ({rule}), got {phase.first_round}")
        if _valid(phase.tasks):
            _check_activity(phase, path, tasks, errors)
        _check_rounds_per_body(plan, phase, path, errors)
        next_round = phase.last_round + 1
    steps = [t.steps for t in tasks.values() if _valid(t.steps)]
    if next_round is not None and steps and next_round - 1 < max(steps):
        longest = max(tasks.values(), key=lambda t: t.steps if _valid(t.steps) else 0)
        add_error(
            errors,
            "phases",
            f"the last phase ends at round {next_round - 1}, but task {quote(longest.name)} takes "
            f"{longest.steps} steps (the phases must cover rounds 1..{longest.steps})",
        )


def check_references(plan: Plan, errors: list[str]) -> None:
    """All cross-reference and structure checks; the rank programs are checked (and their round
    bodies simulated) only on an otherwise valid plan."""
    tasks = {t.name: t for t in plan.tasks if isinstance(t.name, str)} if plan.tasks is not INVALID else {}
    num_layers = _num_layers(plan.backbone, errors)
    before = len(errors)
    check_placement(plan.placement, num_layers, errors)
    placement_ok = len(errors) == before and plan.placement.stages is not INVALID
    check_partition(plan.partition, plan.placement if placement_ok else None, num_layers, errors)
    check_phases(plan, tasks, errors)
    if not errors:
        check_programs(plan, tasks, errors)
