"""The optimizer and the learning-rate schedule.

AdamW (Loshchilov & Hutter 2019) decays only matrices (Linear weights, embeddings); biases and LayerNorm
scales are left undecayed. The schedule is a linear warmup (Goyal et al. 2017) followed by cosine
(Loshchilov & Hutter 2017) or polynomial decay down to min_lr.
"""
import inspect
import math

import torch

from nanollm.configurator import UserError

LR_SCHEDULES = ("cosine", "poly", "constant")


def configure_optimizer(model, weight_decay, learning_rate, betas, device_type, verbose=True):
    """AdamW with two parameter groups: 2-D tensors decayed, the rest (biases, norms) not."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel updates every parameter, on CUDA and on the CPU (at 1.9 M parameters on 2 busy cores:
    # 1-2 ms per step instead of ~20 ms, docs/benchmarks_cpu.md)
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    if verbose:
        print(f"[nanollm] AdamW: {sum(p.numel() for p in decay):,} decayed, "
              f"{sum(p.numel() for p in no_decay):,} not decayed parameters; fused={fused}")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))


class Schedule:
    """The learning rate of every iteration: linear warmup, then cosine (or polynomial) decay from learning_rate to
    min_lr at lr_decay_iters (-1: max_iters), min_lr after; kind 'constant' keeps learning_rate after warmup."""

    def __init__(self, learning_rate, warmup_iters, lr_decay_iters, max_iters, min_lr, kind="cosine"):
        if kind not in LR_SCHEDULES:
            raise UserError(f"lr_schedule={kind!r}: expected one of {LR_SCHEDULES}")
        self.learning_rate, self.warmup_iters, self.min_lr, self.kind = learning_rate, warmup_iters, min_lr, kind
        self.decay_iters = max_iters if lr_decay_iters < 0 else lr_decay_iters

    def set(self, optimizer, iteration):
        """Give every parameter group this iteration's learning rate; returns it."""
        lr = get_lr(iteration, self.learning_rate, self.warmup_iters, self.decay_iters, self.min_lr, self.kind)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, schedule="cosine", power=1.0):
    """Learning rate at iteration `it`."""
    if schedule not in LR_SCHEDULES:
        raise UserError(f"lr_schedule={schedule!r}: expected one of {LR_SCHEDULES}")
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)  # linear warmup, never exactly 0
    if schedule == "constant":
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)  # 0 -> 1
    if schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine: 1 -> 0
    else:
        coeff = (1.0 - progress) ** power  # polynomial: (1 - p)^power, linear for power 1
    return min_lr + coeff * (learning_rate - min_lr)
