"""A smaller model of the same shape: the first N decoder layers of a Hugging Face LLaMA-family
model (its weights, tokenizer and config with ``num_hidden_layers: N``), for benchmarks that
need a model of real widths but fewer layers (a SmolLM2-shaped 8-layer model, say).

    python -m muxtune.tools.truncate_model builtin:smollm2-135m --layers 8 -o models/smollm2-8l
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from muxtune.common.cli import run_command
from muxtune.common.errors import UserError
from muxtune.common.files import atomic_write_text
from muxtune.runtime.model_sources import ModelSourceError, resolve_model_dir

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
CONFIG_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


class TruncateError(UserError):
    """A model that cannot be truncated as asked."""


def truncate_model(model: str, num_layers: int, out_dir: Path) -> Path:
    """Write the first ``num_layers`` decoder layers of ``model`` (a directory or builtin) to
    ``out_dir``: config, one safetensors file and the tokenizer files."""
    try:
        source = resolve_model_dir(model)
    except ModelSourceError as exc:
        raise TruncateError(f"model: {exc}") from None
    config = json.loads((source / "config.json").read_text())
    total = config.get("num_hidden_layers")
    if not isinstance(total, int) or not 1 <= num_layers <= total:
        raise TruncateError(f"--layers: must be between 1 and the model's {total} layers, got {num_layers}")
    weights = sorted(source.glob("*.safetensors"))
    if not weights:
        raise TruncateError(f"{source}: no *.safetensors weights to truncate")
    kept = {}
    for path in weights:
        for name, tensor in load_file(str(path)).items():
            match = _LAYER.search(name)
            if match is None or int(match.group(1)) < num_layers:
                kept[name] = tensor
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(out_dir / "model.safetensors"))
    for name in CONFIG_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, out_dir / name)
    config["num_hidden_layers"] = num_layers
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muxtune.tools.truncate_model", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a Hugging Face model directory or builtin:NAME")
    parser.add_argument("--layers", type=int, required=True, help="decoder layers to keep (the first N)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the directory to write")
    args = parser.parse_args(argv)

    def write() -> int:
        print(f"wrote {truncate_model(args.model, args.layers, args.output)}")
        return 0

    return run_command(parser.prog, write, debug=False)


if __name__ == "__main__":
    sys.exit(main())
