"""The spec's `peft` union: each method's fields, defaults and errors under their field paths,
and plans storing every method's resolved config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from spec_helpers import base_spec

from muxtune.specs import (
    PEFT_METHODS,
    AdapterSpec,
    BiasSpec,
    IA3Spec,
    LoraSpec,
    PrefixTuningSpec,
    PromptTuningSpec,
    SpecError,
    job_spec_to_dict,
    parse_job_spec,
)

VALID = {
    "lora": ({"r": 4, "use_dora": True}, LoraSpec(r=4, use_dora=True)),
    "ia3": (
        {"target_modules": ["k_proj", "down_proj"]},
        IA3Spec(target_modules=("k_proj", "down_proj"), feedforward_modules=("down_proj",)),
    ),
    "prefix_tuning": (
        {"num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16},
        PrefixTuningSpec(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16),
    ),
    "prompt_tuning": (
        {"num_virtual_tokens": 3, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Classify:"},
        PromptTuningSpec(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="Classify:"),
    ),
    "adapter": ({"variant": "pfeiffer", "bottleneck_size": 8}, AdapterSpec(variant="pfeiffer", bottleneck_size=8)),
    "bias": ({"target_modules": ["o_proj"]}, BiasSpec(target_modules=("o_proj",))),
}


def with_peft(peft: Any) -> dict[str, Any]:
    raw = base_spec()
    raw["tasks"][0]["peft"] = peft
    return raw


def errors(job_dir: Path, peft: Any) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_job_spec(with_peft(peft), job_dir)
    return info.value.errors


def test_every_method_has_a_case() -> None:
    assert set(VALID) == set(PEFT_METHODS)


@pytest.mark.parametrize("method", list(VALID))
def test_method_fields_parse_and_round_trip(method: str, job_dir: Path) -> None:
    fields, expected = VALID[method]
    spec = parse_job_spec(with_peft({"method": method, **fields}), job_dir)
    assert spec.tasks[0].peft == expected
    assert parse_job_spec(job_spec_to_dict(spec), job_dir) == spec


@pytest.mark.parametrize("method", list(VALID))
def test_method_defaults(method: str, job_dir: Path) -> None:
    spec = parse_job_spec(with_peft({"method": method}), job_dir)
    assert spec.tasks[0].peft == type(VALID[method][1])()


@pytest.mark.parametrize(
    ("peft", "message"),
    [
        ({"method": "prefix_tuning", "num_virtual_tokens": 0}, "num_virtual_tokens: must be a positive integer, got 0"),
        (
            {"method": "prompt_tuning", "num_virtual_tokens": -2},
            "num_virtual_tokens: must be a positive integer, got -2",
        ),
        ({"method": "prompt_tuning", "prompt_tuning_init": "TEXT"}, "prompt_tuning_init_text: is required with"),
        ({"method": "prompt_tuning", "prompt_tuning_init": "SAMPLE"}, "prompt_tuning_init: must be one of"),
        ({"method": "prompt_tuning", "prompt_tuning_init_text": "hi"}, "prompt_tuning_init_text: is only used with"),
        ({"method": "prefix_tuning", "encoder_hidden_size": 8}, "encoder_hidden_size: is only used with"),
        ({"method": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, "must be a subset"),
        ({"method": "ia3", "r": 4}, "r: unknown key"),
        ({"method": "adapter", "variant": "parallel"}, "variant: must be one of 'houlsby', 'pfeiffer'"),
        ({"method": "adapter", "bottleneck_size": 0}, "bottleneck_size: must be a positive integer, got 0"),
        ({"method": "adapter", "non_linearity": "softmax"}, "non_linearity: must be one of"),
        ({"method": "bias", "target_modules": []}, "target_modules: must be a non-empty list of module names"),
        ({"method": "lora", "use_dora": "yes"}, "use_dora: must be true or false, got 'yes'"),
        ({"method": "lora", "num_virtual_tokens": 4}, "num_virtual_tokens: unknown key"),
        ("lora", "tasks[0].peft: must be a mapping, got 'lora'"),
    ],
)
def test_bad_method_fields_name_their_path(peft: Any, message: str, job_dir: Path) -> None:
    found = errors(job_dir, peft)
    assert len(found) == 1 and message in found[0], found
    assert found[0].startswith("tasks[0].peft")


def test_all_errors_of_a_method_at_once(job_dir: Path) -> None:
    found = errors(job_dir, {"method": "adapter", "bottleneck_size": 0, "non_linearity": "x", "r": 2})
    assert len(found) == 3
    assert found[0] == "tasks[0].peft.r: unknown key"
