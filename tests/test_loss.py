"""The fused, chunked output head + cross-entropy (cm3leon/loss.py) against the plain one."""

import pytest
import torch
import torch.nn.functional as F

from cm3leon.loss import IGNORE_INDEX, fused_linear_cross_entropy
from cm3leon.model import CM3LeonLM, ModelConfig


def _inputs(N=37, d=16, V=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g, requires_grad=True)
    weight = torch.randn(V, d, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_fused_matches_plain_cross_entropy_and_gradients(chunk):
    hidden, weight, targets = _inputs()
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    (ref.sum() * 0.5).backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    total, losses = fused_linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    (total * 0.5).backward()  # the backward scales the stored gradients by the upstream gradient
    torch.testing.assert_close(losses, ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(total, ref.sum().detach(), atol=1e-4, rtol=0)
    assert not losses.requires_grad and (losses[targets == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(hidden.grad, ref_grads[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(weight.grad, ref_grads[1], atol=1e-5, rtol=0)


def test_fused_without_grad_and_with_batch_shape():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        total, losses = fused_linear_cross_entropy(hidden.view(1, 37, 16), weight, targets.view(1, 37), chunk=10)
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    assert losses.shape == (1, 37) and total == losses.sum()
    torch.testing.assert_close(losses[0], ref.detach(), atol=1e-5, rtol=0)


def test_fused_under_bf16_autocast_is_close_to_fp32():
    hidden, weight, targets = _inputs(N=64, d=32, V=97)
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    ref_grad = weight.grad.clone()
    weight.grad = hidden.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = fused_linear_cross_entropy(hidden, weight, targets, chunk=16)
    total.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    torch.testing.assert_close(total, ref.detach(), rtol=2e-2, atol=0)
    torch.testing.assert_close(weight.grad, ref_grad, rtol=0, atol=5e-2 * ref_grad.abs().max().item())


def test_model_forward_with_targets_equals_logits_path():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=71, max_seq_len=32, zero_init_residual_out=False)
    model = CM3LeonLM(cfg)
    idx = torch.randint(0, 71, (3, 20))
    targets = torch.randint(0, 71, (3, 20))
    targets[:, :4] = IGNORE_INDEX
    logits = model(idx)
    ref = F.cross_entropy(logits.view(-1, 71), targets.view(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total, losses = model(idx, targets=targets, loss_chunk=7)
    total.backward()
    assert losses.shape == (3, 20)
    torch.testing.assert_close(total, ref.detach(), atol=1e-4, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=0, msg=n)
