"""The head and cross-entropy of one task's scored rows, fused: logits are made a chunk of rows
at a time and the gradient of the hidden states is worked out in the forward pass, so neither
the fp32 logits nor their gradient (rows x vocabulary, the largest tensors of a step) outlive
their chunk. Backward then is one multiplication by the incoming gradient.

The arithmetic is `F.cross_entropy(F.linear(h, W).float(), targets, reduction="sum") * scale`'s,
backward included, operator for operator (log-softmax and its backward in fp32, the logits'
gradient rounded to the backbone's dtype before its product with the head weight): only the
order in which rows are worked changes, and rows do not interact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

CHUNK_LOGIT_BYTES = 32 << 20
"""fp32 logits one chunk of rows may hold."""


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab_size``."""
    return max(1, CHUNK_LOGIT_BYTES // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    """(summed negative log-likelihood, that sum times ``scale``); only the second is differentiable."""

    @staticmethod
    def forward(
        ctx: Any, hidden_NC: torch.Tensor, weight_VC: torch.Tensor, targets_N: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = chunk_rows(weight_VC.shape[0])
        with_grad = ctx.needs_input_grad[0]
        nll = torch.zeros((), dtype=torch.float32, device=hidden_NC.device)
        grads = []
        for start in range(0, hidden_NC.shape[0], rows):
            targets_n = targets_N[start : start + rows, None]
            log_probs_nV = torch.log_softmax(F.linear(hidden_NC[start : start + rows], weight_VC).float(), dim=-1)
            nll -= log_probs_nV.gather(1, targets_n).sum()
            if with_grad:
                picked_nV = torch.zeros_like(log_probs_nV).scatter_(1, targets_n, -scale)
                grad_nV = torch.ops.aten._log_softmax_backward_data(picked_nV, log_probs_nV, 1, torch.float32)
                grads.append(grad_nV.to(weight_VC.dtype) @ weight_VC)
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


def linear_cross_entropy(
    hidden_NC: torch.Tensor, weight_VC: torch.Tensor, targets_N: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the summed cross-entropy of ``hidden_NC @ weight_VC.T`` against ``targets_N``, that sum
    times ``scale`` for backward); gradients reach ``hidden_NC`` only (the head is frozen)."""
    return _LinearCrossEntropy.apply(hidden_NC, weight_VC, targets_N, scale)
