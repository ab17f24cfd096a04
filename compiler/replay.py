"""A compiled plan's simulated rounds, rebuilt from the plan file alone: the tasks' data is
tokenized again, each phase's batches drawn as the executor draws them, and the plan's own
programs replayed on the cost model (the device table, or a profile). For tools that show a
plan's schedule (`muxtune-viz`); compiling records only the summary of this replay."""

from __future__ import annotations

from muxtune.plans import Plan
from muxtune.runtime.data import DataError, load_dataset
from muxtune.runtime.model_sources import ModelSourceError, resolve_model_dir
from muxtune.runtime.models import BackboneConfig, build_model
from muxtune.runtime.tokenizer import load_tokenizer

from .compile import laid_out_dataset, placeholder_share
from .cost.build import build_cost_model
from .cost.profile import Profile
from .errors import CompileError
from .passes.demand import TaskDemand, global_batches
from .passes.simulate import PhaseSimulation
from .passes.trace import trace_model
from .predict import predictions


def replay_plan(plan: Plan, profile: Profile | None = None) -> tuple[PhaseSimulation, ...]:
    """Every phase's simulated round of ``plan`` (timelines per rank and stream included)."""
    config = BackboneConfig.from_dict(plan.backbone)
    try:
        tokenizer = load_tokenizer(resolve_model_dir(plan.job.model))
    except (ModelSourceError, FileNotFoundError, ValueError) as exc:
        raise CompileError([f"job.model: {exc}"]) from None
    datasets, ineffective = {}, {}
    for task in plan.tasks:
        try:
            raw = load_dataset(task.data.path, task.data.format, tokenizer, task.max_seq_len)
        except DataError as exc:
            raise CompileError([f"tasks.{task.name}.data.path: {exc}"]) from None
        datasets[task.name] = laid_out_dataset(task, raw)
        ineffective[task.name] = placeholder_share(raw, datasets[task.name])
    traced = trace_model(config, {t.name: t.peft for t in plan.tasks}, head=False)
    meta_model = build_model(config, device="meta")
    cost = build_cost_model(config, traced, meta_model, plan.tasks, plan.placement.device, plan.job.dtype, profile)
    batches = {t.name: global_batches(t, datasets[t.name]) for t in plan.tasks}
    chunk = plan.alignment.chunk_size
    demands = [
        {
            name: TaskDemand.of(name, batches[name][phase.first_round - 1 : phase.last_round], chunk)
            for name in phase.tasks
        }
        for phase in plan.phases
    ]
    _, simulations = predictions(plan, demands, cost, ineffective)
    return simulations
