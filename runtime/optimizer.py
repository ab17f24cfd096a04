"""AdamW for one task's adapter parameters: `torch.optim.AdamW`'s arithmetic and state dict,
without `torch.optim`.

`torch.optim.Optimizer` imports `torch._dynamo` (sympy and more, ~1 s) the first time one of its
methods runs, which is most of `muxtune-run`'s start-up after torch itself. This class does what
`torch.optim.AdamW(params, lr, betas, eps, weight_decay)` does on its single-tensor,
non-capturable path, operation for operation (each operation issued once for all of a task's
parameters, `step`), so results are bitwise the same on the CPU; its state dict
has torch's layout (`state` by parameter index with `step`, `exp_avg`, `exp_avg_sq`, and
`param_groups`), so checkpoints load either way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")
"""The group entries this optimizer reads (a loaded group may carry torch's others too)."""


class AdamW:
    """Decoupled-weight-decay Adam over one parameter group (see module doc)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        group = {"params": list(params), "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.param_groups: list[dict[str, Any]] = [group]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters, in state-dict index order."""
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW update of every parameter that has a gradient. Parameters at the same step
        count are updated together, each operation once for all of them (`torch._foreach_*`:
        on the CPU the same per-tensor kernels as `torch.optim.AdamW`'s single-tensor path, on
        CUDA fused ones)."""
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = (group[key] for key in HYPERPARAMETERS)
            stepped = [param for param in group["params"] if param.grad is not None]
            states = [self._state_of(param) for param in stepped]
            steps = [state["step"] for state in states]
            if steps:
                torch._foreach_add_(steps, 1.0)
            by_step: dict[float, list[int]] = {}
            for index, step_t in enumerate(steps):
                by_step.setdefault(step_t.item(), []).append(index)
            for step, indices in by_step.items():
                params = [stepped[i] for i in indices]
                grads = [stepped[i].grad for i in indices]
                exp_avgs = [states[i]["exp_avg"] for i in indices]
                exp_avg_sqs = [states[i]["exp_avg_sq"] for i in indices]
                if weight_decay != 0:
                    torch._foreach_mul_(params, 1 - lr * weight_decay)
                torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
                torch._foreach_mul_(exp_avg_sqs, beta2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                denoms = torch._foreach_sqrt(exp_avg_sqs)
                torch._foreach_div_(denoms, bias_correction2**0.5)
                torch._foreach_add_(denoms, eps)
                torch._foreach_addcdiv_(params, exp_avgs, denoms, -step_size)

    def _state_of(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameter's step (a CPU float32 scalar) and moments, made at its first update."""
        state = self.state.get(param)
        if state is None:
            state = self.state[param] = {
                "step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
        return state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every parameter's gradient."""
        for param in self.params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.detach_().zero_()

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: per-parameter state by index, and the groups with parameter indices."""
        index = {id(p): i for i, p in enumerate(self.params)}
        state = {index[id(p)]: dict(entry) for p, entry in self.state.items()}
        groups = []
        for group in self.param_groups:
            saved = {key: value for key, value in group.items() if key != "params"}
            saved["params"] = [index[id(p)] for p in group["params"]]
            groups.append(saved)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from ``state_dict`` (this class's or `torch.optim.AdamW`'s); the moments are
        cast to their parameter's dtype and device, `step` stays a CPU float32 scalar."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            found = len(groups) if isinstance(groups, list) else 0
            raise ValueError(f"optimizer state has {found} parameter groups, expected {len(self.param_groups)}")
        for group, saved in zip(self.param_groups, groups):
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(
                    f"optimizer state has {len(saved.get('params', ()))} parameters in a group, "
                    f"expected {len(group['params'])}"
                )
        params = self.params
        state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for index, entry in state_dict.get("state", {}).items():
            param = params[int(index)]
            state[param] = {
                key: value.to(torch.float32) if key == "step" else value.to(dtype=param.dtype, device=param.device)
                for key, value in entry.items()
            }
        for group, saved in zip(self.param_groups, groups):
            for key in HYPERPARAMETERS:
                if key in saved:
                    group[key] = tuple(saved[key]) if key == "betas" else saved[key]
        self.state = state
