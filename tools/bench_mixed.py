"""An mLoRA-style mixed batch in transformers + peft, for training: every task's global batch in
one batch padded to its longest sequence, one pass through the frozen backbone, and each task's
LoRA applied to its own rows only.

peft's mixed-adapter batches (``adapter_names``) refuse training mode, so this keeps peft for
what it does well (one `PeftModel` holds every task's adapter, with peft's initialization,
scaling and saved form) and applies the adapters itself: peft's own adapter path is switched
off and a forward hook on each LoRA layer adds ``lora_B(lora_A(dropout(x))) * scaling`` (peft's
vanilla LoRA forward) to the rows of the adapter's task. The batch's rows are grouped by task,
so each task's rows are one contiguous block. Each task's loss is its own (summed target-token
NLL over its rows / their target count); their sum is backpropagated once, which gives each
adapter exactly its task's gradient, then each task clips and steps its own optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from muxtune.runtime.data import Example
from muxtune.specs import TaskSpec

from .bench_hf import TaskOptimizer, fp32_trainable, lora_config
from .hf_batches import padded_batch, padded_batch_loss


class MixedBatchLora:
    """One transformers + peft model with every task's LoRA adapter, trained on mixed batches."""

    def __init__(self, base: nn.Module, tasks: Sequence[TaskSpec]) -> None:
        from peft import get_peft_model
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        if any(getattr(t.peft, "use_dora", False) for t in tasks):
            raise ValueError("the mixed-batch baseline applies plain LoRA and rsLoRA, not DoRA")
        model = get_peft_model(base, lora_config(tasks[0].peft), adapter_name=tasks[0].name)
        for task in tasks[1:]:
            model.add_adapter(task.name, lora_config(task.peft))
        model.base_model.disable_adapter_layers()
        self.model = model
        self.rows: list[tuple[str, int]] = []
        params: dict[str, list[nn.Parameter]] = {t.name: [] for t in tasks}
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            if not isinstance(module, LoraLinear):
                raise ValueError(f"the mixed-batch baseline adapts linear layers only, not {type(module).__name__}")
            for name in module.lora_A:
                params[name] += [module.lora_A[name].weight, module.lora_B[name].weight]
            module.register_forward_hook(self._add_task_deltas)
        self.optimizers = {t.name: TaskOptimizer(t, fp32_trainable(params[t.name])) for t in tasks}

    def _add_task_deltas(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """The layer's output with each task's LoRA delta added to that task's rows."""
        counts = [count for _, count in self.rows]
        pieces = []
        for (name, _), x, out in zip(self.rows, torch.split(args[0], counts), torch.split(output, counts)):
            if name in layer.lora_A:
                lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
                delta = lora_B(lora_A(layer.lora_dropout[name](x.to(lora_A.weight.dtype)))) * layer.scaling[name]
                out = (out + delta).to(output.dtype)
            pieces.append(out)
        return torch.cat(pieces)

    def train_step(self, batches: Mapping[str, list[Example]], step: int) -> tuple[int, int]:
        """One optimizer step of every task in ``batches`` (0-based ``step``) on one mixed batch;
        (non-padding, padded) tokens."""
        names = [name for name in self.optimizers if name in batches]
        device = next(self.model.parameters()).device
        ids, mask, labels = padded_batch([e for name in names for e in batches[name]], device)
        self.rows = [(name, len(batches[name])) for name in names]
        counts = [count for _, count in self.rows]
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        blocks = zip(torch.split(logits, counts), torch.split(labels, counts))
        sum(padded_batch_loss(rows, targets) for rows, targets in blocks).backward()
        for name in names:
            self.optimizers[name].step(step)
        return int(mask.sum()), ids.numel()
