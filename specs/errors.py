"""The exception type for bad user input in a job spec."""

from __future__ import annotations

from muxtune.common.errors import UserError


class SpecError(UserError):
    """Every problem found in a job spec, one per line, each prefixed with its field path."""
