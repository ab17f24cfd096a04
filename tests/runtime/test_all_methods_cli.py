"""A job mixing all seven PEFT methods (LoRA, DoRA, (IA)^3, prefix tuning, prompt tuning,
bottleneck adapters, bias tuning) in one hTask on builtin:tiny-llama, through the command lines:
compile, run, resume after SIGKILL (bitwise equal), export (peft loads the methods it has,
with our logits), `init_from` of every method, and bad method parameters refused by path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from user_path import DATA, kill_run_when, read_jsonl, run_cli, write_job

from muxtune.runtime.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from muxtune.runtime.checkpoint import JOB_RECORD

METHODS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "dora": {"method": "lora", "r": 2, "alpha": 4, "use_dora": True, "target_modules": ["k_proj", "o_proj"]},
    "ia3": {"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"]},
    "prefix": {"method": "prefix_tuning", "num_virtual_tokens": 3},
    "prompt": {
        "method": "prompt_tuning",
        "num_virtual_tokens": 4,
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": "Answer the question:",
    },
    "adapter": {"method": "adapter", "variant": "houlsby", "bottleneck_size": 8, "non_linearity": "gelu"},
    "bias": {"method": "bias", "target_modules": ["v_proj", "up_proj"]},
}
PEFT_TYPES = {
    "lora": "LORA",
    "dora": "LORA",
    "ia3": "IA3",
    "prefix": "PREFIX_TUNING",
    "prompt": "PROMPT_TUNING",
    "adapter": "MUXTUNE_ADAPTER",
    "bias": "MUXTUNE_BIAS",
}
DATASETS = (("sentiment.jsonl", 200), ("qa.jsonl", 400), ("instructions.jsonl", 160))


def mixed_tasks(steps: int = 4) -> list[dict]:
    return [
        {
            "name": name,
            "peft": peft,
            "data": {"path": str(DATA / DATASETS[i % 3][0]), "format": "prompt_completion"},
            "max_seq_len": DATASETS[i % 3][1],
            "batch_size": 2,
            "lr": 5e-3,
            "steps": steps - i % 2,
            "seed": i,
            "save_every": 1,
        }
        for i, (name, peft) in enumerate(METHODS.items())
    ]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mixed")
    job = write_job(directory, mixed_tasks())
    compiled = run_cli("compile", str(job), "--fuse-all", "-o", str(directory / "plan.yaml"))
    assert compiled.returncode == 0, compiled.stderr
    result = run_cli("run", str(directory / "plan.yaml"))
    assert result.returncode == 0, result.stderr
    return directory


def test_all_methods_train_in_one_htask(mixed_run: Path) -> None:
    from muxtune.plans import load_plan

    plan = load_plan(mixed_run / "plan.yaml")
    assert [h.tasks for h in plan.phases[0].htasks] == [tuple(METHODS)]
    summary = json.loads((mixed_run / "out" / "summary.json").read_text())
    for task in mixed_tasks():
        name = task["name"]
        assert summary["tasks"][name]["status"] == "finished"
        losses = [m["loss"] for m in read_jsonl(mixed_run / "out" / name / "metrics.jsonl")]
        assert len(losses) == task["steps"] and all(torch.isfinite(torch.tensor(losses)))
        config = json.loads((mixed_run / "out" / name / CONFIG_NAME).read_text())
        assert config["peft_type"] == PEFT_TYPES[name]
        spec, _ = load_adapter(mixed_run / "out" / name)
        assert spec.method == task["peft"]["method"]


def test_resume_after_sigkill_equals_uninterrupted(mixed_run: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, mixed_tasks())
    assert run_cli("compile", str(job), "--fuse-all", "-o", str(tmp_path / "plan.yaml")).returncode == 0
    kill_run_when(tmp_path / "plan.yaml", tmp_path / "out" / JOB_RECORD)
    resumed = run_cli("run", str(tmp_path / "plan.yaml"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    from safetensors.torch import load_file

    for name in METHODS:
        expected = load_file(str(mixed_run / "out" / name / WEIGHTS_NAME))
        got = load_file(str(tmp_path / "out" / name / WEIGHTS_NAME))
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"{name}:{key} differs after resume"


@pytest.mark.parametrize("name", [n for n, t in PEFT_TYPES.items() if not t.startswith("MUXTUNE_")])
def test_peft_loads_exports_with_our_logits(mixed_run: Path, name: str) -> None:
    import transformers
    from peft import PeftModel

    from muxtune.runtime.backbone import load_model
    from muxtune.runtime.engine import MultiTaskEngine, TaskTraining
    from muxtune.runtime.layout import MicroBatchLayout
    from muxtune.runtime.packing import build_microbatch

    adapter_dir = mixed_run / "out" / name
    config = json.loads((adapter_dir / CONFIG_NAME).read_text())
    loaded = load_model("builtin:tiny-llama")
    assert Path(config["base_model_name_or_path"]) == loaded.model_dir.resolve()
    spec, state = load_adapter(adapter_dir)
    engine = MultiTaskEngine(loaded.model)
    engine.add_task(TaskTraining(name, spec, lr=1e-3, steps=1), init_state=state)
    ids = loaded.tokenizer.encode("Which color is the door?", add_special_tokens=True)
    from muxtune.runtime.data import Example

    example = engine.prepare(name, [Example(0, tuple(ids), tuple(False for _ in ids))])[0]
    mb = build_microbatch([(name, example)], scored_output_rows=False)
    assert isinstance(mb.layout, MicroBatchLayout)
    with torch.no_grad():
        ours = loaded.model(mb.input_ids_T, mb.position_ids_T, mb.layout)[-len(ids) :]
        hf = transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
        theirs = peft_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits[0]
    torch.testing.assert_close(ours, theirs[-len(ids) :], atol=1e-4, rtol=0)


def test_init_from_every_method(mixed_run: Path, tmp_path: Path) -> None:
    tasks = mixed_tasks(steps=1)
    for task in tasks:
        task.update(init_from=str(mixed_run / "out" / task["name"]), steps=1, save_every=0)
    job = write_job(tmp_path, tasks)
    assert run_cli("compile", str(job), "-o", str(tmp_path / "plan.yaml")).returncode == 0
    result = run_cli("run", str(tmp_path / "plan.yaml"))
    assert result.returncode == 0, result.stderr
    for task in tasks:
        first = read_jsonl(tmp_path / "out" / task["name"] / "metrics.jsonl")[0]["loss"]
        start = read_jsonl(mixed_run / "out" / task["name"] / "metrics.jsonl")[0]["loss"]
        assert first != start, f"{task['name']}: init_from changed nothing"


def test_init_from_of_another_method_is_refused(mixed_run: Path, tmp_path: Path) -> None:
    tasks = mixed_tasks(steps=1)[:1]
    tasks[0]["init_from"] = str(mixed_run / "out" / "ia3")
    result = run_cli("compile", str(write_job(tmp_path, tasks)), "-o", str(tmp_path / "plan.yaml"))
    assert result.returncode == 2
    assert "tasks[0].init_from: the adapter is a ia3 adapter, the task uses lora" in result.stderr
    assert not (tmp_path / "plan.yaml").exists()


def test_bad_method_parameters_are_refused_with_field_paths(tmp_path: Path) -> None:
    tasks = mixed_tasks()
    tasks[3]["peft"] = {**tasks[3]["peft"], "num_virtual_tokens": 0}
    tasks[5]["peft"] = {**tasks[5]["peft"], "variant": "parallel"}
    tasks[6]["peft"] = {**tasks[6]["peft"], "target_modules": ["nothing_here"]}
    result = run_cli("compile", str(write_job(tmp_path, tasks)), "-o", str(tmp_path / "plan.yaml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "tasks[3].peft.num_virtual_tokens: must be a positive integer, got 0" in result.stderr
    assert "tasks[5].peft.variant: must be one of 'houlsby', 'pfeiffer', got 'parallel'" in result.stderr
    assert not (tmp_path / "plan.yaml").exists()
    tasks = mixed_tasks()
    tasks[6]["peft"] = {**tasks[6]["peft"], "target_modules": ["nothing_here"]}
    result = run_cli("compile", str(write_job(tmp_path, tasks)), "-o", str(tmp_path / "plan.yaml"))
    assert result.returncode == 2
    assert "tasks[6].peft.target_modules: ['nothing_here'] match no linear operator of the model" in result.stderr


def test_virtual_tokens_count_toward_the_position_limit(tmp_path: Path) -> None:
    from muxtune.runtime.model_sources import resolve_model_dir
    from muxtune.runtime.models import read_hf_config

    limit = read_hf_config(resolve_model_dir("builtin:tiny-llama")).max_position_embeddings
    tasks = mixed_tasks()[4:5]
    tasks[0]["max_seq_len"] = limit - 1
    result = run_cli("compile", str(write_job(tmp_path, tasks)), "-o", str(tmp_path / "plan.yaml"))
    assert result.returncode == 2
    assert (
        f"tasks[0].max_seq_len: {limit - 1} plus the method's 4 virtual tokens exceeds the model's "
        f"max_position_embeddings ({limit})" in result.stderr
    )
