"""Cross-entropy over the vocabulary without materialising the logits of the whole batch.

A 4,096-token row over a 65,536-entry vocabulary has 268M logits: 1 GiB in fp32 per row, for a
forward that `F.cross_entropy(logits.float())` keeps (and its softmax) for the backward. Here the
output head and the loss are one step, chunk by chunk over the tokens (the "fused linear
cross-entropy" of Liger-Kernel, in plain PyTorch): for each chunk of `chunk` tokens the logits
are made (in the autocast dtype), upcast to fp32, reduced to per-token losses, and, when gradients
are wanted, turned at once into the chunk's gradients with respect to the hidden states and the
head weight; the logits are then freed. The backward only scales the stored gradients. Peak extra
memory: one chunk's fp32 logits plus a [V, d] fp32 gradient and a [N, d] gradient.

The loss that carries gradients is the *sum* over targets (the caller divides by the number of
real targets, a CPU integer: no device sync); per-token losses come along without gradients (the
validation split by token kind).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # cm3leon.data.sequences.IGNORE_INDEX: targets without loss


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h [c, d] @ weight [V, d]^T -> fp32 logits [c, V] (the matmul in the autocast dtype)."""
    return (h @ weight.t()).float()


def _chunk_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [c, V], targets [c] -> (losses [c], 0 where ignored; log-sum-exp [c])."""
    valid = targets != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    return torch.where(valid, lse - picked, torch.zeros_like(lse)), lse


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """(hidden [N, d], weight [V, d], targets [N]) -> (sum of losses, losses [N] without grad)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        N = hidden.shape[0]
        losses = torch.empty(N, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        for s in range(0, N, chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            logits = _chunk_logits(h, weight)
            losses[s : s + chunk], lse = _chunk_losses(logits, t)
            # d loss_sum / d logits = softmax - onehot(target), on rows that carry loss
            g = logits.sub_(lse[:, None]).exp_()
            rows = torch.arange(len(t), device=t.device)
            g[rows, t.clamp(min=0)] -= 1.0
            g.mul_((t != IGNORE_INDEX)[:, None])
            g = g.to(_matmul_dtype(h))  # the dtype the logits' matmul ran in
            if grad_h is not None:
                grad_h[s : s + chunk] = (g @ weight.to(g.dtype)).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (g.t() @ h.to(g.dtype)).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_sum, grad_losses):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else grad_h * grad_sum.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * grad_sum).to(ctx.weight_dtype)
        return dh, dw, None, None


def _matmul_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype matmuls of h run in: autocast's on h's device when it is on, else h's own."""
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [..., d], weight [V, d], targets [...] (IGNORE_INDEX: no loss) -> (sum of the
    per-token losses: a scalar that carries gradients, per-token fp32 losses [...] without them).
    Equal to `F.cross_entropy(hidden @ weight.T, targets, reduction="none")` (fp32 logits) and its
    gradients, without holding more than `chunk` tokens' logits."""
    shape = targets.shape
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total, losses = _FusedLinearCrossEntropy.apply(h, weight, t, chunk)
        return total, losses.view(shape)
    with torch.no_grad():
        losses = torch.cat(
            [
                _chunk_losses(_chunk_logits(h[s : s + chunk], weight), t[s : s + chunk])[0]
                for s in range(0, len(t), chunk)
            ]
        )
    return losses.sum(), losses.view(shape)
