"""Fixtures for spec tests: a job folder with two datasets and a spec writer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from spec_helpers import base_spec


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sentiment.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    (tmp_path / "data" / "qa.jsonl").write_text('{"text": "hello"}\n')
    return tmp_path


@pytest.fixture
def write_spec(job_dir: Path) -> Callable[..., Path]:
    def write(spec: dict[str, Any] | str | None = None, name: str = "job.yaml") -> Path:
        path = job_dir / name
        data = base_spec() if spec is None else spec
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return path

    return write
