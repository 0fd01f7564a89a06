import math

import pytest
import torch

from nanollm.model import GPT, GPTConfig
from nanollm.optim import configure_optimizer, get_lr


def test_warmup_then_cosine_hits_hand_computed_points():
    kwargs = dict(learning_rate=1.0, warmup_iters=10, lr_decay_iters=110, min_lr=0.1)
    assert get_lr(0, **kwargs) == pytest.approx(1 / 11)  # (it + 1) / (warmup + 1)
    assert get_lr(9, **kwargs) == pytest.approx(10 / 11)
    assert get_lr(10, **kwargs) == pytest.approx(1.0)  # decay starts at the peak
    assert get_lr(60, **kwargs) == pytest.approx(0.1 + 0.5 * 0.9)  # halfway: cos(pi/2) = 0
    assert get_lr(110, **kwargs) == pytest.approx(0.1)
    assert get_lr(500, **kwargs) == pytest.approx(0.1)


def test_polynomial_and_constant_schedules():
    kwargs = dict(learning_rate=1.0, warmup_iters=0, lr_decay_iters=100, min_lr=0.0)
    assert get_lr(25, schedule="poly", **kwargs) == pytest.approx(0.75)  # linear: 1 - 25/100
    assert get_lr(50, schedule="poly", power=2.0, **kwargs) == pytest.approx(0.25)
    assert get_lr(50, schedule="constant", **kwargs) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        get_lr(5, schedule="step", **kwargs)


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    optimizer = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False)
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in not_decayed["params"])
    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_params == model.num_parameters()  # the tied matrix is there once


def test_cpu_optimizer_is_fused_and_steps_like_plain_adamw():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    optimizer = configure_optimizer(model, 0.1, 1e-2, (0.9, 0.95), "cpu", verbose=False)
    assert optimizer.defaults["fused"] is True  # one fused kernel for all parameters, not a loop of small ops
    plain = torch.optim.AdamW([{"params": [p for p in reference if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in reference if p.dim() < 2], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), foreach=False)  # the unfused per-tensor loop
    for _ in range(3):
        for p, q in zip(model.parameters(), reference):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        optimizer.step()
        plain.step()
    for p, q in zip(model.parameters(), reference):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
