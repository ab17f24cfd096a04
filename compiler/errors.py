"""Compile errors: every problem found, each naming its field or file."""

from __future__ import annotations

from muxtune.common.errors import UserError


class CompileError(UserError):
    """The job cannot be compiled; `errors` lists every problem, one per line in str()."""
