"""The fused multi-task training engine.

A frozen backbone runs once over packed micro-batches holding several tasks' sequences; each
task's PEFT modules adapt only their own segment. Each task has its own loss normalizer, AdamW
optimizer, LR schedule and gradient clipping (DESIGN section 4), so a task's result does not
depend on which other tasks share its micro-batches. Single-task training is this engine with
one task.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from muxtune.specs import PeftSpec

from .data import Example
from .layout import MicroBatchLayout, host_to_device
from .loss import FrozenHead, linear_cross_entropy
from .optimizer import AdamW
from .packing import IGNORE_INDEX, MicroBatch, pack_microbatches
from .peft import attach_task, detach_task, prepare_examples
from .schedules import lr_multiplier
from .sharding import local_part, shard_modules

ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8
DROPOUT_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class TaskTraining:
    """A task's trainable configuration as the engine needs it."""

    name: str
    peft: PeftSpec
    lr: float
    steps: int
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0
    seed: int = 0


class TaskStatus(str, enum.Enum):
    ACTIVE = "active"
    FINISHED = "finished"
    DIVERGED = "diverged"


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step of one task did."""

    task: str
    step: int  # 1-based number of the step just taken (or attempted, when diverged)
    loss: float
    lr: float
    grad_norm: float
    num_target_tokens: int
    num_tokens: int
    diverged: bool


@dataclass
class TaskState:
    """A task inside the engine: its modules, optimizer and progress."""

    config: TaskTraining
    modules: dict[str, nn.Module]
    optimizer: AdamW
    dropout_generator: torch.Generator
    step: int = 0
    status: TaskStatus = TaskStatus.ACTIVE
    pending_loss: float | torch.Tensor = 0.0
    """Summed cross-entropy of the step so far: a float64 device tensor once a row is scored
    (read back once per step)."""
    pending_target_tokens: int = 0
    pending_tokens: int = 0
    normalizer: int = 0

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for module in self.modules.values() for p in module.parameters()]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors keyed `<anchor>.<param>` (e.g. `model.layers.0.self_attn.q_proj.lora_A.weight`)."""
        return {
            f"{anchor}.{name}": p.detach().clone()
            for anchor, module in self.modules.items()
            for name, p in module.named_parameters()
        }


