"""Compiler passes: trace → partition → cost → solve → align → emit → simulate."""

from .partition import partition, policy_from_name
from .trace import trace_model

__all__ = ["partition", "policy_from_name", "trace_model"]
