"""The head and cross-entropy of one task's scored rows, fused: logits are made a chunk of rows
at a time and the gradient of the hidden states is worked out in the forward pass, so neither
the fp32 logits nor their gradient (rows x vocabulary, the largest tensors of a step) outlive
their chunk. Backward then is one multiplication by the incoming gradient.

The arithmetic is `F.cross_entropy(F.linear(h, W).float(), targets, reduction="sum") * scale`'s,
backward included, operator for operator (log-softmax and its backward in fp32, the logits'
gradient rounded to the backbone's dtype before its product with the head weight): only the
order in which rows are worked changes, and rows do not interact. On the CPU the log-softmax,
the target's pick and the logits' gradient are one fused kernel
(`muxtune.kernels.cpu_fused.cross_entropy_rows`: the same roundings, the last bit of fp32 sums
and exponentials aside). Both products with the head
weight go through `FrozenHead`, which on the CPU in bf16 runs them against copies of the weight
packed once for oneDNN.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from muxtune.kernels.cpu_fused import cross_entropy_rows, fused_applies

CHUNK_LOGIT_BYTES = 32 << 20
"""fp32 logits one chunk of rows may hold."""


def packs_head(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a frozen head on this device and dtype keeps oneDNN-packed copies (`FrozenHead`)."""
    return (
        device_type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


PACKED_HEAD_COPIES = 2
"""Copies of the head weight a packing `FrozenHead` keeps besides the weight itself."""


class FrozenHead:
    """A frozen, bias-free head weight ``[V, C]`` and the two products the fused loss makes with
    it: the logits ``h @ W^T`` and the hidden states' gradient ``g @ W``.

    Where `packs_head`, both run against copies of the weight packed once for oneDNN
    (`mkldnn._linear_pointwise`), bitwise equal to `mm`, which packs the weight again on every
    call: with the few scored rows of a task's segment that packing costs more than the product
    (49,152 x 576, one thread: 16 ms against 6 ms for both products at 4 rows, 9-12% less at
    256). The price is `PACKED_HEAD_COPIES` more copies of the weight."""

    def __init__(self, weight_VC: torch.Tensor) -> None:
        self.weight_VC = weight_VC
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None
        if packs_head(weight_VC.device.type, weight_VC.dtype):
            reorder = torch.ops.mkldnn._reorder_linear_weight
            self._packed = (reorder(weight_VC, None), reorder(weight_VC.t().contiguous(), None))

    def logits(self, hidden_NC: torch.Tensor) -> torch.Tensor:
        """``hidden_NC @ W^T``."""
        if self._packed is None:
            return F.linear(hidden_NC, self.weight_VC)
        return torch.ops.mkldnn._linear_pointwise(hidden_NC, self._packed[0], None, "none", [], "")

    def hidden_grad(self, grad_NV: torch.Tensor) -> torch.Tensor:
        """``grad_NV @ W`` (``grad_NV`` in the weight's dtype)."""
        if self._packed is None:
            return grad_NV @ self.weight_VC
        return torch.ops.mkldnn._linear_pointwise(grad_NV, self._packed[1], None, "none", [], "")


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab_size``."""
    return max(1, CHUNK_LOGIT_BYTES // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    """(summed negative log-likelihood, that sum times ``scale``); only the second is differentiable."""

    @staticmethod
    def forward(
        ctx: Any, hidden_NC: torch.Tensor, head: FrozenHead, targets_N: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = chunk_rows(head.weight_VC.shape[0])
        with_grad = ctx.needs_input_grad[0]
        nll = torch.zeros((), dtype=torch.float32, device=hidden_NC.device)
        grads = []
        vocab = head.weight_VC.shape[0]
        fused = fused_applies(hidden_NC) and _targets_in_range(targets_N, vocab)
        for start in range(0, hidden_NC.shape[0], rows):
            logits_nV = head.logits(hidden_NC[start : start + rows])
            if fused:
                picked_n, grad_nV = cross_entropy_rows(logits_nV, targets_N[start : start + rows], scale, with_grad)
                nll -= picked_n.sum()
                if grad_nV is not None:
                    grads.append(head.hidden_grad(grad_nV))
                continue
            targets_n = targets_N[start : start + rows, None]
            log_probs_nV = torch.log_softmax(logits_nV.float(), dim=-1)
            nll -= log_probs_nV.gather(1, targets_n).sum()
            if with_grad:
                picked_nV = torch.zeros_like(log_probs_nV).scatter_(1, targets_n, -scale)
                grad_nV = torch.ops.aten._log_softmax_backward_data(picked_nV, log_probs_nV, 1, torch.float32)
                grads.append(head.hidden_grad(grad_nV.to(head.weight_VC.dtype)))
        ctx.mark_non_differentiable(nll)
        if with_grad:
            ctx.save_for_backward(torch.cat(grads) if grads else hidden_NC.new_zeros(hidden_NC.shape))
        return nll, nll * scale

    @staticmethod
    def backward(ctx: Any, _: torch.Tensor, grad_term: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (grad_NC,) = ctx.saved_tensors
        return grad_NC * grad_term.to(grad_NC.dtype), None, None, None


def _targets_in_range(targets_N: torch.Tensor, vocab: int) -> bool:
    """Whether host targets index the vocabulary (the fused kernel reads the target's logit)."""
    if targets_N.device.type != "cpu" or targets_N.numel() == 0:
        return targets_N.device.type == "cpu"
    return int(targets_N.min()) >= 0 and int(targets_N.max()) < vocab


def linear_cross_entropy(
    hidden_NC: torch.Tensor, head: FrozenHead, targets_N: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the summed cross-entropy of ``hidden_NC @ W^T`` for the head's weight W against
    ``targets_N``, that sum times ``scale`` for backward); gradients reach ``hidden_NC`` only
    (the head is frozen)."""
    return _LinearCrossEntropy.apply(hidden_NC, head, targets_N, scale)
