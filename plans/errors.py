"""The exception type for an invalid plan."""

from __future__ import annotations

from muxtune.common.errors import UserError


class PlanError(UserError):
    """Every problem found in a plan, one per line, each prefixed with its field path."""
