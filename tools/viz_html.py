"""The HTML of `muxtune-viz`: one self-contained page (inline CSS and SVG, no scripts, no
network) with the plan's phases, its subgraph partition, a simulated timeline per phase (one
row per rank and stream, one bar per instruction, coloured by hTask, details on hover) and,
for a run, each task's loss curve and step times and the predicted against the measured round
time per phase."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape

from muxtune.compiler.passes.simulate import COMMUNICATION_STREAM, PhaseSimulation, TimelineEntry
from muxtune.plans import Plan

ROW_HEIGHT = 22
LABEL_WIDTH = 150
CHART_WIDTH = 1000
_OP_LIGHTNESS = {"forward": 62, "loss_backward": 48, "backward": 40}
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; }
svg { background: #fafafa; border: 1px solid #ddd; }
.legend span { display: inline-block; margin-right: 14px; font-size: 13px; }
.legend i { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -1px; }
"""


@dataclass(frozen=True)
class RunRecord:
    """What a run measured: per task the (step, loss, seconds) of each step, and the summary's
    per-phase timings (median and predicted round seconds)."""

    steps: Mapping[str, Sequence[tuple[int, float, float]]]
    phase_timings: Sequence[Mapping[str, object]] = field(default_factory=tuple)


def htask_colour(htask: int | None, op: str) -> str:
    """hTask hue (golden-angle spacing), op lightness; communication and steps in grey."""
    if htask is None or op not in _OP_LIGHTNESS:
        return "hsl(0, 0%, 55%)" if op in ("send", "recv", "all_reduce") else "hsl(0, 0%, 35%)"
    return f"hsl({(htask * 137.5) % 360:.0f}, 65%, {_OP_LIGHTNESS[op]}%)"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{escape(str(value))}</td>"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _bar(entry: TimelineEntry, y: int, scale: float, size: int) -> str:
    """One instruction's bar; ``size`` hTasks in the phase (an instance of a body of several
    rounds takes its hTask's colour)."""
    x = LABEL_WIDTH + entry.start * scale
    width = max(1.0, (entry.end - entry.start) * scale)
    where = f" hTask {entry.htask}, micro-batch {entry.microbatch}" if entry.htask is not None else ""
    tasks = f" [{', '.join(entry.tasks)}]" if entry.tasks else ""
    tip = (
        f"rank {entry.rank} stream {entry.stream} #{entry.index}: {entry.op}{where}{tasks}, "
        f"{entry.start * 1e3:.2f}-{entry.end * 1e3:.2f} ms"
    )
    colour = htask_colour(entry.htask % size if entry.htask is not None else None, entry.op)
    return (
        f'<rect class="bar" x="{x:.1f}" y="{y + 3}" width="{width:.1f}" height="{ROW_HEIGHT - 6}" '
        f'fill="{colour}" stroke="#fff" stroke-width="0.5"><title>{escape(tip)}</title></rect>'
    )


def timeline_svg(plan: Plan, simulation: PhaseSimulation) -> str:
    """One phase's simulated round body: a row per (rank, stream) holding instructions."""
    size = len(plan.phases[simulation.phase].htasks)
    rows = sorted({(e.rank, e.stream) for e in simulation.timeline})
    seconds = max((e.end for e in simulation.timeline), default=0.0) or 1e-9
    scale = CHART_WIDTH / seconds
    height = ROW_HEIGHT * len(rows) + 30
    parts = [f'<svg class="timeline" width="{LABEL_WIDTH + CHART_WIDTH + 50}" height="{height}">']
    for k, (rank, stream) in enumerate(rows):
        y = k * ROW_HEIGHT
        lane = "communication" if stream == COMMUNICATION_STREAM else f"stream {stream}"
        parts.append(f'<text x="4" y="{y + 15}" font-size="12">rank {rank} {lane}</text>')
        for entry in simulation.timeline:
            if (entry.rank, entry.stream) == (rank, stream):
                parts.append(_bar(entry, y, scale, size))
    for tick in range(6):
        x = LABEL_WIDTH + tick * CHART_WIDTH / 5
        label = f"{seconds * tick / 5 * 1e3:.1f} ms"
        parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height - 18}" stroke="#ddd"/>')
        parts.append(f'<text x="{x - 14:.1f}" y="{height - 4}" font-size="11">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(plan: Plan, phase: int) -> str:
    items = [
        f'<span><i style="background:{htask_colour(h.id, "forward")}"></i>'
        f"hTask {h.id}: {escape(', '.join(h.tasks))}</span>"
        for h in plan.phases[phase].htasks
    ]
    items.append(f'<span><i style="background:{htask_colour(None, "send")}"></i>communication</span>')
    items.append("<span>darker: backward</span>")
    return f'<div class="legend">{"".join(items)}</div>'


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], y_label: str) -> str:
    """Lines over steps, one per task, with axis ranges in the corner labels."""
    points = [p for values in series.values() for p in values]
    if not points:
        return "<p>nothing recorded</p>"
    x_max = max(x for x, _ in points) or 1.0
    y_min, y_max = min(y for _, y in points), max(y for _, y in points)
    span = (y_max - y_min) or 1.0
    width, height = 600, 240
    parts = [f'<svg class="chart" width="{width + 160}" height="{height + 30}">']
    for k, (name, values) in enumerate(series.items()):
        colour = f"hsl({(k * 137.5) % 360:.0f}, 65%, 40%)"
        coords = " ".join(f"{40 + x / x_max * width:.1f},{10 + (y_max - y) / span * height:.1f}" for x, y in values)
        parts.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2" points="{coords}">')
        parts.append(f"<title>{escape(name)}</title></polyline>")
        parts.append(f'<text x="{width + 50}" y="{20 + 16 * k}" font-size="12" fill="{colour}">{escape(name)}</text>')
    parts.append(f'<text x="2" y="12" font-size="11">{y_max:.3g}</text>')
    parts.append(f'<text x="2" y="{height + 10}" font-size="11">{y_min:.3g}</text>')
    parts.append(f'<text x="40" y="{height + 26}" font-size="11">{escape(y_label)} by step (1-{x_max:.0f})</text>')
    parts.append("</svg>")
    return "".join(parts)


