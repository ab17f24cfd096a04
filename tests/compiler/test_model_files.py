"""Hostile model files (config.json, tokenizer_config.json, safetensors and their index) fail at
compile time through the real CLI: exit status 2, the file named, no traceback, a short message,
nothing written. A LoRA rank wider than a targeted layer is a note, not an error."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from user_path import default_tasks, run_cli, snapshot, write_job

from muxtune.compiler.cli import main as compile_main

MAX_OUTPUT = 10_000
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture
def model_dir(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A private copy of builtin:tiny-llama's folder, to corrupt."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


def edit_config(**fields: object) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        config.update(fields)
        (model / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))

    return mutate


def write_text(name: str, text: str) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        (model / name).write_text(text)

    return mutate


def truncate_weights(model: Path) -> None:
    data = (model / WEIGHTS).read_bytes()
    (model / WEIGHTS).write_bytes(data[: len(data) // 2])


def garbage_weights(model: Path) -> None:
    (model / WEIGHTS).write_bytes(b"this is not a safetensors file\n" * 100)


def reshape_one_tensor(model: Path) -> None:
    state = load_file(model / WEIGHTS)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 3)
    save_file(state, model / WEIGHTS)


def integer_tensor(model: Path) -> None:
    state = load_file(model / WEIGHTS)
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
    save_file(state, model / WEIGHTS)


def shard(model: Path, index_text: str | None = None) -> None:
    """Split the weights into two shards with an index (or `index_text` as the index file)."""
    state = load_file(model / WEIGHTS)
    (model / WEIGHTS).unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, model / file)
        weight_map.update(dict.fromkeys(keys, file))
    (model / INDEX).write_text(index_text if index_text is not None else json.dumps({"weight_map": weight_map}))


MODEL_CASES = {
    "config.json not JSON": (write_text("config.json", '{"model_type": "llama",'), "config.json", ["invalid JSON"]),
    "config.json a JSON list": (write_text("config.json", "[1, 2, 3]"), "config.json", ["expected a JSON object"]),
    "config.json without hidden_size": (edit_config(hidden_size=None), "config.json", ["hidden_size"]),
    "config.json hidden_size a list": (edit_config(hidden_size=[64]), "config.json", ["unusable value"]),
    "config.json zero heads": (edit_config(num_attention_heads=0, head_dim=None), "config.json", []),
    "config.json negative head_dim": (edit_config(head_dim=-16), "config.json", ["do not make a model"]),
    "config.json huge integer": (
        write_text("config.json", '{"model_type": "llama", "hidden_size": ' + "9" * 5000 + "}"),
        "config.json",
        ["invalid JSON", "5000 digits"],
    ),
    "config.json deeply nested": (write_text("config.json", "[" * 100_000), "config.json", ["nested too deeply"]),
    "tokenizer_config.json not JSON": (write_text("tokenizer_config.json", "{oops"), "tokenizer_config.json", []),
    "eos_token_id outside the vocabulary": (
        lambda model: ((model / "tokenizer_config.json").unlink(), edit_config(eos_token_id=10**6)(model)),
        "config.json",
        ["eos_token_id"],
    ),
    "truncated model.safetensors": (truncate_weights, WEIGHTS, ["truncated or corrupt"]),
    "garbage model.safetensors": (garbage_weights, WEIGHTS, ["truncated or corrupt"]),
    "wrong tensor shape": (reshape_one_tensor, WEIGHTS, ["model.layers.1.mlp.up_proj.weight (7, 3) != (160, 64)"]),
    "integer tensor": (integer_tensor, WEIGHTS, ["model.norm.weight"]),
    "index not JSON": (lambda model: shard(model, '{"weight_map": '), INDEX, ["invalid JSON"]),
    "index without weight_map": (lambda model: shard(model, "{}"), INDEX, ["weight_map"]),
    "index with a non-string file": (
        lambda model: shard(model, json.dumps({"weight_map": {"lm_head.weight": 3}})),
        INDEX,
        ["file names"],
    ),
}


def compile_output(spec: Path, out: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str]:
    code = compile_main([str(spec), "-o", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_file_fails_compile_cleanly(
    case: str, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    corrupt, file, expected = MODEL_CASES[case]
    corrupt(model_dir)
    spec = write_job(tmp_path, default_tasks()[:1], model=str(model_dir))
    before = snapshot(tmp_path)
    code, output = compile_output(spec, tmp_path / "plan.yaml", capsys)
    assert code == 2, output
    for text in [f"model: {model_dir / file}", *expected]:
        assert text in output, f"{text!r} not in: {output}"
    assert "Traceback" not in output
    assert len(output) < MAX_OUTPUT
    assert not (tmp_path / "plan.yaml").exists()
    assert snapshot(tmp_path) == before


def test_sharded_checkpoint_compiles(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shard(model_dir)
    spec = write_job(tmp_path, default_tasks()[:1], model=str(model_dir))
    code, output = compile_output(spec, tmp_path / "plan.yaml", capsys, "--validate")
    assert code == 0, output


def test_rank_wider_than_a_layer_is_a_note(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tasks = default_tasks()[1:2]
    tasks[0]["peft"]["r"] = 96
    spec = write_job(tmp_path, tasks)
    code, output = compile_output(spec, tmp_path / "plan.yaml", capsys)
    assert code == 0, output
    assert (
        "note: tasks.qa.peft.r: 96 exceeds the width of model.layers.0.self_attn.k_proj (64 -> 32) and of 7 more "
        "targeted layers; ranks above 32 add parameters without adding capacity"
    ) in output
    assert (tmp_path / "plan.yaml").is_file()


def test_rank_within_every_layer_has_no_note(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tasks = default_tasks()[1:2]
    tasks[0]["peft"]["r"] = 32
    code, output = compile_output(write_job(tmp_path, tasks), tmp_path / "plan.yaml", capsys, "--validate")
    assert code == 0, output
    assert "peft.r" not in output


def test_weights_truncated_after_compile_fail_the_run_cleanly(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = write_job(tmp_path, default_tasks()[:1], model=str(model_dir))
    code, output = compile_output(spec, tmp_path / "plan.yaml", capsys)
    assert code == 0, output
    truncate_weights(model_dir)
    result = run_cli("run", str(tmp_path / "plan.yaml"))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert str(model_dir / WEIGHTS) in output and "Traceback" not in output
    assert len(output) < MAX_OUTPUT
    assert not (tmp_path / "out").exists()
