"""Profile files (`muxtune-profile`): round trips, bad files named by file and field, and the
command line on builtin:tiny-llama."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from muxtune.compiler.cost.profile import (
    COMPONENTS,
    PROFILE_VERSION,
    Measurement,
    Profile,
    ProfileError,
    dump_profile,
    load_profile,
    profile_to_dict,
    save_profile,
)
from muxtune.compiler.profile_cli import main as profile_main


def sample_profile() -> Profile:
    measurements = (
        Measurement("layers_forward", 512, 64, 0, 0, 0.12),
        Measurement("layers_backward", 512, 64, 0, 0, 0.25),
        Measurement("loss", 512, 64, 256, 0, 0.01),
        Measurement("optimizer", 0, 0, 0, 3584, 0.0005),
    )
    return Profile(
        version=PROFILE_VERSION,
        device="cpu",
        dtype="bf16",
        machine="AMD EPYC, 2 cores, torch 2.13.0",
        threads=2,
        matmul_flops=7.5e11,
        memory_bandwidth=2.5e10,
        op_overhead_seconds=2.0e-6,
        runtime_bytes=230_000_000,
        model="builtin:tiny-llama",
        backbone={"family": "llama", "hidden_size": 64, "eos_token_id": [1, 2], "rope_scaling": None},
        lora_rank=8,
        measurements=measurements,
    )


def test_round_trip_is_exact_and_deterministic(tmp_path: Path) -> None:
    profile = sample_profile()
    path = save_profile(profile, tmp_path / "prof.yaml")
    assert load_profile(path) == profile
    assert path.read_text() == dump_profile(profile) == dump_profile(load_profile(path))
    assert list(yaml.safe_load(path.read_text())) == list(profile_to_dict(profile))


def test_rates_only_profile_round_trips(tmp_path: Path) -> None:
    profile = dataclasses.replace(sample_profile(), model=None, backbone=None, measurements=())
    assert load_profile(save_profile(profile, tmp_path / "rates.yaml")) == profile


def _set(key: str, value: object) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        data[key] = value

    return mutate


def _drop(key: str) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        del data[key]

    return mutate


def _measure(index: int, **fields: object) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        data["measurements"][index].update(fields)

    return mutate


BAD_FIELDS = {
    "missing key": (_drop("matmul_flops"), "matmul_flops: missing required key"),
    "wrong type": (_set("threads", "two"), "threads: must be a positive integer, got 'two'"),
    "unknown key": (_set("gpu_flops", 1.0), "gpu_flops: unknown key"),
    "unknown component": (_measure(1, component="attention"), "measurements[1].component: unsupported component"),
    "negative seconds": (_measure(2, seconds=-1), "measurements[2].seconds: must be a positive number, got -1"),
    "bad dtype": (_set("dtype", "int8"), "dtype: unsupported dtype 'int8'"),
    "optimizer with tokens": (_measure(3, tokens=5), "measurements[3].tokens: must be 0 for component optimizer"),
    "ragged sequences": (_measure(0, sequence_length=60), "measurements[0].tokens: must be a multiple of"),
    "loss without targets": (_measure(2, target_tokens=0), "measurements[2].target_tokens: must be positive"),
    "measurements not a list": (_set("measurements", {"a": 1}), "measurements: must be a list"),
    "rates only with measurements": (_set("model", None), "backbone: must be given exactly when model is"),
    "missing component": (
        lambda data: data["measurements"].pop(3),
        "measurements: has no measurement of optimizer",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_FIELDS))
def test_bad_field_names_file_and_field(tmp_path: Path, name: str) -> None:
    mutate, expected = BAD_FIELDS[name]
    data = profile_to_dict(sample_profile())
    mutate(data)
    path = tmp_path / "prof.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ProfileError) as raised:
        load_profile(path)
    assert f"{path}: {expected}" in str(raised.value)


def test_every_problem_is_listed(tmp_path: Path) -> None:
    data = profile_to_dict(sample_profile())
    data["threads"] = 0
    data["measurements"][0]["seconds"] = "fast"
    path = tmp_path / "prof.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ProfileError) as raised:
        load_profile(path)
    assert raised.value.errors == [
        f"{path}: threads: must be a positive integer, got 0",
        f"{path}: measurements[0].seconds: must be a positive number, got 'fast'",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 2\n", "version: this muxtune reads profile version 1, the file has 2"),
        ("device: cpu\n", "version: missing required key"),
        ("version: 1\nthreads: [1\n", "invalid YAML"),
        ("- 1\n- 2\n", "must be a mapping of profile fields"),
        ("", "the profile file is empty"),
    ],
)
def test_unreadable_files(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "prof.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError) as raised:
        load_profile(path)
    message = str(raised.value)
    assert message.startswith(str(path)) and expected in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="file not found"):
        load_profile(tmp_path / "absent.yaml")


def test_cli_quick_profile_of_tiny_llama(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out" / "profile.yaml"
    started = time.perf_counter()
    code = profile_main(["--model", "builtin:tiny-llama", "--dtype", "fp32", "--quick", "-o", str(output)])
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"wrote {output}" in captured.out and "layers_forward" in captured.out
    profile = load_profile(output)
    assert (profile.model, profile.dtype, profile.device, profile.lora_rank) == ("builtin:tiny-llama", "fp32", "cpu", 8)
    assert profile.backbone is not None and profile.backbone["hidden_size"] == 64
    assert min(profile.matmul_flops, profile.memory_bandwidth, profile.op_overhead_seconds) > 0
    assert profile.runtime_bytes > 50 * 2**20 and profile.threads >= 1
    assert {m.component for m in profile.measurements} == set(COMPONENTS)
    (forward,) = profile.find("layers_forward")
    assert (forward.tokens, forward.sequence_length) == (128, 64)
    assert profile.find("loss")[0].target_tokens == 64
    # LoRA r8 on q_proj (64 -> 64) and v_proj (64 -> 32) in each of 2 layers
    assert profile.find("optimizer")[0].trainable_parameters == 2 * (8 * (64 + 64) + 8 * (64 + 32))
    assert elapsed < 60


def test_cli_rates_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "rates.yaml"
    assert profile_main(["--quick", "--threads", "1", "-o", str(output)]) == 0
    profile = load_profile(output)
    assert profile.model is None and profile.measurements == () and profile.threads == 1
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("model", "expected"),
    [("builtin:nope", "unknown builtin model 'builtin:nope'"), ("no/such/dir", "model directory not found")],
)
def test_cli_bad_model_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str, expected: str
) -> None:
    output = tmp_path / "profile.yaml"
    assert profile_main(["--model", model, "--quick", "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("muxtune-profile: error: ") and expected in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_output_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert profile_main(["--quick", "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
