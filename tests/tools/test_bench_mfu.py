"""`muxtune-bench` on made-up models with MFU: ``random:llama-tiny`` is a transformers LLaMA of
the documented size, MFU is 4 x parameters x tokens over seconds and the peak, GPU peak memory
takes the place of RSS on CUDA, and a whole bench run on the tiny model reports MFU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from muxtune.runtime.model_sources import resolve_model_dir
from muxtune.tools import bench
from muxtune.tools.bench_mfu import PeakFlops, model_flop_utilization
from muxtune.tools.bench_models import RANDOM_MODELS, flop_parameters, random_model_config, random_weights
from muxtune.tools.bench_report import ConfigResult, RowResult, render_text, table_rows
from muxtune.tools.bench_workload import resolve_bench_model, workload, write_job


def test_random_tiny_model_loads_with_its_documented_size(tmp_path: Path) -> None:
    path, label = resolve_bench_model("random:llama-tiny", tmp_path)
    assert label.startswith("random:llama-tiny")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == RANDOM_MODELS["llama-tiny"].parameters == 3_268_928
    assert flop_parameters(Path(path)) == 3_268_928, "tied: the head counts, the embedding does not"
    assert transformers.AutoTokenizer.from_pretrained(path)("a b c")["input_ids"]
    stamp = (Path(path) / "model.safetensors").stat().st_mtime_ns
    assert resolve_bench_model("random:llama-tiny", tmp_path)[0] == path
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == stamp, "written once"


def test_random_weights_are_seeded() -> None:
    config = json.loads((resolve_model_dir("builtin:smollm2-135m") / "config.json").read_text())
    config = random_model_config(RANDOM_MODELS["llama-tiny"], config)
    first, second = random_weights(config), random_weights(config)
    assert first.keys() == second.keys() and "lm_head.weight" not in first
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(
        random_weights(config, seed=7)["model.embed_tokens.weight"], first["model.embed_tokens.weight"]
    )


def test_the_1b_config_has_its_documented_size() -> None:
    config = json.loads((resolve_model_dir("builtin:smollm2-135m") / "config.json").read_text())
    config = random_model_config(RANDOM_MODELS["llama-1b"], config)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    assert sum(p.numel() for p in model.parameters()) == RANDOM_MODELS["llama-1b"].parameters == 1_073_809_408


def test_untied_head_counts_once() -> None:
    """builtin:tiny-llama has an untied head: every weight but the embedding counts."""
    model_dir = resolve_model_dir("builtin:tiny-llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
    total = sum(p.numel() for p in model.parameters())
    assert flop_parameters(model_dir) == total - model.model.embed_tokens.weight.numel()


def test_mfu_arithmetic() -> None:
    # 4 x 1e9 parameters x 500 tokens = 2e12 FLOPs in 1 s against a 4 TFLOP/s peak: a half.
    assert model_flop_utilization(1_000_000_000, 500, 1.0, 4e12) == pytest.approx(0.5)
    assert model_flop_utilization(250, 10, 2.0, 100.0) == pytest.approx(50.0)


def test_table_reports_mfu_and_gpu_memory(tmp_path: Path) -> None:
    spec = write_job(tmp_path / "job.yaml", "builtin:tiny-llama", "bf16", workload(2), 1)
    config = ConfigResult("tiny", spec, device="cuda", flop_parameters=10**9, peak=PeakFlops(8e12, 8192, "H100"))
    rows = {
        "a": RowResult("a", 1000, 1000, 1.0, 2.0, (5 * 2**30, 9 * 2**30), (2**30,)),
        "b": RowResult("b", 1000, 1200, 2.0, 3.0, (7 * 2**30,), (3 * 2**30,)),
    }
    config.runs.update({key: [row] for key, row in rows.items()})
    header, a, b = table_rows(config)
    assert header[4] == "MFU" and header[9] == "peak GPU GiB"
    assert a[4] == "50.0%" and b[4] == "25.0%"
    assert a[9] == "1.00" and b[9] == "3.00" and a[10] == "3.00x", "GPU peaks, not RSS"
    text = render_text(config)
    assert "model FLOP utilization (a): 50.0%; goal on a GPU >= 50%: met" in text
    assert "MFU = 4 x 1,000,000,000 parameters" in text and "8.00 TFLOP/s measured (8192^3 bf16 matmul on H100)" in text


def test_whole_bench_on_the_random_tiny_model_reports_mfu(capsys) -> None:
    argv = ["--model", "random:llama-tiny", "--tasks", "2", "--steps", "1", "--rows", "a,b"]
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    assert re.search(r"bf16 peak [\d.,]+ TFLOP/s measured \(2048\^3 bf16 matmul on CPU", captured.out)
    table = captured.out
    assert "MFU" in table.splitlines()[1]
    for label in ("(a) MuxTune", "(b) transformers+peft"):
        line = next(line for line in table.splitlines() if line.startswith(label))
        assert re.search(r"\s\d+\.\d%\s", line.split("%", 1)[1]), f"an MFU figure in {line!r}"
    assert re.search(r"model FLOP utilization \(a\): \d+\.\d%\n", table), "no GPU goal verdict on the CPU"
    assert "MFU = 4 x 3,268,928 parameters" in table
