"""Fused row-wise softmax in Triton, forward and backward, with scale, causal and key-padding masks.

Teaches kernel fusion (one read and one write per element instead of one per PyTorch op) and the
online softmax of Milakov & Gimelshein 2018 ("Online normalizer calculation for softmax") for rows
longer than one block. `softmax_reference` is the same computation in plain PyTorch.

One program instance = one row. A row that fits in one block is loaded once: y = exp(x − max) / Σ.
A longer row takes two passes: pass 1 keeps a running max m and running sum l over blocks,
  m_new = max(m, max(x_blk)) ;  l = l·exp(m − m_new) + Σ exp(x_blk − m_new),
and pass 2 writes y = exp(x − m) / l. Backward: dx = scale · y ∘ (dy − Σ_j dy_j·y_j).

Masks (like attention): x (..., T_q, T_k). causal: row i keeps columns j ≤ i + T_k − T_q.
key_padding_mask (B, T_k) bool, True = real token (kept), False = padding; x.shape[0] must be B.
Masked entries get probability 0; a row with every entry masked is all zeros (not NaN).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import check_device

# Longest row handled in a single pass (kept in registers: 16384 fp32 over 16 warps = 32 per thread).
# Longer rows use the two-pass online algorithm.
MAX_BLOCK_GPU = 16384
# On the CPU interpreter the cost is per element, not per block, so a small block costs nothing and
# makes the tests (rows of 17 to 129) exercise the multi-block online path as well.
MAX_BLOCK_CPU = 64


def softmax_reference(x, scale=None, causal=False, key_padding_mask=None):
    """Plain PyTorch softmax with the same masking conventions as `softmax` (math in fp32)."""
    logits = x.float() * (1.0 if scale is None else scale)
    keep = torch.ones_like(logits, dtype=torch.bool)
    if causal:
        seq_len_q, seq_len_k = x.shape[-2], x.shape[-1]
        keep = keep & torch.ones(seq_len_q, seq_len_k, dtype=torch.bool, device=x.device).tril(seq_len_k - seq_len_q)
    if key_padding_mask is not None:
        batch = key_padding_mask.shape[0]
        keep = keep & key_padding_mask.bool().view(batch, *([1] * (x.dim() - 2)), x.shape[-1])
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    return probs.nan_to_num(0.0).to(x.dtype)  # fully masked rows: 0/0 → 0


@triton.jit
def _masked_logits(x_row, columns, row_length, query_index, seq_len_q, mask_row, scale,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Load one block of a row as fp32 scale·x, with −inf where masked or past the row end."""
    keep = columns < row_length
    if CAUSAL:
        keep = keep & (columns <= query_index + (row_length - seq_len_q))
    if HAS_MASK:
        keep = keep & (tl.load(mask_row + columns, mask=columns < row_length, other=0) != 0)
    logits = tl.load(x_row + columns, mask=columns < row_length, other=0.0).to(tl.float32) * scale
    return tl.where(keep, logits, float("-inf"))


@triton.jit
def _softmax_forward_kernel(X, Y, MASK, row_length, seq_len_q, rows_per_batch, scale,
                            BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
                            CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # this program: one row of the (rows, row_length) view
    x_row, y_row = X + row * row_length, Y + row * row_length
    query_index = row % seq_len_q  # row position inside its (T_q, T_k) matrix, for the causal mask
    mask_row = MASK + (row // rows_per_batch) * row_length  # this row's sequence in the padding mask
    columns = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        logits = _masked_logits(x_row, columns, row_length, query_index, seq_len_q, mask_row, scale, CAUSAL, HAS_MASK)
        row_max = tl.max(logits, 0)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # fully masked row: exp(−inf − 0) = 0
        numerators = tl.exp(logits - row_max)  # exp(x − max) ≤ 1, no overflow
        denominator = tl.sum(numerators, 0)
        denominator = tl.where(denominator == 0.0, 1.0, denominator)
        tl.store(y_row + columns, (numerators / denominator).to(Y.dtype.element_ty), mask=columns < row_length)
    else:
        # pass 1: running max m and running sum l = Σ exp(x − m), rescaled whenever m grows
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, row_length, BLOCK_N):
            logits = _masked_logits(x_row, start + columns, row_length, query_index, seq_len_q, mask_row, scale,
                                    CAUSAL, HAS_MASK)
            new_max = tl.maximum(running_max, tl.max(logits, 0))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            # l = l·exp(m_old − m_new) + Σ exp(x − m_new)
            running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(logits - safe_max), 0)
            running_max = new_max
        safe_max = tl.where(running_max == float("-inf"), 0.0, running_max)
        denominator = tl.where(running_sum == 0.0, 1.0, running_sum)
        # pass 2: y = exp(x − m) / l
        for start in range(0, row_length, BLOCK_N):
            logits = _masked_logits(x_row, start + columns, row_length, query_index, seq_len_q, mask_row, scale,
                                    CAUSAL, HAS_MASK)
            probs = tl.exp(logits - safe_max) / denominator
            tl.store(y_row + start + columns, probs.to(Y.dtype.element_ty), mask=start + columns < row_length)


