"""The compiler driver: job spec -> plan (schema 2), on one device.

It resolves the backbone, checks every task against it (targets, sequence caps, `init_from`
adapters, weight files), tokenizes every dataset (so data errors surface now, with file and
line), then runs the passes: trace (backbone + PEFT hosts on the meta device), partition
(subgraphs), align (phases, budgets, exact micro-batch counts), emit (the rank's program),
simulate (the predictions), streams (hTasks side by side where the device runs them at once).
Deterministic: the same inputs give the same plan.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from muxtune.plans import (
    Alignment,
    JobSummary,
    Placement,
    Plan,
    Predictions,
    TaskPlan,
    compute_fingerprint,
)
from muxtune.runtime.adapters import AdapterError, load_adapter
from muxtune.runtime.data import DataError, Example, TokenizedDataset, load_dataset
from muxtune.runtime.execution import stage_of_layer
from muxtune.runtime.execution.plan_partition import plan_partition
from muxtune.runtime.model_sources import ModelSourceError, resolve_model_dir
from muxtune.runtime.models import BackboneConfig, BackboneForCausalLM, build_model, read_hf_config
from muxtune.runtime.models.loading import build_model_checked, check_checkpoint
from muxtune.runtime.peft import PeftAttachError, attach_task, detach_task, find_anchors, prepare_examples
from muxtune.runtime.sharding import TensorSplit
from muxtune.runtime.tensorboard_log import report_to_problems
from muxtune.runtime.tokenizer import TextTokenizer, load_tokenizer
from muxtune.specs import JobSpec, LoraSpec, PeftSpec, TaskSpec

from .cost.build import build_cost_model
from .cost.devices import device_spec
from .cost.model import CostModel
from .cost.profile import Profile
from .driver import PassDriver
from .errors import CompileError
from .passes.emit import emit_programs
from .passes.partition import partition as partition_pass
from .passes.partition import policy_from_name
from .passes.placement import placement as make_placement
from .passes.solve import MEMORY_SLACK
from .passes.trace import trace_model
from .planning import FUSION_MODES, JobPlan, placement_options, plan_job
from .predict import predictions
from .side_by_side import side_by_side
from .tensor_parallel import may_split, tensor_parallel_problems

DEFAULT_POLICY = "per_layers(1024)"
"""One subgraph for all decoder layers: on one device there is no reason to cut."""


@dataclass(frozen=True)
class CompileResult:
    """The plan and the notes worth telling the user (e.g. examples without target tokens)."""

    plan: Plan
    notes: tuple[str, ...]


def compile_job(
    spec: JobSpec,
    *,
    fusion: str = "solve",
    task_tokens: int | None = None,
    policy: str = DEFAULT_POLICY,
    spec_path: str | None = None,
    profile: Profile | None = None,
    align: bool = True,
    streams: int | None = None,
) -> CompileResult:
    """Compile a validated job spec into a plan; raises CompileError listing every problem.

    ``fusion`` is ``solve`` (the planner decides), ``fuse`` (one hTask of every task) or
    ``no_fuse`` (one hTask per task); with ``solve`` on one device that runs hTask streams side
    by side, the solver's hTasks are kept unless one hTask per task, lowered with streams too, is
    simulated faster by more than `MEMORY_SLACK` (the solver's proxy runs hTasks one after
    another); `task_tokens` caps the tokens one task brings to one
    micro-batch; `policy` names how the traced graph is cut into subgraphs (`per_layers(N)` or
    `fine`; cut at stage boundaries too when the plan has several stages); `profile` is a
    measured profile the cost model calibrates itself with; ``align=False`` turns chunk
    alignment off (budgets need not be multiples of the device's chunk size: chunk size 1);
    ``streams`` caps the hTask streams of a one-rank plan (default: as many as the device runs
    at once; 1 runs every hTask on stream 0).
    """
    if fusion not in FUSION_MODES:
        raise CompileError([f"fusion: must be one of {', '.join(FUSION_MODES)}, got {fusion!r}"])
    if task_tokens is not None and task_tokens <= 0:
        raise CompileError([f"task_tokens: must be a positive integer, got {task_tokens}"])
    if streams is not None and streams <= 0:
        raise CompileError([f"streams: must be a positive integer, got {streams}"])
    if reporting_problems := report_to_problems(spec.report_to):
        raise CompileError(reporting_problems)
    try:
        model_dir = resolve_model_dir(spec.model)
        config = read_hf_config(model_dir)
        tokenizer = load_tokenizer(model_dir)
        meta_model = build_model_checked(config, model_dir / "config.json")
    except (ModelSourceError, FileNotFoundError, ValueError) as exc:
        raise CompileError([f"model: {exc}"]) from None
    errors: list[str] = []
    try:
        check_checkpoint(model_dir, meta_model)
    except (FileNotFoundError, ValueError) as exc:
        errors.append(f"model: {exc}")
    datasets = check_tasks(spec, config, tokenizer, errors, meta_model=meta_model)
    if errors:
        raise CompileError(errors)
    notes = rank_notes(spec, meta_model) + tuple(
        f"tasks.{t.name}: {datasets[t.name].num_targetless} of {len(datasets[t.name].examples)} examples keep no "
        f"target token within max_seq_len={t.max_seq_len} and are skipped"
        for t in spec.tasks
        if datasets[t.name].num_targetless
    )
    tasks = tuple(
        TaskPlan.from_spec(
            t,
            num_examples=len(datasets[t.name].examples),
            num_targetless_examples=datasets[t.name].num_targetless,
            num_tokens=sum(len(e.input_ids) for e in datasets[t.name].usable),
        )
        for t in spec.tasks
    )
    device = resolve_device(spec.cluster.device)
    try:
        policy_from_name(policy)
    except ValueError as exc:
        raise CompileError([f"partition: {exc}"]) from None
    passes = PassDriver()
    traced = passes.run("trace", trace_model, config, {t.name: t.peft for t in tasks}, head=False)
    cost = passes.run("cost", build_cost_model, config, traced, meta_model, tasks, device, spec.dtype, profile)
    memory_limit = device_spec(device, spec.cluster.memory_gb).memory_bytes
    split_problems = tensor_parallel_problems(config, spec) if may_split(spec) else []
    if split_problems and spec.cluster.tensor_parallel != "auto":
        raise CompileError([f"cluster.tensor_parallel: {spec.cluster.tensor_parallel}: {p}" for p in split_problems])
    options = placement_options(spec.cluster, cost, splittable=not split_problems)
    laid_out = {t.name: laid_out_dataset(t, datasets[t.name]) for t in tasks}
    num_streams = min(cost.device.parallel_streams, streams or cost.device.parallel_streams)
    context = _PlanContext(
        spec=spec,
        spec_path=spec_path,
        config=config,
        tasks=tasks,
        datasets=datasets,
        laid_out=laid_out,
        cost=cost,
        traced=traced,
        device=device,
        policy=policy,
        memory_limit=memory_limit,
        align=align,
        num_streams=num_streams,
    )

    def solved(mode: str) -> JobPlan:
        return passes.run(
            "solve",
            plan_job,
            tasks,
            laid_out,
            cost,
            options,
            memory_limit,
            mode=mode,
            task_tokens=task_tokens,
            align=align,
        )

    plan = _lowered(passes, context, solved(fusion))
    if fusion == "solve" and num_streams > 1 and plan.placement.num_ranks == 1 and len(tasks) > 1:
        try:
            separate: Plan | None = _lowered(passes, context, solved("no_fuse"))
        except CompileError:  # one hTask per task does not fit where the solver's hTasks do
            separate = None
        if separate is not None and _preferred(separate, plan) is separate:
            notes += (
                f"planner: one hTask per task, {_seconds(separate)} s a round side by side on {num_streams} "
                f"streams, against {_seconds(plan)} s for the solver's hTasks (its proxy runs them one after another)",
            )
            plan = separate
    return CompileResult(plan=plan, notes=notes)


@dataclass(frozen=True)
class _PlanContext:
    """What lowering a solved job into a plan needs from `compile_job`."""

    spec: JobSpec
    spec_path: str | None
    config: BackboneConfig
    tasks: tuple[TaskPlan, ...]
    datasets: dict[str, TokenizedDataset]
    laid_out: dict[str, TokenizedDataset]
    cost: CostModel
    traced: torch.fx.GraphModule
    device: str
    policy: str
    memory_limit: int
    align: bool
    num_streams: int


def _lowered(passes: PassDriver, ctx: _PlanContext, job_plan: JobPlan) -> Plan:
    """The plan of a solved job: placement, partition, programs (with hTask streams where they
    pay), predictions."""
    tasks, cost, traced, memory_limit = ctx.tasks, ctx.cost, ctx.traced, ctx.memory_limit
    spec, config, datasets, laid_out = ctx.spec, ctx.config, ctx.datasets, ctx.laid_out
    partition_policy = policy_from_name(ctx.policy)
    option = job_plan.option
    placement = make_placement(
        ctx.device, config.num_layers, option.stage_layers, option.tensor_parallel, option.data_parallel
    )
    if len(option.stage_layers) > 1:
        partition_policy = policy_from_name(stage_policy_name(placement, ctx.policy))
    if option.tensor_parallel > 1:
        split = TensorSplit(option.tensor_parallel, 0)
        traced = passes.run("trace", trace_model, config, {t.name: t.peft for t in tasks}, head=False, split=split)
    first_layers = tuple(stage.first_layer for stage in placement.stages)
    partition = plan_partition(
        passes.run("partition", partition_pass, traced, partition_policy), stage_of=stage_of_layer(first_layers)
    )
    phases = tuple(p.phase for p in job_plan.phases)
    programs = passes.run("emit", emit_programs, tasks, phases, partition, placement)
    backbone = config.to_dict()
    draft = Plan(
        job=JobSummary(
            model=spec.model,
            dtype=spec.dtype,
            output_dir=spec.output_dir,
            spec_path=ctx.spec_path,
            report_to=spec.report_to,
        ),
        fingerprint=compute_fingerprint(backbone, tasks, phases, partition),
        backbone=backbone,
        placement=placement,
        partition=partition,
        tasks=tasks,
        alignment=Alignment(chunk_size=cost.device.chunk_tokens if ctx.align else 1),
        phases=phases,
        programs=programs,
        predictions=Predictions(num_rounds=phases[-1].last_round, tokens_per_round=0),
        solver=tuple(p.report for p in job_plan.phases),
    )
    ineffective = {t.name: placeholder_share(datasets[t.name], laid_out[t.name]) for t in tasks}
    demands = [p.demands for p in job_plan.phases]
    predicted, simulations = passes.run("simulate", predictions, draft, demands, cost, ineffective)
    if ctx.num_streams > 1 and placement.num_ranks == 1:
        sides = passes.run(
            "streams", side_by_side, draft, demands, simulations, cost, ineffective, ctx.num_streams, memory_limit
        )
        if sides is not None:
            phases, streams_of, tails = sides
            programs = emit_programs(tasks, phases, partition, placement, streams_of, tails)
            draft = dataclasses.replace(draft, phases=phases, programs=programs)
            predicted, _ = passes.run("simulate", predictions, draft, demands, cost, ineffective)
    return dataclasses.replace(draft, predictions=predicted)


def _seconds(plan: Plan) -> str:
    return f"{plan.predictions.est_seconds_per_round:.3f}"


def _preferred(challenger: Plan, incumbent: Plan) -> Plan:
    """The faster plan by predicted job time; the incumbent while it is within the solver's
    `MEMORY_SLACK` of the challenger and needs no more memory (the solver's own rule)."""
    fast, slow = challenger.predictions.est_total_seconds, incumbent.predictions.est_total_seconds
    if fast is None or slow is None or fast >= slow:
        return incumbent
    lighter = (incumbent.predictions.est_peak_memory_bytes or 0) <= (challenger.predictions.est_peak_memory_bytes or 0)
    return incumbent if lighter and slow <= fast * (1 + MEMORY_SLACK) else challenger


def check_tasks(
    spec: JobSpec,
    config: BackboneConfig,
    tokenizer: TextTokenizer,
    errors: list[str],
    *,
    meta_model: BackboneForCausalLM | None = None,
) -> dict[str, TokenizedDataset]:
    """Check each task against the backbone (`meta_model`: built on the meta device; built here
    when not given) and tokenize its data; appends to `errors`."""
    if meta_model is None:
        meta_model = build_model(config, device="meta")
    datasets = {}
    loaded: dict[tuple[str, str, int], TokenizedDataset | DataError] = {}
    attached: dict[PeftSpec, dict[str, tuple[int, ...]] | PeftAttachError] = {}
    for i, task in enumerate(spec.tasks):
        where = f"tasks[{i}]"
        span = position_span(task)
        if span > config.max_position_embeddings:
            extra = f" plus the method's {span - task.max_seq_len} virtual tokens" if span > task.max_seq_len else ""
            errors.append(
                f"{where}.max_seq_len: {task.max_seq_len}{extra} exceeds the model's "
                f"max_position_embeddings ({config.max_position_embeddings})"
            )
        if task.peft not in attached:
            attached[task.peft] = peft_parameter_shapes(task, meta_model, tokenizer)
        shapes = attached[task.peft]
        if isinstance(shapes, PeftAttachError):
            errors.append(f"{where}.peft.{shapes.field}: {shapes}")
        elif task.init_from:
            check_init_from(task, where, shapes, errors)
        source = (str(task.data.path), task.data.format, task.max_seq_len)
        if source not in loaded:
            try:
                loaded[source] = load_dataset(task.data.path, task.data.format, tokenizer, task.max_seq_len)
            except DataError as exc:
                loaded[source] = exc
        if isinstance(loaded[source], DataError):
            errors.append(f"{where}.data.path: {loaded[source]}")
            continue
        datasets[task.name] = loaded[source]
        examples = datasets[task.name].examples
        beyond = next((e for e in examples if max(e.input_ids, default=0) >= config.vocab_size), None)
        if beyond is not None:
            errors.append(
                f"{where}.data.path: {task.data.path}:{beyond.index + 1}: tokenizes to id {max(beyond.input_ids)}, "
                f"beyond the model's vocab_size {config.vocab_size} (the tokenizer and config.json disagree)"
            )
    return datasets


def position_span(task: TaskSpec) -> int:
    """How many positions a sequence of `max_seq_len` tokens spans once the task's method lays it
    out (prompt tuning's soft tokens and prefix tuning's shifted positions count)."""
    probe = Example(0, (0,) * task.max_seq_len, (False,) * task.max_seq_len)
    laid_out = prepare_examples(task.peft, [probe])[0]
    return laid_out.first_position + len(laid_out.input_ids)


def laid_out_dataset(task: TaskPlan, dataset: TokenizedDataset) -> TokenizedDataset:
    """The dataset as the task's method lays its sequences out in micro-batches (prompt tuning's
    virtual tokens count toward token budgets)."""
    return dataclasses.replace(dataset, examples=tuple(prepare_examples(task.peft, list(dataset.examples))))


def peft_parameter_shapes(
    task: TaskSpec, meta_model: BackboneForCausalLM, tokenizer: TextTokenizer
) -> dict[str, tuple[int, ...]] | PeftAttachError:
    """Attach the task's PEFT modules to the meta backbone and detach them again: the shapes of
    their parameters (keyed `<anchor>.<param>`), or the error naming the config field."""
    try:
        modules = attach_task(
            meta_model,
            task.name,
            task.peft,
            seed=0,
            dropout_generator=torch.Generator(),
            encode=lambda text: tokenizer.encode(text, add_special_tokens=True),
        )
    except PeftAttachError as exc:
        return exc
    detach_task(meta_model, task.name)
    return {f"{a}.{n}": tuple(p.shape) for a, m in modules.items() for n, p in m.named_parameters()}


def rank_notes(spec: JobSpec, meta_model: BackboneForCausalLM) -> tuple[str, ...]:
    """Notes for tasks whose LoRA rank exceeds the width (smaller of in and out features) of a
    layer they target; peft accepts such ranks, the extra rank just adds no capacity."""
    notes = []
    for task in spec.tasks:
        if not isinstance(task.peft, LoraSpec):
            continue
        narrow = []
        for name in find_anchors(meta_model, tuple(task.peft.target_modules)):
            module = meta_model.get_submodule(name)
            fan_in, fan_out = module.in_features, module.out_features
            if task.peft.r > min(fan_in, fan_out):
                narrow.append((min(fan_in, fan_out), name, fan_in, fan_out))
        if not narrow:
            continue
        width, name, fan_in, fan_out = min(narrow, key=lambda layer: layer[0])
        more = f" and of {len(narrow) - 1} more targeted layers" if len(narrow) > 1 else ""
        notes.append(
            f"tasks.{task.name}.peft.r: {task.peft.r} exceeds the width of {name} ({fan_in} -> {fan_out}){more}; "
            f"ranks above {width} add parameters without adding capacity"
        )
    return tuple(notes)


def check_init_from(task: TaskSpec, where: str, shapes: dict[str, tuple[int, ...]], errors: list[str]) -> None:
    """`init_from` must be an adapter of the task's method whose tensors are exactly the task's
    parameters (`shapes`, keyed `<anchor>.<param>`)."""
    try:
        spec, state = load_adapter(task.init_from)
    except AdapterError as exc:
        errors.append(f"{where}.init_from: {exc}")
        return
    if spec.method != task.peft.method:
        errors.append(f"{where}.init_from: the adapter is a {spec.method} adapter, the task uses {task.peft.method}")
        return
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = sorted(k for k in set(shapes) & set(state) if tuple(state[k].shape) != shapes[k])
    for what, keys in (("lacks", missing), ("has extra tensors", unexpected), ("has other shapes for", wrong)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            errors.append(
                f"{where}.init_from: the adapter {what} {', '.join(keys[:3])}{more} "
                f"(its config: {spec}; the task's: {task.peft})"
            )


def stage_policy_name(placement: Placement, policy: str) -> str:
    """``per_layers(N)`` cut at the placement's stage boundaries too (``fine`` never crosses them)."""
    match = re.fullmatch(r"per_layers\((\d+)\)", policy)
    if match is None:
        return policy
    starts = ",".join(str(stage.first_layer) for stage in placement.stages)
    return f"per_stage({starts};{match.group(1)})"


def placeholder_share(dataset: TokenizedDataset, laid_out: TokenizedDataset) -> float:
    """The share of a task's laid-out tokens its method adds (prompt tuning's placeholders)."""
    own = sum(len(e.input_ids) for e in dataset.usable)
    total = sum(len(e.input_ids) for e in laid_out.usable)
    return (total - own) / total if total else 0.0


def resolve_device(device: str) -> str:
    """`auto` becomes `cuda` when a GPU is visible, else `cpu`."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