def _plan_sections(plan: Plan, simulations: Sequence[PhaseSimulation]) -> list[str]:
    p = plan.placement
    out = [
        f"<p>{escape(plan.job.model)} in {escape(plan.job.dtype)} on {p.num_ranks} {escape(p.device)} rank(s): "
        f"{p.pipeline_parallel} stage(s) x {p.tensor_parallel} tensor x {p.data_parallel} data parallel; "
        f"{len(plan.tasks)} tasks, {plan.num_rounds} rounds.</p>",
        "<h2>Phases</h2>",
        _table(
            ["phase", "rounds", "tasks", "hTasks (micro-batches)", "predicted s/round", "bubble"],
            [
                (
                    ph.id,
                    f"{ph.first_round}-{ph.last_round}",
                    ", ".join(ph.tasks),
                    "; ".join(f"{'+'.join(h.tasks)} x{h.num_microbatches}" for h in ph.htasks),
                    sim.seconds_per_round,
                    f"{sim.bubble_fraction:.1%}",
                )
                for ph, sim in zip(plan.phases, simulations)
            ],
        ),
        "<h2>Subgraph partition</h2>",
        _table(
            ["subgraph", "kind", "layers", "stage", "nodes"],
            [
                (s.id, s.kind, f"{s.first_layer}..{s.last_layer}", s.stage, s.num_nodes)
                for s in plan.partition.subgraphs
            ],
        ),
    ]
    for phase, sim in zip(plan.phases, simulations):
        out.append(f"<h2>Phase {phase.id}: one simulated round ({sim.seconds_per_round * 1e3:.2f} ms)</h2>")
        out.append(_legend(plan, phase.id))
        out.append(timeline_svg(plan, sim))
    return out


def _run_sections(run: RunRecord) -> list[str]:
    out = ["<h2>Measured: loss per task</h2>"]
    out.append(line_chart({n: [(s, loss) for s, loss, _ in v] for n, v in run.steps.items()}, "loss"))
    out.append("<h2>Measured: step time per task (s)</h2>")
    out.append(line_chart({n: [(s, sec) for s, _, sec in v] for n, v in run.steps.items()}, "seconds"))
    if run.phase_timings:
        out.append("<h2>Predicted against measured round time</h2>")
        rows = []
        for t in run.phase_timings:
            predicted, measured = t.get("predicted_round_seconds"), t.get("median_round_seconds")
            ratio = f"{predicted / measured - 1:+.1%}" if predicted and measured else "-"
            rows.append((t.get("phase"), t.get("rounds_run"), predicted or "-", measured or "-", ratio))
        out.append(_table(["phase", "rounds run", "predicted s/round", "measured median s/round", "error"], rows))
    return out


def render_page(plan: Plan, simulations: Sequence[PhaseSimulation], run: RunRecord | None = None) -> str:
    """The whole page for a plan (and optionally what its run measured)."""
    title = f"MuxTune plan: {len(plan.tasks)} tasks on {plan.job.model}"
    sections = _plan_sections(plan, simulations) + (_run_sections(run) if run is not None else [])
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>{''.join(sections)}</body></html>\n"
    )