class MultiTaskEngine:
    """Trains any number of tasks' PEFT modules on one frozen backbone."""

    def __init__(
        self,
        model: nn.Module,
        *,
        param_dtype: torch.dtype = torch.float32,
        encode: Callable[[str], list[int]] | None = None,
    ):
        """`encode` is the job's tokenizer (methods initialized from text need it)."""
        self.model = model
        self.param_dtype = param_dtype
        self.encode = encode
        self.tasks: dict[str, TaskState] = {}
        self.device = next(model.parameters()).device
        for p in model.parameters():
            p.requires_grad_(False)
        self._frozen_head: FrozenHead | None = None
        self._frozen_head_lock = threading.Lock()  # lanes may reach their first loss at once

    def add_task(self, config: TaskTraining, init_state: dict[str, torch.Tensor] | None = None) -> TaskState:
        """Attach a task's modules (seeded init, or `init_state` from an adapter) and its optimizer."""
        if config.name in self.tasks:
            raise ValueError(f"task {config.name} is already in the engine")
        dropout_generator = torch.Generator().manual_seed(config.seed + DROPOUT_SEED_OFFSET)
        modules = attach_task(
            self.model,
            config.name,
            config.peft,
            seed=config.seed,
            dropout_generator=dropout_generator,
            dtype=self.param_dtype,
            encode=self.encode,
        )
        if init_state is not None:
            load_task_state(config.name, modules, init_state)
        shard_modules(modules, self.model)
        params = [p for module in modules.values() for p in module.parameters()]
        optimizer = AdamW(params, lr=config.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=config.weight_decay)
        state = TaskState(config=config, modules=modules, optimizer=optimizer, dropout_generator=dropout_generator)
        self.tasks[config.name] = state
        return state

    def remove_task(self, name: str) -> None:
        """Detach a task; the others are untouched."""
        detach_task(self.model, name)
        del self.tasks[name]

    def forward_backward(
        self, task_batches: dict[str, list[Example]], token_budgets: dict[str, int]
    ) -> list[MicroBatch]:
        """Accumulate gradients of each task's loss over its global batch.

        Each task's batch is split into pieces of at most `token_budgets[task]` tokens and the
        i-th pieces of all tasks form micro-batch i (see `pack_microbatches`).

        Each task's loss is the sum of its target-token NLL divided by the number of target
        tokens in its whole global batch, so splitting into micro-batches changes nothing.
        """
        task_batches = {task: self.prepare(task, batch) for task, batch in task_batches.items()}
        for task, batch in task_batches.items():
            self.begin_batch(task, batch)
        microbatches = pack_microbatches(task_batches, token_budgets)
        for microbatch in microbatches:
            self._run_microbatch(microbatch)
        return microbatches

    def prepare(self, task: str, batch: list[Example]) -> list[Example]:
        """A task's sequences as its method lays them out in micro-batches (virtual tokens,
        shifted positions); what `begin_batch` and packing take."""
        return prepare_examples(self.tasks[task].config.peft, batch)

    def begin_batch(self, task: str, batch: list[Example]) -> None:
        """Start a task's global batch: its loss normalizer is the target tokens of all of it."""
        state = self.tasks[task]
        assert state.status is TaskStatus.ACTIVE, f"task {task} is {state.status.value}"
        state.normalizer = sum(e.num_targets for e in batch)
        assert state.normalizer > 0, f"task {task}: a global batch without target tokens"

    def _run_microbatch(self, mb: MicroBatch) -> None:
        loss = self.forward_microbatch(mb)
        if loss is not None and loss.requires_grad:
            loss.backward()

    def forward_microbatch(self, mb: MicroBatch) -> torch.Tensor | None:
        """Forward one micro-batch and return the sum of its tasks' normalized losses (None when
        no token is scored); the caller runs its backward, possibly after other micro-batches'
        forwards, since the layout travels with the micro-batch. Records each task's pending
        loss and token counts; the tasks' normalizers must be set (see `forward_backward`)."""
        input_ids_T = host_to_device(mb.input_ids_T, self.device)
        position_ids_T = host_to_device(mb.position_ids_T, self.device)
        return self.segment_losses(self.model.hidden_states(input_ids_T, position_ids_T, mb.layout), mb)

    def segment_losses(self, hidden_TC: torch.Tensor, mb: MicroBatch) -> torch.Tensor | None:
        """The sum of the micro-batch's tasks' normalized losses from its final hidden states
        (of every row, or of the layout's output rows when it declares them; None when no token
        is scored), recording each task's pending loss and token counts.

        Which rows are scored is worked out on the host (the targets are host tensors) and
        each task's losses are summed on the device, so nothing here waits for the device."""
        kept = mb.layout.output_rows
        targets_T = mb.targets_T if kept is None else mb.targets_T.index_select(0, kept.rows_N)
        rows = {seg.task: (seg.start, seg.end) for seg in (mb.layout if kept is None else kept.layout).segments}
        total = None
        for seg in mb.layout.segments:
            # Logits only for scored rows, and one head call per task: a task's loss then never
            # depends on how many rows other tasks bring (small GEMMs pick other BLAS kernels).
            state = self.tasks[seg.task]
            state.pending_tokens += seg.end - seg.start
            start, end = rows.get(seg.task, (0, 0))
            scored_N = (targets_T[start:end] != IGNORE_INDEX).nonzero().squeeze(1)
            num_scored = int(scored_N.shape[0])
            state.pending_target_tokens += num_scored
            if num_scored == 0:
                continue
            targets_N = host_to_device(targets_T[start:end].index_select(0, scored_N), self.device)
            hidden_NC = hidden_TC[start:end].index_select(0, host_to_device(scored_N, self.device))
            task_nll, term = self._task_loss(seg.task, hidden_NC, targets_N, 1.0 / state.normalizer)
            state.pending_loss = state.pending_loss + task_nll.detach().double()
            total = term if total is None else total + term
        return total

    def _task_loss(
        self, task: str, hidden_NC: torch.Tensor, targets_N: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the task's summed cross-entropy on these rows, that sum times ``scale``): fused with
        a frozen, bias-free head (`linear_cross_entropy`), through the head host otherwise."""
        head = self.model.lm_head
        if task not in head.adapters and head.bias is None and not head.weight.requires_grad:
            return linear_cross_entropy(hidden_NC, self._frozen(head.weight), targets_N, scale)
        logits_NV = head(hidden_NC, MicroBatchLayout.single_task(task, hidden_NC.shape[0]))
        task_nll = F.cross_entropy(logits_NV.float(), targets_N, reduction="sum")
        return task_nll, task_nll * scale

    def _frozen(self, weight_VC: torch.Tensor) -> FrozenHead:
        """The `FrozenHead` of the head's weight, made once (again if the weight was replaced)."""
        with self._frozen_head_lock:
            if self._frozen_head is None or self._frozen_head.weight_VC is not weight_VC:
                self._frozen_head = FrozenHead(weight_VC)
            return self._frozen_head

    def optimizer_step(self, task: str) -> StepResult:
        """Clip, schedule and step one task after its global batch.

        A non-finite loss or gradient norm (the step is skipped), or parameters made non-finite
        by the step, mark the task diverged; it takes no further steps.
        """
        state = self.tasks[task]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(state.parameters, state.config.max_grad_norm))
        loss = float(state.pending_loss) / max(1, state.normalizer)
        lr, stepped = self.apply_update(task, loss, grad_norm)
        diverged = not stepped or not self.parameters_finite(task)
        return self.finish_step(task, loss, lr, grad_norm, diverged, state.pending_target_tokens, state.pending_tokens)

    def apply_update(self, task: str, loss: float, grad_norm: float) -> tuple[float, bool]:
        """Set the task's scheduled learning rate and step its optimizer on the (already
        clipped) gradients, unless ``loss`` or ``grad_norm`` is non-finite. Returns the learning
        rate and whether the optimizer stepped."""
        state = self.tasks[task]
        cfg = state.config
        lr = cfg.lr * lr_multiplier(cfg.schedule, state.step, cfg.warmup_steps, cfg.steps)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return lr, False
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        state.optimizer.step()
        return lr, True

    def parameters_finite(self, task: str) -> bool:
        """Whether every trainable parameter of the task is finite."""
        parameters = [p for p in self.tasks[task].parameters if p.numel() > 0]
        if not parameters:
            return True
        largest = torch._foreach_max(torch._foreach_abs(parameters))
        return bool(torch.isfinite(torch.stack(largest)).all())

    def finish_step(
        self,
        task: str,
        loss: float,
        lr: float,
        grad_norm: float,
        diverged: bool,
        num_target_tokens: int,
        num_tokens: int,
    ) -> StepResult:
        """Close the task's step: zero its gradients, count the step, set its status (diverged,
        or finished after its last step) and reset its pending figures."""
        state = self.tasks[task]
        if diverged:
            state.status = TaskStatus.DIVERGED
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        result = StepResult(
            task=task,
            step=state.step,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            num_target_tokens=num_target_tokens,
            num_tokens=num_tokens,
            diverged=diverged,
        )
        state.pending_loss, state.pending_target_tokens, state.pending_tokens, state.normalizer = 0.0, 0, 0, 0
        if not diverged and state.step >= state.config.steps:
            state.status = TaskStatus.FINISHED
        return result

    def train_round(self, task_batches: dict[str, list[Example]], token_budgets: dict[str, int]) -> list[StepResult]:
        """One fused round: every given task does one optimizer step on its global batch."""
        self.forward_backward(task_batches, token_budgets)
        return [self.optimizer_step(task) for task in task_batches]


def load_task_state(task: str, modules: dict[str, nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Copy `<anchor>.<param>` tensors into a task's modules; every parameter must be given
    (in its single-process shape: a tensor-parallel shard takes its part)."""
    expected = {f"{anchor}.{name}": p for anchor, module in modules.items() for name, p in module.named_parameters()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"task {task}: initial adapter does not fit the task's modules; "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    with torch.no_grad():
        for key, param in expected.items():
            value = local_part(param, state[key])
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"task {task}: {key} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