@triton.jit
def _softmax_backward_kernel(Y, GRAD_Y, GRAD_X, row_length, scale, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    # dx = scale · y ∘ (dy − Σ_j dy_j·y_j); masked entries have y = 0, so their gradient is 0
    row = tl.program_id(0).to(tl.int64)
    offset = row * row_length
    columns = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        inside = columns < row_length
        probs = tl.load(Y + offset + columns, mask=inside, other=0.0).to(tl.float32)
        grad_probs = tl.load(GRAD_Y + offset + columns, mask=inside, other=0.0).to(tl.float32)
        dot = tl.sum(probs * grad_probs, 0)
        grad_x = scale * probs * (grad_probs - dot)
        tl.store(GRAD_X + offset + columns, grad_x.to(GRAD_X.dtype.element_ty), mask=inside)
    else:
        partial_dot = tl.zeros([BLOCK_N], tl.float32)  # pass 1: Σ_j dy_j·y_j, summed once at the end
        for start in range(0, row_length, BLOCK_N):
            inside = start + columns < row_length
            probs = tl.load(Y + offset + start + columns, mask=inside, other=0.0).to(tl.float32)
            grad_probs = tl.load(GRAD_Y + offset + start + columns, mask=inside, other=0.0).to(tl.float32)
            partial_dot += probs * grad_probs
        dot = tl.sum(partial_dot, 0)
        for start in range(0, row_length, BLOCK_N):  # pass 2: write dx
            inside = start + columns < row_length
            probs = tl.load(Y + offset + start + columns, mask=inside, other=0.0).to(tl.float32)
            grad_probs = tl.load(GRAD_Y + offset + start + columns, mask=inside, other=0.0).to(tl.float32)
            grad_x = scale * probs * (grad_probs - dot)
            tl.store(GRAD_X + offset + start + columns, grad_x.to(GRAD_X.dtype.element_ty), mask=inside)


def _launch_settings(row_length, device):
    """(BLOCK_N, single_block, num_warps): one block per row when it fits, else the two-pass loop."""
    max_block = MAX_BLOCK_GPU if device.type == "cuda" else MAX_BLOCK_CPU
    block = min(triton.next_power_of_2(row_length), max_block)
    if device.type != "cuda":
        return block, block >= row_length, 1
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)  # ~16 to 32 elements per thread
    return block, block >= row_length, num_warps


@torch.library.custom_op("nanollm::softmax_forward", mutates_args=())
def _softmax_forward(x: torch.Tensor, key_padding_mask: Optional[torch.Tensor], scale: float,
                     causal: bool) -> torch.Tensor:
    row_length = x.shape[-1]
    rows = x.numel() // row_length
    probs = torch.empty_like(x, memory_format=torch.contiguous_format)
    if rows == 0:
        return probs
    if key_padding_mask is None:
        mask, has_mask, rows_per_batch = torch.empty(1, dtype=torch.uint8, device=x.device), False, 1
    else:
        mask, has_mask = key_padding_mask.contiguous().view(torch.uint8), True
        rows_per_batch = rows // key_padding_mask.shape[0]
    seq_len_q = x.shape[-2] if x.dim() >= 2 else 1
    block, single_block, num_warps = _launch_settings(row_length, x.device)
    _softmax_forward_kernel[(rows,)](x, probs, mask, row_length, seq_len_q, rows_per_batch, scale,
                                     BLOCK_N=block, SINGLE_BLOCK=single_block, CAUSAL=causal, HAS_MASK=has_mask,
                                     num_warps=num_warps)
    return probs


@_softmax_forward.register_fake
def _(x, key_padding_mask, scale, causal):
    return torch.empty_like(x)


@torch.library.custom_op("nanollm::softmax_backward", mutates_args=())
def _softmax_backward(probs: torch.Tensor, grad_probs: torch.Tensor, scale: float) -> torch.Tensor:
    row_length = probs.shape[-1]
    rows = probs.numel() // row_length
    grad_probs = grad_probs.contiguous()
    grad_x = torch.empty_like(probs, memory_format=torch.contiguous_format)
    if rows == 0:
        return grad_x
    block, single_block, num_warps = _launch_settings(row_length, probs.device)
    _softmax_backward_kernel[(rows,)](probs, grad_probs, grad_x, row_length, scale,
                                      BLOCK_N=block, SINGLE_BLOCK=single_block, num_warps=num_warps)
    return grad_x


@_softmax_backward.register_fake
def _(probs, grad_probs, scale):
    return torch.empty_like(probs)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)  # the backward needs only y, not x
    ctx.scale = inputs[2]


def _backward(ctx, grad_probs):
    (probs,) = ctx.saved_tensors
    return _softmax_backward(probs, grad_probs, ctx.scale), None, None, None


_softmax_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(x, causal, key_padding_mask):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"kernels/softmax.py softmax: x must be a non-empty fp32/fp16/bf16 tensor with at least "
                         f"one dim, got {x.dtype} {tuple(x.shape)}")
    check_device(x, "kernels/softmax.py softmax")
    if causal and x.dim() < 2:
        raise ValueError(f"kernels/softmax.py softmax: causal needs x of shape (..., T_q, T_k), got {tuple(x.shape)}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or x.dim() < 2
                                         or tuple(key_padding_mask.shape) != (x.shape[0], x.shape[-1])):
        raise ValueError(f"kernels/softmax.py softmax: key_padding_mask must be bool (B, T_k) = "
                         f"{(x.shape[0], x.shape[-1])} for x {tuple(x.shape)}, got {key_padding_mask.dtype} "
                         f"{tuple(key_padding_mask.shape)}")


def softmax(x, scale=None, causal=False, key_padding_mask=None):
    """softmax(scale·x) over the last dim, fused; differentiable in x. Masked entries get 0.

    key_padding_mask: (B, T_k) bool, True = real token, False = padding; x is (B, ..., T_k).
    """
    _check_inputs(x, causal, key_padding_mask)
    return _softmax_forward(x.contiguous(), key_padding_mask, 1.0 if scale is None else float(scale), causal)
