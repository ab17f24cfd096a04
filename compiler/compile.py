"""The compiler driver: job spec -> plan (schema 2), on one device.

It resolves the backbone, checks every task against it (targets, sequence caps, `init_from`
adapters, weight files), tokenizes every dataset (so data errors surface now, with file and
line), then runs the passes: trace (backbone + PEFT hosts on the meta device), partition
(subgraphs), align (phases, budgets, exact micro-batch counts), emit (the rank's program).
Deterministic: the same inputs give the same plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from muxtune.plans import (
    Alignment,
    JobSummary,
    Placement,
    Plan,
    Predictions,
    Stage,
    TaskPlan,
    compute_fingerprint,
)
from muxtune.runtime.adapters import AdapterError, load_adapter
from muxtune.runtime.data import DataError, Example, TokenizedDataset, load_dataset
from muxtune.runtime.execution.plan_partition import plan_partition
from muxtune.runtime.model_sources import ModelSourceError, resolve_model_dir
from muxtune.runtime.models import BackboneConfig, BackboneForCausalLM, build_model, read_hf_config
from muxtune.runtime.models.loading import build_model_checked, check_checkpoint
from muxtune.runtime.peft import PeftAttachError, attach_task, detach_task, find_anchors, prepare_examples
from muxtune.runtime.tokenizer import TextTokenizer, load_tokenizer
from muxtune.specs import JobSpec, LoraSpec, TaskSpec

from .driver import PassDriver
from .errors import CompileError
from .passes.align import CHUNK_SIZE, mean_length, plan_phases
from .passes.emit import single_rank_program
from .passes.partition import partition as partition_pass
from .passes.partition import policy_from_name
from .passes.trace import trace_model

DEFAULT_TASK_TOKENS = 1024
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
    fuse: bool = True,
    task_tokens: int = DEFAULT_TASK_TOKENS,
    policy: str = DEFAULT_POLICY,
    spec_path: str | None = None,
) -> CompileResult:
    """Compile a validated job spec into a plan; raises CompileError listing every problem.

    `task_tokens` caps the tokens one task brings to one micro-batch; `policy` names how the
    traced graph is cut into subgraphs (`per_layers(N)` or `fine`).
    """
    if task_tokens <= 0:
        raise CompileError([f"task_tokens: must be a positive integer, got {task_tokens}"])
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
    notes = (
        ignored_cluster_fields(spec)
        + rank_notes(spec, meta_model)
        + tuple(
            f"tasks.{t.name}: {datasets[t.name].num_targetless} of {len(datasets[t.name].examples)} examples keep no "
            f"target token within max_seq_len={t.max_seq_len} and are skipped"
            for t in spec.tasks
            if datasets[t.name].num_targetless
        )
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
        partition_policy = policy_from_name(policy)
    except ValueError as exc:
        raise CompileError([f"partition: {exc}"]) from None
    passes = PassDriver()
    traced = passes.run("trace", trace_model, config, {t.name: t.peft for t in tasks}, head=False)
    partition = plan_partition(passes.run("partition", partition_pass, traced, partition_policy))
    laid_out = {t.name: laid_out_dataset(t, datasets[t.name]) for t in tasks}
    phases = passes.run("align", plan_phases, tasks, laid_out, fuse=fuse, task_tokens=task_tokens)
    program = passes.run("emit", single_rank_program, tasks, phases, partition, device)
    backbone = config.to_dict()
    plan = Plan(
        job=JobSummary(model=spec.model, dtype=spec.dtype, output_dir=spec.output_dir, spec_path=spec_path),
        fingerprint=compute_fingerprint(backbone, tasks, phases, partition),
        backbone=backbone,
        placement=single_device_placement(device, config.num_layers),
        partition=partition,
        tasks=tasks,
        alignment=Alignment(chunk_size=CHUNK_SIZE),
        phases=phases,
        programs=(program,),
        predictions=Predictions(
            num_rounds=phases[-1].last_round,
            tokens_per_round=sum(round(mean_length(laid_out[t.name]) * t.batch_size) for t in tasks),
        ),
    )
    return CompileResult(plan=plan, notes=notes)


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
    for i, task in enumerate(spec.tasks):
        where = f"tasks[{i}]"
        span = position_span(task)
        if span > config.max_position_embeddings:
            extra = f" plus the method's {span - task.max_seq_len} virtual tokens" if span > task.max_seq_len else ""
            errors.append(
                f"{where}.max_seq_len: {task.max_seq_len}{extra} exceeds the model's "
                f"max_position_embeddings ({config.max_position_embeddings})"
            )
        check_peft(task, where, meta_model, tokenizer, errors)
        try:
            datasets[task.name] = load_dataset(task.data.path, task.data.format, tokenizer, task.max_seq_len)
        except DataError as exc:
            errors.append(f"{where}.data.path: {exc}")
            continue
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


def check_peft(
    task: TaskSpec, where: str, meta_model: BackboneForCausalLM, tokenizer: TextTokenizer, errors: list[str]
) -> None:
    """Attach the task's PEFT modules to the meta backbone (errors name the config field) and
    check `init_from` against the parameters they have."""
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
        errors.append(f"{where}.peft.{exc.field}: {exc}")
        return
    detach_task(meta_model, task.name)
    if task.init_from:
        shapes = {f"{a}.{n}": tuple(p.shape) for a, m in modules.items() for n, p in m.named_parameters()}
        check_init_from(task, where, shapes, errors)


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


def ignored_cluster_fields(spec: JobSpec) -> tuple[str, ...]:
    """Cluster settings this (single-device) compiler cannot honour yet, as notes."""
    cluster = spec.cluster
    notes = []
    if cluster.num_devices != 1:
        notes.append(f"cluster.num_devices: {cluster.num_devices} is ignored; this compiler plans for one device")
    for name in ("pipeline_parallel", "tensor_parallel"):
        value = getattr(cluster, name)
        if value not in ("auto", 1):
            notes.append(f"cluster.{name}: {value} is ignored; this compiler plans without model parallelism")
    if cluster.memory_gb != "auto":
        notes.append(f"cluster.memory_gb: {cluster.memory_gb} is ignored; this compiler has no memory model yet")
    return tuple(notes)


def resolve_device(device: str) -> str:
    """`auto` becomes `cuda` when a GPU is visible, else `cpu`."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def single_device_placement(device: str, num_layers: int) -> Placement:
    """Everything on one rank: one stage of every layer."""
    return Placement(
        device=device,
        num_devices=1,
        num_ranks=1,
        pipeline_parallel=1,
        tensor_parallel=1,
        data_parallel=1,
        stages=(Stage(id=0, ranks=(0,), first_layer=0, last_layer=num_layers - 1),),
    )
