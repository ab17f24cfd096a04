"""Shared fixtures: a private model cache per test session, offline hub, the tiny builtin model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def private_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builtin models are materialized into a cache private to this test session."""
    path = tmp_path_factory.mktemp("muxtune-cache")
    previous = os.environ.get("MUXTUNE_CACHE_DIR")
    os.environ["MUXTUNE_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("MUXTUNE_CACHE_DIR", None)
    else:
        os.environ["MUXTUNE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_llama_dir(private_model_cache: Path) -> Path:
    """builtin:tiny-llama materialized as a HF directory."""
    from muxtune.runtime.model_sources import resolve_model_dir

    return resolve_model_dir("builtin:tiny-llama")
