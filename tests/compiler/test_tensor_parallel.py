"""The compiler's tensor-parallel check: a backbone family without tensor-parallel layers is
refused when the spec fixes tensor_parallel above 1, and planned without it under auto; every
PEFT method has a split form on the LLaMA family."""

from __future__ import annotations

from pathlib import Path

import pytest
from user_path import DATA

from muxtune.compiler.compile import compile_job
from muxtune.compiler.errors import CompileError
from muxtune.compiler.tensor_parallel import tensor_parallel_problems
from muxtune.runtime.model_sources import resolve_model_dir
from muxtune.runtime.models import BackboneConfig, read_hf_config
from muxtune.specs import parse_job_spec

METHODS = [
    {"r": 4, "alpha": 8, "target_modules": ["q_proj", "o_proj", "gate_proj", "down_proj"]},
    {"r": 4, "alpha": 8, "target_modules": ["k_proj", "o_proj"], "use_dora": True},
    {"method": "ia3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    {"method": "bias", "target_modules": ["q_proj", "o_proj"]},
    {"method": "adapter", "bottleneck_size": 8},
    {"method": "prefix_tuning", "num_virtual_tokens": 3},
    {"method": "prompt_tuning", "num_virtual_tokens": 3},
]


def job(model: str, tensor_parallel: int | str, methods: list[dict]) -> dict:
    tasks = [
        {
            "name": f"t{i}",
            "peft": peft,
            "data": {"path": str(DATA / "sentiment.jsonl"), "format": "prompt_completion"},
            "max_seq_len": 200,
            "batch_size": 2,
            "steps": 1,
        }
        for i, peft in enumerate(methods)
    ]
    cluster = {"device": "cpu", "num_devices": 2, "pipeline_parallel": 1, "tensor_parallel": tensor_parallel}
    return {"model": model, "dtype": "fp32", "output_dir": "out", "cluster": cluster, "tasks": tasks}


def gpt2_config() -> BackboneConfig:
    hf = {"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}
    return BackboneConfig.from_hf_dict(hf)


def test_every_method_splits_on_the_llama_family() -> None:
    config = read_hf_config(resolve_model_dir("builtin:tiny-llama"))
    assert tensor_parallel_problems(config, parse_job_spec(job("builtin:tiny-llama", 2, METHODS))) == []


def test_a_family_without_tensor_parallel_layers_is_named() -> None:
    problems = tensor_parallel_problems(gpt2_config(), parse_job_spec(job("builtin:tiny-llama", 2, METHODS[:1])))
    assert problems == ["model: the gpt2 family has no tensor-parallel layers (the llama family has)"]


@pytest.mark.parametrize("degree", [2, "auto"])
def test_tensor_parallel_is_refused_when_fixed_and_left_out_under_auto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, degree: int | str
) -> None:
    monkeypatch.setattr("muxtune.compiler.compile.tensor_parallel_problems", lambda config, spec: ["model: no split"])
    spec = parse_job_spec(job("builtin:tiny-llama", degree, METHODS[:1]))
    if degree == "auto":
        assert compile_job(spec).plan.placement.tensor_parallel == 1
        return
    with pytest.raises(CompileError) as raised:
        compile_job(spec)
    assert raised.value.errors == ["cluster.tensor_parallel: 2: model: no split"]
