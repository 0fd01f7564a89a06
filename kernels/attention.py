"""FlashAttention-2-style fused attention in Triton: tiled, online softmax, forward and backward.

Teaches why attention is memory-bound (the T×T score matrix) and how tiling with an online softmax
never writes it to memory. Follows Dao et al. 2022 (FlashAttention) and Dao 2023 (FlashAttention-2);
the online softmax is Milakov & Gimelshein 2018. `attention_reference` is the same math in PyTorch.

Algorithm (one program instance = one block of BLOCK_M query rows of one (batch, head)):
  for each block of BLOCK_N keys:  s = q·kᵀ·scale ; m_new = max(m, rowmax(s))
      acc = acc·exp(m − m_new) + exp(s − m_new)·v ;  l = l·exp(m − m_new) + rowsum(exp(s − m_new))
  out = acc / l ;  lse = m + log(l)   (the row log-sum-exp, saved for the backward)
Saving lse lets the backward rebuild P = exp(s − lse) block by block instead of storing P (T×T).
Backward: Δ_i = rowsum(dO∘O)_i (pre-pass); dV = Pᵀ·dO ; dP = dO·Vᵀ ; dS = P∘(dP − Δ) ;
  dK = scale·dSᵀ·Q (one program per key block) ; dQ = scale·dS·K (one program per query block).

Launch grid: (B·H, ⌈T / BLOCK⌉) — the (batch, head) pairs on axis 0, which holds 2³¹ − 1 programs, because CUDA
caps axes 1 and 2 at 65,535 (B·H = 65,536 would not launch there). Head dim D ≤ 128, padded to a power of two.

Conventions: q (B, H, T_q, D), k and v (B, H, T_k, D). key_padding_mask (B, T_k) bool, True = real
token (attend to it), False = padding (ignored). causal: query i sits at position i + T_k − T_q
(bottom-right aligned, as in KV-cache decoding; the usual lower triangle when T_q == T_k).
A query row that sees no key at all (fully masked) gets output 0 and gradient 0, never NaN.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import check_device, interpreting

# Tile sizes (query rows × keys per step). All are ≥ 16 so `tl.dot` stays legal on the GPU compiler,
# which rejects 16-bit dots with a dimension below 16 (the interpreter would accept them).
# CPU interpreter: each program instance costs Python overhead, so few large tiles are fastest.
BLOCK_M_CPU, BLOCK_N_CPU = 64, 64
# GPU forward: 128×64 tiles over 8 warps, as in FlashAttention-2; for head dims up to 128 the q tile,
# the fp32 accumulator and the scores stay in registers (fp16/bf16, D = 16..128, compiled for sm_90: no spills).
BLOCK_M_GPU, BLOCK_N_GPU = 128, 64
# GPU backward: each program also holds dO and two fp32 accumulators (dK and dV): 64×64, or
# 32 query rows × 64 keys when D > 64 (both compile for sm_90 without spills).
BLOCK_M_BACKWARD_GPU, BLOCK_N_BACKWARD_GPU = 64, 64
BLOCK_M_BACKWARD_LARGE_D_GPU = 32
# GPU fp32 inputs: tiles take twice the bytes and "ieee" dots run on CUDA cores, so 32×32
# (an exact but slow path that still spills a few hundred bytes per thread: train in bf16 for speed).
BLOCK_M_FP32_GPU, BLOCK_N_FP32_GPU = 32, 32
# fp32 inputs are multiplied in true fp32 ("ieee"), not TF32, so fp32 runs match the reference;
# fp16/bf16 tiles use the tensor cores with fp32 accumulation whatever this says.
DOT_PRECISION = "ieee"
# Largest head dim: at D = 256 the q tile, the fp32 accumulator and the scores of these tiles no longer fit in
# registers (they would need smaller tiles, not written here).
MAX_HEAD_DIM = 128
_announced = set()


def _say_once(message):
    """Say a choice of code path once per process (never pad or fall back silently)."""
    if message not in _announced:
        _announced.add(message)
        print(f"[nanollm] {message}")
LOG2_E = tl.constexpr(1.4426950408889634)  # exp(x) = 2^(x·log2 e); exp2 is the GPU's native instruction
LN_2 = tl.constexpr(0.6931471805599453)  # ln x = log2(x)·ln 2


def attention_reference(q, k, v, causal=False, key_padding_mask=None, sm_scale=None):
    """Plain PyTorch attention with the same conventions as `flash_attention` (math in fp32)."""
    seq_len_q, seq_len_k, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    scores = q.float() @ k.float().transpose(-2, -1) * scale  # (B, H, T_q, T_k)
    keep = torch.ones(seq_len_q, seq_len_k, dtype=torch.bool, device=q.device)
    if causal:
        # query i sees key j iff j ≤ i + (T_k − T_q)
        keep = torch.tril(keep, diagonal=seq_len_k - seq_len_q)
    keep = keep.expand(q.shape[0], 1, seq_len_q, seq_len_k)  # (B, 1, T_q, T_k)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :].bool()
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: 0/0 → 0
    return (probs @ v.float()).to(q.dtype)  # (B, H, T_q, D)


def _compute_dtype(dtype):
    """Dtype the tiles are cast to right after loading (accumulation is always fp32)."""
    # The interpreter computes 16-bit (especially bf16) arithmetic wrongly: upcast there.
    if interpreting() or dtype == torch.float32:
        return tl.float32
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


@triton.jit
def _keep_mask(query_index, key_index, seq_len_q, seq_len_k, mask_row_ptr,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Which (query, key) pairs take part in the softmax; indices broadcast, e.g. (M, 1) with (1, N)."""
    keep = (query_index < seq_len_q) & (key_index < seq_len_k)
    if CAUSAL:
        keep = keep & (key_index <= query_index + (seq_len_k - seq_len_q))
    if HAS_MASK:
        real_key = tl.load(mask_row_ptr + key_index, mask=key_index < seq_len_k, other=0)
        keep = keep & (real_key != 0)
    return keep


