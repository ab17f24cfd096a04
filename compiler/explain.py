"""`muxtune-compile --explain`: the planner's groups and why, and its predictions beside those
of the alternatives (one hTask per task, one hTask of everything, one process per task)."""

from __future__ import annotations

from collections.abc import Mapping

from muxtune.plans import Plan

from .passes.solve import MEMORY_SLACK

_GIB = 1 << 30


def _row(name: str, plan: Plan) -> str:
    p = plan.predictions
    peak = (p.est_peak_memory_bytes or 0) / _GIB
    bubble = max((ph.bubble_fraction for ph in p.phases), default=0.0)
    return (
        f"  {name:<22} {p.est_seconds_per_round or 0:>10.3f} {p.est_tokens_per_second or 0:>11.0f} "
        f"{p.est_total_seconds or 0:>10.1f} {peak:>9.2f} {bubble:>7.1%}"
    )


def separate_processes(plan: Plan) -> tuple[float, float]:
    """Predicted tokens/s and memory of one process per task on one device: each process
    holds the runtime and weights, and the processes share the device's time (estimated from
    the no-fusion plan's per-round time, since a lone task runs as its own hTask there)."""
    static = min(plan.predictions.phases[0].peak_memory_bytes)
    return plan.predictions.est_tokens_per_second or 0.0, static * len(plan.tasks)


def explain(plan: Plan, alternatives: Mapping[str, Plan]) -> str:
    """A readable account of ``plan``; ``alternatives`` maps ``no_fuse`` and ``fuse`` to the
    same job compiled that way."""
    lines = [
        f"placement: {plan.placement.pipeline_parallel} stage(s) x {plan.placement.tensor_parallel} tensor x "
        f"{plan.placement.data_parallel} data parallel on {plan.placement.device}"
    ]
    for stage in plan.placement.stages:
        lines.append(f"  stage {stage.id}: layers {stage.first_layer}-{stage.last_layer} on ranks {list(stage.ranks)}")
    for phase, report, predicted in zip(plan.phases, plan.solver, plan.predictions.phases):
        lines.append(
            f"phase {phase.id} (rounds {phase.first_round}-{phase.last_round}, {len(phase.tasks)} tasks): "
            f"{report.method} {report.status}, round {report.objective_seconds:.3f} s on the solver's proxy "
            f"(bound {report.bound_seconds:.3f} s, gap {report.gap:.1%}"
            + (
                f"; the fastest, {report.fastest_seconds:.3f} s, needs more memory)"
                if report.fastest_seconds < report.objective_seconds
                else ")"
            )
        )
        for htask in phase.htasks:
            budgets = ", ".join(f"{n} {b}" for n, b in zip(htask.tasks, htask.token_budgets))
            lines.append(
                f"  hTask {htask.id}: {htask.num_microbatches} micro-batch(es) of <= {htask.micro_batch_tokens} tokens "
                f"({budgets})"
            )
        if phase.rounds_per_body > 1:
            lines.append(
                f"  {phase.rounds_per_body} rounds per body: each hTask steps on its own stream and may run its next "
                "round on another"
            )
        peak = max(predicted.peak_memory_bytes) / _GIB
        lines.append(
            f"  predicted: {predicted.seconds_per_round:.3f} s per round, {predicted.tokens_per_second:.0f} tokens/s, "
            f"bubble {predicted.bubble_fraction:.1%}, exposed communication "
            f"{predicted.exposed_communication_seconds:.3f} s, peak {peak:.2f} GB per device"
        )
    lines.append("why: the solver minimizes the predicted round time (busiest stage, pipeline fill and drain,")
    lines.append("     transfers, optimizer steps) subject to every device's memory; fewer, larger micro-batches")
    lines.append("     amortize per-call overheads and weight reads, more micro-batches or split groups fit memory")
    lines.append("     and shorten the pipeline's fill and drain. Among plans at most")
    lines.append(f"     {MEMORY_SLACK:.0%} slower than the fastest it takes the one with the least peak memory.")
    lines.append(f"  {'plan':<22} {'s/round':>10} {'tokens/s':>11} {'total s':>10} {'peak GB':>9} {'bubble':>7}")
    lines.append(_row("planner", plan))
    names = {"no_fuse": "one hTask per task", "fuse": "one hTask of all"}
    for mode, other in alternatives.items():
        lines.append(_row(names.get(mode, mode), other))
    if "no_fuse" in alternatives:
        rate, memory = separate_processes(alternatives["no_fuse"])
        lines.append(
            f"  {'one process per task':<22} {'':>10} {rate:>11.0f} {'':>10} {memory / _GIB:>9.2f} {'':>7}"
            "  (each process holds the runtime and weights; no padding assumed)"
        )
    return "\n".join(lines)
