"""Fixtures for plan tests."""

from __future__ import annotations

import pytest
from plan_helpers import build_plan

from muxtune.plans import Plan


@pytest.fixture
def plan() -> Plan:
    return build_plan()