@triton.jit
def _attention_forward_kernel(
    Q, K, V, OUT, LSE, MASK, seq_len_q, seq_len_k, num_heads, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    # this program: query rows [block_m·BLOCK_M, +BLOCK_M) of one (batch, head)
    batch_head = tl.program_id(0)  # axis 0: up to 2³¹ − 1 programs (axes 1 and 2 stop at 65,535)
    block_m = tl.program_id(1)
    q_base = batch_head.to(tl.int64) * seq_len_q * HEAD_DIM
    k_base = batch_head.to(tl.int64) * seq_len_k * HEAD_DIM
    mask_row_ptr = MASK + (batch_head // num_heads).to(tl.int64) * seq_len_k
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,) padded to a power of two
    dim_ok = dims[None, :] < HEAD_DIM
    q = tl.load(Q + q_base + rows[:, None] * HEAD_DIM + dims[None, :],
                mask=(rows[:, None] < seq_len_q) & dim_ok, other=0.0).to(DTYPE)  # (BLOCK_M, BLOCK_D)

    qk_scale = sm_scale * LOG2_E  # scores in log2 units, so exp becomes exp2
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # m: running max, in log2 units
    row_sum = tl.zeros([BLOCK_M], tl.float32)  # l: running Σ 2^(s − m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running Σ 2^(s − m)·v
    end_n = seq_len_k
    if CAUSAL:  # keys after the last query row of this block are never seen
        end_n = tl.minimum(seq_len_k, (block_m + 1) * BLOCK_M + seq_len_k - seq_len_q)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        col_ok = cols[:, None] < seq_len_k
        k = tl.load(K + k_base + cols[:, None] * HEAD_DIM + dims[None, :], mask=col_ok & dim_ok, other=0.0).to(DTYPE)
        v = tl.load(V + k_base + cols[:, None] * HEAD_DIM + dims[None, :], mask=col_ok & dim_ok, other=0.0).to(DTYPE)
        # s = q·kᵀ·scale·log2(e)  (BLOCK_M, BLOCK_N)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = _keep_mask(rows[:, None], cols[None, :], seq_len_q, seq_len_k, mask_row_ptr, CAUSAL, HAS_MASK)
        scores = tl.where(keep, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # a row with no visible key yet has max −inf; shift by 0 instead so 2^(−inf − 0) = 0, not NaN
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        correction = tl.math.exp2(row_max - safe_max)  # 2^(m_old − m_new): rescales the old sums
        probs = tl.math.exp2(scores - safe_max[:, None])  # (BLOCK_M, BLOCK_N), unnormalized
        row_sum = row_sum * correction + tl.sum(probs, 1)
        acc = acc * correction[:, None] + tl.dot(probs.to(DTYPE), v, input_precision=PRECISION)
        row_max = new_max

    empty = row_sum == 0.0  # fully masked rows
    out = acc / tl.where(empty, 1.0, row_sum)[:, None]  # out = acc / l, 0 for empty rows
    # lse = ln Σ exp(s) = (m + log2 l)·ln 2 ; +inf for empty rows so the backward gets P = exp(s − lse) = 0
    lse = tl.where(empty, float("inf"), (row_max + tl.math.log2(tl.where(empty, 1.0, row_sum))) * LN_2)
    row_ok = rows < seq_len_q
    tl.store(OUT + q_base + rows[:, None] * HEAD_DIM + dims[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok)
    tl.store(LSE + batch_head.to(tl.int64) * seq_len_q + rows, lse, mask=row_ok)


@triton.jit
def _attention_backward_delta_kernel(OUT, GRAD_OUT, DELTA, seq_len_q,
                                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # Δ_i = Σ_d dO_id·O_id  (= Σ_j P_ij·dP_ij), one program per BLOCK_M rows of one (batch, head)
    batch_head = tl.program_id(0).to(tl.int64)
    block_m = tl.program_id(1)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    offsets = batch_head * seq_len_q * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
    ok = (rows[:, None] < seq_len_q) & (dims[None, :] < HEAD_DIM)
    out = tl.load(OUT + offsets, mask=ok, other=0.0).to(tl.float32)
    grad_out = tl.load(GRAD_OUT + offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + batch_head * seq_len_q + rows, tl.sum(out * grad_out, 1), mask=rows < seq_len_q)


@triton.jit
def _attention_backward_dkdv_kernel(
    Q, K, V, GRAD_OUT, LSE, DELTA, MASK, GRAD_K, GRAD_V, seq_len_q, seq_len_k, num_heads, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    # this program: keys [block_n·BLOCK_N, +BLOCK_N) of one (batch, head); loops over query blocks
    batch_head = tl.program_id(0)  # axis 0: up to 2³¹ − 1 programs (axes 1 and 2 stop at 65,535)
    block_n = tl.program_id(1)
    q_base = batch_head.to(tl.int64) * seq_len_q * HEAD_DIM
    k_base = batch_head.to(tl.int64) * seq_len_k * HEAD_DIM
    mask_row_ptr = MASK + (batch_head // num_heads).to(tl.int64) * seq_len_k
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims[None, :] < HEAD_DIM
    kv_offsets = k_base + cols[:, None] * HEAD_DIM + dims[None, :]
    kv_ok = (cols[:, None] < seq_len_k) & dim_ok
    k = tl.load(K + kv_offsets, mask=kv_ok, other=0.0).to(DTYPE)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + kv_offsets, mask=kv_ok, other=0.0).to(DTYPE)
    grad_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2_E

    start_m = 0
    if CAUSAL:  # query rows before the first one that can see key block_n·BLOCK_N see none of it
        first_row = tl.maximum(block_n * BLOCK_N - (seq_len_k - seq_len_q), 0)
        start_m = (first_row // BLOCK_M) * BLOCK_M
    for block_start in range(start_m, seq_len_q, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = rows < seq_len_q
        q_offsets = q_base + rows[:, None] * HEAD_DIM + dims[None, :]
        q = tl.load(Q + q_offsets, mask=row_ok[:, None] & dim_ok, other=0.0).to(DTYPE)  # (BLOCK_M, BLOCK_D)
        grad_out = tl.load(GRAD_OUT + q_offsets, mask=row_ok[:, None] & dim_ok, other=0.0).to(DTYPE)
        lse = tl.load(LSE + batch_head.to(tl.int64) * seq_len_q + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + batch_head.to(tl.int64) * seq_len_q + rows, mask=row_ok, other=0.0)
        # work with sᵀ (BLOCK_N, BLOCK_M) so that no computed tile needs a transpose
        scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        keep_t = _keep_mask(rows[None, :], cols[:, None], seq_len_q, seq_len_k, mask_row_ptr, CAUSAL, HAS_MASK)
        # Pᵀ = exp(sᵀ − lse) = 2^(sᵀ·log2 e − lse·log2 e), rebuilt instead of stored
        probs_t = tl.math.exp2(tl.where(keep_t, scores_t, float("-inf")) - lse[None, :] * LOG2_E)
        grad_v += tl.dot(probs_t.to(DTYPE), grad_out, input_precision=PRECISION)  # dV += Pᵀ·dO
        grad_probs_t = tl.dot(v, tl.trans(grad_out), input_precision=PRECISION)  # dPᵀ = V·dOᵀ
        grad_scores_t = probs_t * (grad_probs_t - delta[None, :])  # dSᵀ = Pᵀ∘(dPᵀ − Δ)
        grad_k += tl.dot(grad_scores_t.to(DTYPE), q, input_precision=PRECISION)  # dK += dSᵀ·Q (× scale below)
    tl.store(GRAD_K + kv_offsets, (grad_k * sm_scale).to(GRAD_K.dtype.element_ty), mask=kv_ok)
    tl.store(GRAD_V + kv_offsets, grad_v.to(GRAD_V.dtype.element_ty), mask=kv_ok)


@triton.jit
def _attention_backward_dq_kernel(
    Q, K, V, GRAD_OUT, LSE, DELTA, MASK, GRAD_Q, seq_len_q, seq_len_k, num_heads, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    # this program: query rows [block_m·BLOCK_M, +BLOCK_M) of one (batch, head); loops over key blocks
    batch_head = tl.program_id(0)  # axis 0: up to 2³¹ − 1 programs (axes 1 and 2 stop at 65,535)
    block_m = tl.program_id(1)
    q_base = batch_head.to(tl.int64) * seq_len_q * HEAD_DIM
    k_base = batch_head.to(tl.int64) * seq_len_k * HEAD_DIM
    mask_row_ptr = MASK + (batch_head // num_heads).to(tl.int64) * seq_len_k
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims[None, :] < HEAD_DIM
    row_ok = rows < seq_len_q
    q_offsets = q_base + rows[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(Q + q_offsets, mask=row_ok[:, None] & dim_ok, other=0.0).to(DTYPE)  # (BLOCK_M, BLOCK_D)
    grad_out = tl.load(GRAD_OUT + q_offsets, mask=row_ok[:, None] & dim_ok, other=0.0).to(DTYPE)
    lse = tl.load(LSE + batch_head.to(tl.int64) * seq_len_q + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + batch_head.to(tl.int64) * seq_len_q + rows, mask=row_ok, other=0.0)
    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2_E

    end_n = seq_len_k
    if CAUSAL:
        end_n = tl.minimum(seq_len_k, (block_m + 1) * BLOCK_M + seq_len_k - seq_len_q)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols[:, None] < seq_len_k
        k = tl.load(K + k_base + cols[:, None] * HEAD_DIM + dims[None, :], mask=col_ok & dim_ok, other=0.0).to(DTYPE)
        v = tl.load(V + k_base + cols[:, None] * HEAD_DIM + dims[None, :], mask=col_ok & dim_ok, other=0.0).to(DTYPE)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = _keep_mask(rows[:, None], cols[None, :], seq_len_q, seq_len_k, mask_row_ptr, CAUSAL, HAS_MASK)
        probs = tl.math.exp2(tl.where(keep, scores, float("-inf")) - lse[:, None] * LOG2_E)
        grad_probs = tl.dot(grad_out, tl.trans(v), input_precision=PRECISION)  # dP = dO·Vᵀ
        grad_scores = probs * (grad_probs - delta[:, None])  # dS = P∘(dP − Δ)
        grad_q += tl.dot(grad_scores.to(DTYPE), k, input_precision=PRECISION)  # dQ += dS·K
    tl.store(GRAD_Q + q_offsets, (grad_q * sm_scale).to(GRAD_Q.dtype.element_ty), mask=row_ok[:, None] & dim_ok)


def _launch_settings(head_dim, dtype, device, backward=False):
    """Fixed config table: (BLOCK_M, BLOCK_N, num_warps, num_stages). No autotuning (it needs a driver)."""
    if device.type != "cuda":
        return BLOCK_M_CPU, BLOCK_N_CPU, 1, 1
    if dtype == torch.float32:
        return BLOCK_M_FP32_GPU, BLOCK_N_FP32_GPU, 4 if head_dim <= 64 else 8, 2
    if backward and head_dim <= 64:
        return BLOCK_M_BACKWARD_GPU, BLOCK_N_BACKWARD_GPU, 4, 2
    if backward:
        return BLOCK_M_BACKWARD_LARGE_D_GPU, BLOCK_N_BACKWARD_GPU, 8, 2
    return BLOCK_M_GPU, BLOCK_N_GPU, 8, 3


# CUDA's limits on a launch grid: axis 0 may hold 2³¹ − 1 programs, axes 1 and 2 only 65,535 each.
MAX_GRID_AXIS_0, MAX_GRID_AXIS_1 = 2**31 - 1, 65_535


def launch_grid(seq_len, block, batch_heads):
    """(batch·heads, ⌈seq_len / block⌉): the many (batch, head) pairs on axis 0, the few blocks of one sequence
    on axis 1 (B·H = 65,536 would not fit on axis 1). Plain integers: no device work, no Triton helper call."""
    grid = (batch_heads, (seq_len + block - 1) // block)
    if grid[0] > MAX_GRID_AXIS_0 or grid[1] > MAX_GRID_AXIS_1:
        raise ValueError(f"kernels/attention.py flash_attention: launch grid {grid} exceeds CUDA's limits "
                         f"({MAX_GRID_AXIS_0:,} programs on axis 0, {MAX_GRID_AXIS_1:,} on axis 1)")
    return grid


def padded_head_dim(head_dim):
    """The tile width for head dim D: the next power of two, at least 16 (tl.arange and tl.dot need powers of
    two). D = 80 or 96 runs as 128 with the extra columns masked: correct, but the dots do D = 128's work."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _mask_argument(key_padding_mask, q):
    """The mask as uint8 (1 = real token); a dummy pointer when there is none."""
    if key_padding_mask is None:
        return torch.empty(1, dtype=torch.uint8, device=q.device), False
    return key_padding_mask.contiguous().view(torch.uint8), True


@torch.library.custom_op("nanollm::flash_attention_forward", mutates_args=())
def _flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             key_padding_mask: Optional[torch.Tensor],
                             causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, seq_len_q, head_dim = q.shape
    seq_len_k = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, H, T_q, D)
    lse = torch.empty(batch, heads, seq_len_q, dtype=torch.float32, device=q.device)  # (B, H, T_q)
    mask, has_mask = _mask_argument(key_padding_mask, q)
    block_m, block_n, num_warps, num_stages = _launch_settings(head_dim, q.dtype, q.device)
    _attention_forward_kernel[launch_grid(seq_len_q, block_m, batch * heads)](
        q, k, v, out, lse, mask, seq_len_q, seq_len_k, heads, sm_scale,
        HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, HAS_MASK=has_mask, DTYPE=_compute_dtype(q.dtype), PRECISION=DOT_PRECISION,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


@_flash_attention_forward.register_fake
def _(q, k, v, key_padding_mask, causal, sm_scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("nanollm::flash_attention_backward", mutates_args=())
def _flash_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                              causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, seq_len_q, head_dim = q.shape
    seq_len_k = k.shape[2]
    grad_out = grad_out.contiguous()
    grad_q, grad_k, grad_v = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    delta = torch.empty_like(lse)  # (B, H, T_q) fp32
    mask, has_mask = _mask_argument(key_padding_mask, q)
    block_d = padded_head_dim(head_dim)
    block_m, block_n, num_warps, num_stages = _launch_settings(head_dim, q.dtype, q.device, backward=True)
    _attention_backward_delta_kernel[launch_grid(seq_len_q, block_m, batch * heads)](
        out, grad_out, delta, seq_len_q, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m)
    shared = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
                  HAS_MASK=has_mask, DTYPE=_compute_dtype(q.dtype), PRECISION=DOT_PRECISION,
                  num_warps=num_warps, num_stages=num_stages)
    _attention_backward_dkdv_kernel[launch_grid(seq_len_k, block_n, batch * heads)](
        q, k, v, grad_out, lse, delta, mask, grad_k, grad_v, seq_len_q, seq_len_k, heads, sm_scale, **shared)
    _attention_backward_dq_kernel[launch_grid(seq_len_q, block_m, batch * heads)](
        q, k, v, grad_out, lse, delta, mask, grad_q, seq_len_q, seq_len_k, heads, sm_scale, **shared)
    return grad_q, grad_k, grad_v


@_flash_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, causal, sm_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, sm_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.sm_scale = causal, sm_scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    grad_q, grad_k, grad_v = _flash_attention_backward(grad_out, q, k, v, out, lse, key_padding_mask,
                                                       ctx.causal, ctx.sm_scale)
    return grad_q, grad_k, grad_v, None, None, None


_flash_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q, k, v, key_padding_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"kernels/attention.py flash_attention: q, k, v must be (B, H, T, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"kernels/attention.py flash_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} must share B, H and D, and k must equal v")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"kernels/attention.py flash_attention: q, k, v must share one dtype among "
                         f"fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_device(q, "kernels/attention.py flash_attention")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"kernels/attention.py flash_attention: head dim D={q.shape[3]} is not supported: D must "
                         f"be in 1..{MAX_HEAD_DIM} (a D = 256 tile set does not fit in registers with these tile "
                         f"sizes); use attn_impl='sdpa' for larger heads")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2])):
        raise ValueError(f"kernels/attention.py flash_attention: key_padding_mask must be bool (B, T_k) = "
                         f"{(k.shape[0], k.shape[2])}, got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def flash_attention(q, k, v, causal=False, key_padding_mask=None, sm_scale=None):
    """softmax(q·kᵀ·sm_scale + mask)·v on (B, H, T, D) tensors, fused; differentiable in q, k, v.

    key_padding_mask: (B, T_k) bool, True = real token, False = padding. sm_scale defaults to 1/√D.
    Inputs are made contiguous (a copy if they are transposed views).
    Head dim D: 1..128. A D that is not a power of two (e.g. 80, 96) runs padded to the next one (128), said once;
    D > 128 (e.g. 256) is refused with a ValueError: use PyTorch's SDPA (attn_impl='sdpa') there.
    """
    _check_inputs(q, k, v, key_padding_mask)
    head_dim = q.shape[-1]
    if padded_head_dim(head_dim) != head_dim:
        _say_once(f"kernels/attention.py: head dim D={head_dim} runs padded to {padded_head_dim(head_dim)} "
                  f"(masked columns; the dots cost what D={padded_head_dim(head_dim)} costs)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, _ = _flash_attention_forward(q, k, v, key_padding_mask, causal, scale)
    return out
