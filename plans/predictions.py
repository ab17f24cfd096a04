"""What the compiler predicts for a plan, and how its solver fared: the `predictions` and
`solver` sections of a plan (schema 2), with their readers.

Predictions come from a discrete-event replay of the emitted rank programs on the cost model
(per phase: time per round, tokens/s, bubbles, exposed communication, peak memory per rank);
the solver report says, per phase, how the fusion decision was reached (CP-SAT's status,
objective, bound and gap in seconds of one round, or the greedy fallback)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from muxtune.common.text import quote
from muxtune.specs.checks import (
    INVALID,
    Invalid,
    MappingReader,
    add_error,
    as_is,
    at,
    integer,
    non_empty_str,
    non_negative_int,
    non_negative_number,
    one_of,
    optional,
)

SOLVER_METHODS: tuple[str, ...] = ("cp-sat", "greedy", "fixed")
"""How a phase's hTasks were chosen: the exact solver, its deterministic fallback, or fixed by
the user (`--no-fuse`, `--fuse-all`)."""


@dataclass(frozen=True)
class PhasePrediction:
    """The simulated behaviour of one round of a phase. ``peak_memory_bytes`` has one entry
    per rank; ``ineffective_token_ratio`` is the share of processed tokens that are not the
    tasks' own (padding, placeholders)."""

    phase: int
    seconds_per_round: float
    tokens_per_round: int
    tokens_per_second: float
    bubble_fraction: float
    exposed_communication_seconds: float
    peak_memory_bytes: tuple[int, ...]
    ineffective_token_ratio: float


@dataclass(frozen=True)
class Predictions:
    """What the compiler's cost model expects (None: not estimated): per round averaged over
    the job, the whole job, and per phase."""

    num_rounds: int
    tokens_per_round: int
    est_seconds_per_round: float | None = None
    est_peak_memory_bytes: int | None = None
    est_total_seconds: float | None = None
    est_tokens_per_second: float | None = None
    phases: tuple[PhasePrediction, ...] = ()


@dataclass(frozen=True)
class SolverReport:
    """How phase ``phase``'s fusion and budgets were decided. Times are seconds of one round on
    the solver's cost proxy; ``gap`` is (fastest - bound) / fastest; ``status`` is CP-SAT's
    (OPTIMAL, FEASIBLE), FALLBACK (CP-SAT found nothing), BUDGET (the job's solver budget was
    spent: the greedy search's decision) or FIXED; ``deterministic_seconds`` is CP-SAT's own
    deterministic work measure (not wall time, so plans stay byte-identical);
    ``fastest_seconds`` is the fastest decision's round: the chosen one (``objective_seconds``)
    may be a little slower when it needs less memory."""

    phase: int
    method: str
    status: str
    objective_seconds: float
    bound_seconds: float
    gap: float
    deterministic_seconds: float
    num_candidates: int
    fastest_seconds: float


def _keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _unit_fraction(value: Any) -> float:
    number = non_negative_number(value)
    if number > 1:
        raise Invalid(f"must be a number in [0, 1], got {quote(value)}")
    return number


def _byte_counts(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise Invalid(f"must be a non-empty list of byte counts, got {quote(value)}")
    return tuple(non_negative_int(v) for v in value)


def _read_phase_prediction(raw: Any, path: str, errors: list[str]) -> PhasePrediction:
    r = MappingReader(raw, path, errors, _keys(PhasePrediction), "phase prediction mapping")
    return PhasePrediction(
        phase=r.get("phase", non_negative_int),
        seconds_per_round=r.get("seconds_per_round", non_negative_number),
        tokens_per_round=r.get("tokens_per_round", non_negative_int),
        tokens_per_second=r.get("tokens_per_second", non_negative_number),
        bubble_fraction=r.get("bubble_fraction", _unit_fraction),
        exposed_communication_seconds=r.get("exposed_communication_seconds", non_negative_number),
        peak_memory_bytes=r.get("peak_memory_bytes", _byte_counts),
        ineffective_token_ratio=r.get("ineffective_token_ratio", _unit_fraction),
    )


def _read_items(raw: Any, path: str, errors: list[str], what: str) -> tuple[Any, ...]:
    if not isinstance(raw, list):
        if raw is not INVALID:
            add_error(errors, path, f"must be a list of {what}, got {quote(raw)}")
        return ()
    return tuple(raw)


def read_predictions(raw: Any, errors: list[str]) -> Predictions:
    """The plan's ``predictions`` section; errors are appended under their field paths."""
    p = MappingReader(raw, "predictions", errors, _keys(Predictions))
    items = _read_items(p.get("phases", as_is, []), "predictions.phases", errors, "phase predictions")
    return Predictions(
        num_rounds=p.get("num_rounds", non_negative_int),
        tokens_per_round=p.get("tokens_per_round", non_negative_int),
        est_seconds_per_round=p.get("est_seconds_per_round", optional(non_negative_number), None),
        est_peak_memory_bytes=p.get("est_peak_memory_bytes", optional(non_negative_int), None),
        est_total_seconds=p.get("est_total_seconds", optional(non_negative_number), None),
        est_tokens_per_second=p.get("est_tokens_per_second", optional(non_negative_number), None),
        phases=tuple(_read_phase_prediction(item, at("predictions.phases", i), errors) for i, item in enumerate(items)),
    )


def read_solver_reports(raw: Any, errors: list[str]) -> tuple[SolverReport, ...]:
    """The plan's ``solver`` section (one report per phase)."""
    reports = []
    for i, item in enumerate(_read_items(raw, "solver", errors, "solver reports")):
        r = MappingReader(item, at("solver", i), errors, _keys(SolverReport), "solver report mapping")
        objective = r.get("objective_seconds", non_negative_number)
        reports.append(
            SolverReport(
                phase=r.get("phase", non_negative_int),
                method=r.get("method", one_of(*SOLVER_METHODS)),
                status=r.get("status", non_empty_str),
                objective_seconds=objective,
                bound_seconds=r.get("bound_seconds", non_negative_number),
                gap=r.get("gap", _unit_fraction),
                deterministic_seconds=r.get("deterministic_seconds", non_negative_number),
                num_candidates=r.get("num_candidates", integer),
                # plans written before the memory pass chose the fastest decision
                fastest_seconds=r.get("fastest_seconds", non_negative_number, objective),
            )
        )
    return tuple(reports)
