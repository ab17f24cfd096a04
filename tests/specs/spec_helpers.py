"""The base job spec that spec tests edit."""

from __future__ import annotations

from typing import Any


def base_spec() -> dict[str, Any]:
    return {
        "model": "builtin:tiny-llama",
        "dtype": "fp32",
        "output_dir": "runs/demo",
        "tasks": [
            {
                "name": "sentiment",
                "peft": {
                    "method": "lora",
                    "r": 8,
                    "alpha": 16,
                    "dropout": 0.0,
                    "target_modules": ["q_proj", "v_proj"],
                },
                "data": {"path": "data/sentiment.jsonl", "format": "prompt_completion"},
                "schedule": {"name": "cosine", "warmup_steps": 5},
            },
            {"name": "qa", "data": {"path": "data/qa.jsonl", "format": "text"}},
        ],
    }
