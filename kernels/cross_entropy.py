"""Fused cross-entropy over the vocabulary in Triton, forward and backward.

Teaches that the loss needs only one number per row, the log-sum-exp: loss = lse − logit[target].
PyTorch's cross_entropy saves the full (N, V) log-probabilities for the backward; this kernel saves
only lse (N,) and rebuilds the probabilities block by block when the gradient is written
(the idea behind Liger-Kernel's fused cross-entropy). `cross_entropy_reference` is the plain version.

One program instance = one row (one token). Forward: online log-sum-exp over vocab blocks
(Milakov & Gimelshein 2018). Backward: dlogits = (softmax(logits) − onehot(target)) · dloss.
Rows whose target is `ignore_index` have loss 0 and gradient 0; the mean is over the other rows.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import check_device

# Vocab block per step. GPU: 4096 fp32 values over 8 warps = 16 per thread, enough loads in flight
# to stream the row at full bandwidth. CPU interpreter: small, so tests cover several blocks.
BLOCK_V_GPU = 4096
BLOCK_V_CPU = 64


def cross_entropy_reference(logits, targets, ignore_index=-100):
    """Mean cross-entropy over rows whose target is not ignore_index (plain PyTorch, fp32)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


@triton.jit
def _cross_entropy_forward_kernel(LOGITS, TARGETS, LOSSES, LSE, vocab_size, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits_row = LOGITS + row * vocab_size
    columns = tl.arange(0, BLOCK_V)
    running_max = float("-inf")  # m
    running_sum = 0.0  # l = Σ exp(x − m)
    for start in range(0, vocab_size, BLOCK_V):
        inside = start + columns < vocab_size
        logits = tl.load(logits_row + start + columns, mask=inside, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(logits, 0))
        # a block of only −inf (masked-out tokens) leaves m = −inf: subtract 0 instead, as exp(−inf − (−inf)) = NaN
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        # l = l·exp(m_old − m_new) + Σ exp(x − m_new)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(logits - safe_max), 0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)  # log Σ exp(x)
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    target_logit = tl.load(logits_row + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(LOSSES + row, tl.where(valid, lse - target_logit, 0.0))  # −log p(target) = lse − x_target
    tl.store(LSE + row, lse)


@triton.jit
def _cross_entropy_backward_kernel(LOGITS, TARGETS, LSE, GRAD_LOSSES, GRAD_LOGITS, vocab_size, ignore_index,
                                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK_V)
    target = tl.load(TARGETS + row)
    # ignored rows get gradient 0 everywhere
    grad_loss = tl.where(target != ignore_index, tl.load(GRAD_LOSSES + row), 0.0)
    lse = tl.load(LSE + row)
    for start in range(0, vocab_size, BLOCK_V):
        inside = start + columns < vocab_size
        logits = tl.load(LOGITS + row * vocab_size + start + columns, mask=inside, other=0.0).to(tl.float32)
        probs = tl.exp(logits - lse)  # softmax rebuilt from the saved lse, never stored
        grad = (probs - tl.where(start + columns == target, 1.0, 0.0)) * grad_loss  # (p − onehot)·dloss
        tl.store(GRAD_LOGITS + row * vocab_size + start + columns, grad.to(GRAD_LOGITS.dtype.element_ty), mask=inside)


def _launch_settings(device):
    return (BLOCK_V_GPU, 8) if device.type == "cuda" else (BLOCK_V_CPU, 1)


@torch.library.custom_op("nanollm::cross_entropy_forward", mutates_args=())
def _cross_entropy_forward(logits: torch.Tensor, targets: torch.Tensor,
                           ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, vocab_size = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)  # (N,) per-row −log p(target)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)  # (N,) saved for the backward
    if rows > 0:
        block, num_warps = _launch_settings(logits.device)
        _cross_entropy_forward_kernel[(rows,)](logits, targets, losses, lse, vocab_size, ignore_index,
                                               BLOCK_V=block, num_warps=num_warps)
    return losses, lse


@_cross_entropy_forward.register_fake
def _(logits, targets, ignore_index):
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("nanollm::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward(grad_losses: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                            ignore_index: int) -> torch.Tensor:
    rows, vocab_size = logits.shape
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (N, V)
    if rows > 0:
        block, num_warps = _launch_settings(logits.device)
        _cross_entropy_backward_kernel[(rows,)](logits, targets, lse, grad_losses.contiguous(), grad_logits, vocab_size,
                                                ignore_index, BLOCK_V=block, num_warps=num_warps)
    return grad_logits


@_cross_entropy_backward.register_fake
def _(grad_losses, logits, targets, lse, ignore_index):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_losses, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return _cross_entropy_backward(grad_losses, logits, targets, lse, ctx.ignore_index), None, None


_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean −log softmax(logits)[target] over rows with target ≠ ignore_index; logits (..., V), targets (...).

    Differentiable in logits. Returns NaN-free 0 when every target is ignored (PyTorch returns NaN).
    """
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16) or logits.dim() < 1:
        raise ValueError(f"kernels/cross_entropy.py cross_entropy: logits must be fp32/fp16/bf16 (..., V), "
                         f"got {logits.dtype} {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1] or targets.dtype != torch.long:
        raise ValueError(f"kernels/cross_entropy.py cross_entropy: targets must be int64 of shape "
                         f"{tuple(logits.shape[:-1])}, got {targets.dtype} {tuple(targets.shape)}")
    check_device(logits, "kernels/cross_entropy.py cross_entropy")
    vocab_size = logits.shape[-1]
    logits, targets = logits.reshape(-1, vocab_size).contiguous(), targets.reshape(-1).contiguous()  # (N, V), (N,)
    valid = targets != ignore_index
    if ((targets < 0) | (targets >= vocab_size))[valid].any():
        raise ValueError(f"kernels/cross_entropy.py cross_entropy: targets must lie in [0, {vocab_size}) "
                         f"or equal ignore_index={ignore_index}")
    losses, _ = _cross_entropy_forward(logits, targets, ignore_index)
    return losses.sum() / valid.sum().clamp(min=1)  # mean over real targets; 0 (not 0/0) if there are none
