"""The package list in pyproject.toml names every package of the source tree, so a regular
(non-editable) install carries all of them."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("common", "compiler", "runtime", "kernels", "plans", "specs", "tools")


def test_every_source_package_is_installed() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    directories = {
        "muxtune." + ".".join(init.parent.relative_to(REPO).parts): init.parent.relative_to(REPO).as_posix()
        for top in TOP_LEVEL
        for init in (REPO / top).rglob("__init__.py")
    }
    assert sorted(setuptools["packages"]) == sorted(directories)
    assert setuptools["package-dir"] == {name: directories[name] for name in setuptools["packages"]}


def test_c_sources_are_installed_with_their_package() -> None:
    """Kernel sources and headers built at run time (`kernels/cpu_fused.c`, `cpu_bf16.h`) are package data."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    sources = [path for top in TOP_LEVEL for path in (REPO / top).rglob("*.[ch]")]
    assert sources
    for source in sources:
        package = "muxtune." + ".".join(source.parent.relative_to(REPO).parts)
        patterns = setuptools["package-data"].get(package, [])
        assert any(source.match(pattern) for pattern in patterns), f"{source} is not in {package}'s package-data"
