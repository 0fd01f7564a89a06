"""Transformer building blocks, and the decoder-only GPT assembled from them.

Teaches: scaled dot-product attention with causal, padding and cross-attention masks (Vaswani et al. 2017),
pre-LN vs post-LN blocks (Xiong et al. 2020), the GPT-2 layout (Radford et al. 2019), weight tying (Press & Wolf
2017), Xavier/He init (Glorot & Bengio 2010; He et al. 2015) and generation with a key/value cache. The same blocks
build BERT (nanollm/bert.py) and the encoder-decoder (nanollm/encdec.py). Three attention paths compute the same
thing: 'manual' (the math), 'sdpa' (PyTorch's fused kernel), 'triton' (our FlashAttention, kernels/attention.py).
Architecture options beside GPT-2's block, each a few lines: rotary positions (Su et al. 2021), RMSNorm (Zhang &
Sennrich 2019), SwiGLU (Shazeer 2020) and squared-ReLU (So et al. 2021) MLPs, grouped-query attention (Ainslie et
al. 2023), QK-norm (Henry et al. 2020; Dehghani et al. 2023), untied embeddings.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollm.configurator import UserError

ATTN_IMPLS = ("manual", "sdpa", "triton")
RUNTIME_FIELDS = ("attn_impl", "dropout")  # how a run executes, chosen per run: never saved with the weights
INITS = ("normal", "xavier", "he")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("learned", "rope")  # how a token knows where it is: a learned table added to the input | rotated q, k
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
ROPE_BASE = 10000.0  # θ_i = ROPE_BASE^(−2i/D) (Su et al. 2021): the slowest pair turns once in ~2π·10⁴ positions
_announced = set()


def _say_once(message):
    """Log a choice of code path once per process (we never switch paths silently)."""
    if message not in _announced:
        _announced.add(message)
        print(f"[nanollm] {message}")


@dataclass
class GPTConfig:
    """Hyperparameters shared by the three variants (GPT, BERT, encoder-decoder)."""
    vocab_size: int = 4096
    block_size: int = 256  # longest sequence (learned positions)
    n_layer: int = 4  # blocks (the encoder-decoder has n_layer in the encoder and n_layer in the decoder)
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    attn_impl: str = "sdpa"  # 'manual' | 'sdpa' | 'triton' | 'auto' (= 'sdpa'): a runtime choice, not architecture
    init: str = "normal"  # 'normal' (GPT-2) | 'xavier' | 'he'
    layer_norm_eps: float = 1e-5
    norm_position: str = "pre"  # 'pre' (GPT-2): x + f(LN(x)) | 'post' (Vaswani et al. 2017, BERT): LN(x + f(x))
    # the options below default to GPT-2's block; checkpoints saved before they existed load as GPT-2 blocks
    position: str = "learned"  # 'learned' (GPT-2: a table added to the input) | 'rope' (rotary, Su et al. 2021)
    norm: str = "layernorm"  # 'layernorm' (GPT-2) | 'rmsnorm' (Zhang & Sennrich 2019); eps is layer_norm_eps
    mlp: str = "gelu"  # 'gelu' (GPT-2) | 'swiglu' (Shazeer 2020) | 'relu2' (squared ReLU, So et al. 2021)
    n_kv_head: int = 0  # key/value heads: 0 = n_head (multi-head); 1 = multi-query; else grouped-query attention
    qk_norm: bool = False  # normalize each head's queries and keys (with `norm`) before their dot product
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix (Press & Wolf 2017)

    def __post_init__(self):
        if self.attn_impl == "auto":
            self.attn_impl = "sdpa"  # PyTorch's fused attention; 'triton' is ours, chosen explicitly
        if self.n_embd % self.n_head != 0:
            raise UserError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.attn_impl not in ATTN_IMPLS:
            raise UserError(f"attn_impl={self.attn_impl!r}: expected one of {ATTN_IMPLS}")
        if self.attn_impl == "triton":
            import kernels  # noqa: F401  (its import checks, before any work, that the kernels can run here)
        if self.init not in INITS:
            raise UserError(f"init={self.init!r}: expected one of {INITS}")
        if self.norm_position not in NORM_POSITIONS:
            raise UserError(f"norm_position={self.norm_position!r}: expected one of {NORM_POSITIONS}")
        for name, choices in (("position", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                raise UserError(f"{name}={getattr(self, name)!r}: expected one of {choices}")
        for name in ("qk_norm", "tie_embeddings", "bias"):
            if type(getattr(self, name)) is not bool:
                raise UserError(f"{name}={getattr(self, name)!r}: expected True or False")
        if type(self.n_kv_head) is not int or self.n_kv_head < 0 or self.n_head % (self.n_kv_head or self.n_head):
            raise UserError(f"n_kv_head={self.n_kv_head!r}: expected 0 (= n_head) or a divisor of n_head="
                            f"{self.n_head}")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"position='rope' rotates pairs of dimensions: head size n_embd/n_head="
                            f"{self.n_embd // self.n_head} must be even")

    @property
    def kv_heads(self):
        """Key/value heads: n_kv_head, or n_head when it is 0."""
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


def architecture_args(model_args):
    """A config (or a dict of its arguments) without RUNTIME_FIELDS: the architecture a checkpoint saves."""
    args = dataclasses.asdict(model_args) if dataclasses.is_dataclass(model_args) else dict(model_args)
    return {name: value for name, value in args.items() if name not in RUNTIME_FIELDS}


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions: (n_layer, B, H_kv, max_len, D).

    Only the key/value heads are stored (n_kv_head of them: grouped-query attention shrinks the cache by
    n_head / n_kv_head). `length` counts the positions already written; each forward appends T new ones.
    """

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, device, dtype):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.layer_keys = [self.keys[layer] for layer in range(n_layer)]  # per-layer views, made once
        self.layer_values = [self.values[layer] for layer in range(n_layer)]
        self.max_len = max_len
        self.length = 0

    def append(self, layer, k, v):
        """Write k, v (B, H_kv, T, D) in place after the cached positions (no concatenation, no new memory);
        return views of all keys/values so far, (B, H_kv, length + T, D)."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len={self.max_len}")
        keys, values = self.layer_keys[layer], self.layer_values[layer]  # (B, H_kv, max_len, D)
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


# ------------------------------------------------------------------------------------------ attention
def attention_mask_matrix(key_padding_mask, t_query, t_key, device, segment_ids=None, causal=True,
                          self_attention=True):
    """Boolean (B or 1, 1, Tq, Tk) matrix of allowed (query, key) pairs: causal, not padding, same segment.

    causal: queries are the last Tq of Tk positions (Tk > Tq while decoding with a cache); key j is visible from
    query i if j <= i. segment_ids (B, T) label the examples packed into one row: tokens attend only within their
    own example. In self-attention a padding query would see no key at all (0/0 in softmax), so each query may
    always see itself: its output is ignored anyway. Cross-attention needs at least one real key per row.
    """
    key_pos = torch.arange(t_key, device=device)[None, :]  # (1, Tk)
    query_pos = torch.arange(t_key - t_query, t_key, device=device)[:, None]  # (Tq, 1) absolute positions
    if causal:
        allowed = (key_pos <= query_pos)[None, None]  # (1, 1, Tq, Tk) lower triangle
    else:
        allowed = torch.ones(1, 1, t_query, t_key, dtype=torch.bool, device=device)  # every key visible
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()  # drop padding keys
        if self_attention:
            allowed = allowed | (key_pos == query_pos)[None, None]  # ...but a query always sees itself
    if segment_ids is not None:  # packed examples: block-diagonal (needs Tq == Tk)
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return allowed


def attend(q, k, v, attn_impl, causal, key_padding_mask=None, segment_ids=None, dropout_p=0.0,
           self_attention=True):
    """softmax(Q Kᵀ / √d + mask) V for q (B, H, Tq, D) and k, v (B, H_kv, Tk, D), by one of three paths."""
    t_query, t_key = q.size(2), k.size(2)
    if k.size(1) != q.size(1):  # grouped-query attention: each key/value head serves H / H_kv query heads
        k, v = repeat_kv_heads(k, q.size(1)), repeat_kv_heads(v, q.size(1))  # (B, H, Tk, D)
    if causal and t_query == 1 and self_attention:
        causal = False  # one new query is the newest position: every cached key is in its past, no mask to build
    if attn_impl == "triton" and segment_ids is None and (t_key == t_query or not self_attention):
        from kernels.attention import flash_attention

        if dropout_p > 0:
            raise ValueError("attn_impl='triton' has no attention dropout; set dropout=0.0")
        padding = key_padding_mask.bool() if key_padding_mask is not None else None
        k, v = k.to(q.dtype), v.to(q.dtype)  # under autocast q is bf16/fp16 while a KV cache may hold fp32
        return flash_attention(q, k, v, causal=causal, key_padding_mask=padding)
    if attn_impl == "manual":
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
        allowed = attention_mask_matrix(key_padding_mask, t_query, t_key, q.device, segment_ids, causal,
                                        self_attention)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = F.dropout(F.softmax(scores, dim=-1), dropout_p)
        return probs @ v  # (B, H, Tq, D)
    # 'sdpa' (PyTorch's fused kernel), also for 'triton' while decoding with a cache or with packed segments
    if attn_impl == "triton":
        _say_once("attn_impl='triton': KV-cache decoding and packed segments use PyTorch SDPA")
    plain = key_padding_mask is None and segment_ids is None and (t_key == t_query or not causal)
    mask = None if plain else attention_mask_matrix(key_padding_mask, t_query, t_key, q.device, segment_ids,
                                                    causal, self_attention)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=plain and causal)


def repeat_kv_heads(x, n_head):
    """(B, H_kv, T, D) -> (B, H, T, D): query head h reads key/value head h // (H / H_kv) (Ainslie et al. 2023)."""
    return x.repeat_interleave(n_head // x.size(1), dim=1)


# ------------------------------------------------------------------------------------- rotary positions
def rotary_angles(config, position_ids):
    """(cos, sin) of the rotation angles p·θ_i for position_ids (B or 1, T), each (B or 1, 1, T, D/2), with
    θ_i = ROPE_BASE^(−2i/D), i < D/2 (Su et al. 2021); None for learned positions. Computed once per forward."""
    if config.position != "rope":
        return None
    half = config.head_dim // 2
    frequencies = ROPE_BASE ** (-torch.arange(half, device=position_ids.device, dtype=torch.float32) / half)  # θ_i
    angles = position_ids[:, None, :, None].float() * frequencies  # (B or 1, 1, T, D/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, rotary):
    """Rotate each pair (x_i, x_{i+D/2}) of x (B, H, T, D) by its angle p·θ_i (RoPE, in the "rotate half" layout
    of GPT-NeoX and Llama in Hugging Face): then q_m·k_n depends on the positions m, n only through m − n."""
    cos, sin = (t.to(x.dtype) for t in rotary)  # (B or 1, 1, T, D/2)
    first, second = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def dropout_layer(p):
    """nn.Dropout(p), or a no-op module when p == 0 (one call less per layer and token while decoding)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def split_heads(x, n_head):
    """(B, T, C) -> (B, H, T, C/H)"""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(y):
    """(B, H, T, D) -> (B, T, H·D): heads side by side"""
    B, H, T, D = y.shape
    return y.transpose(1, 2).contiguous().view(B, T, H * D)


def qk_norms(config):
    """QK-norm (Henry et al. 2020; Dehghani et al. 2023): queries and keys normalized per head, each with its own
    scale over the head's D features, so attention logits cannot grow without bound. (None, None) when off."""
    if not config.qk_norm:
        return None, None
    return norm_layer(config, config.head_dim), norm_layer(config, config.head_dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention: causal (GPT, decoder) or bidirectional (BERT, encoder). With n_kv_head < n_head,
    grouped-query attention: fewer key/value heads, each shared by n_head / n_kv_head query heads."""

    def __init__(self, config: GPTConfig, causal=True):
        super().__init__()
        self.n_head, self.n_kv_head, self.causal = config.n_head, config.kv_heads, causal
        self.attn_impl, self.dropout = config.attn_impl, config.dropout
        self.kv_size = config.kv_heads * config.head_dim  # width of k and of v
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * self.kv_size, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm, self.k_norm = qk_norms(config)
        self.resid_dropout = dropout_layer(config.dropout)

    def forward(self, x, key_padding_mask=None, kv_cache=None, layer=0, segment_ids=None, rotary=None):
        # widths from the head counts: all heads, or this rank's share under tensor parallelism (nanollm/parallel.py)
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([q_size, kv_size, kv_size], dim=2)  # views of one matmul's output
        q, k, v = split_heads(q, self.n_head), split_heads(k, self.n_kv_head), split_heads(v, self.n_kv_head)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # (B, H, T, D), (B, H_kv, T, D)
        if rotary is not None:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)  # RoPE at each token's absolute position
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)  # (B, H_kv, Tk, D) with Tk = cached + T
        dropout_p = self.dropout if self.training else 0.0
        y = attend(q, k, v, self.attn_impl, self.causal, key_padding_mask, segment_ids, dropout_p)
        return self.resid_dropout(self.c_proj(merge_heads(y)))


class CrossAttention(nn.Module):
    """Decoder queries attend to the encoder output ("memory"). Keys and values depend on the memory only,
    so generation computes them once per source (`memory_keys_values`) and reuses them at every step."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.attn_impl, self.dropout = config.attn_impl, config.dropout
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_kv = nn.Linear(config.n_embd, 2 * config.kv_heads * config.head_dim, bias=config.bias)  # k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm, self.k_norm = qk_norms(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def memory_keys_values(self, memory):
        """memory (B, S, C) -> keys, values, each (B, H_kv, S, D). No rotary positions across the two sequences."""
        k, v = self.c_kv(memory).chunk(2, dim=2)
        k, v = split_heads(k, self.n_kv_head), split_heads(v, self.n_kv_head)
        return (k if self.k_norm is None else self.k_norm(k)), v

    def forward(self, x, memory_kv, memory_padding_mask=None):
        q = split_heads(self.c_q(x), self.n_head)  # (B, H, T, D)
        if self.q_norm is not None:
            q = self.q_norm(q)
        k, v = memory_kv  # (B, H_kv, S, D)
        dropout_p = self.dropout if self.training else 0.0
        y = attend(q, k, v, self.attn_impl, False, memory_padding_mask, None, dropout_p, self_attention=False)
        return self.resid_dropout(self.c_proj(merge_heads(y)))


def mlp_hidden_size(config):
    """The MLP's hidden width h: 4·C (GPT-2). SwiGLU has three C×h matrices instead of two, so h = 8C/3 (rounded up
    to a multiple of 8) keeps its parameters about equal to GELU's 8C², as Shazeer 2020 does."""
    if config.mlp == "swiglu":
        return 8 * -(-8 * config.n_embd // 3 // 8)  # C = 128: 344, 3·128·344 = 132,096 weights vs 131,072
    return 4 * config.n_embd


class MLP(nn.Module):
    """Position-wise feed-forward network: C -> h -> C with a nonlinearity (config.mlp) between."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind, hidden = config.mlp, mlp_hidden_size(config)
        gated = config.mlp == "swiglu"  # SwiGLU's gate and value come from one matmul, side by side
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if gated else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = dropout_layer(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, h), or (B, T, 2h) for SwiGLU
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value  # SwiGLU(x) = Swish(x·W) ⊙ (x·V) (Shazeer 2020)
        elif self.kind == "relu2":
            h = F.relu(h).square()  # ReLU(x)² (So et al. 2021, Primer)
        else:
            h = F.gelu(h, approximate="tanh")  # GELU, tanh form (GPT-2)
        return self.dropout(self.c_proj(h))


def norm_layer(config, size=None):
    """The normalization config.norm over the last `size` features (default n_embd), with a learned scale g:
    LayerNorm (Ba et al. 2016): (x − mean(x)) / √(var(x) + ε) · g + b;
    RMSNorm (Zhang & Sennrich 2019): x / √(mean(x²) + ε) · g (no centering, no bias: cheaper)."""
    size = size or config.n_embd
    if config.norm == "rmsnorm":
        return nn.RMSNorm(size, eps=config.layer_norm_eps)
    return nn.LayerNorm(size, eps=config.layer_norm_eps, bias=config.bias)


def final_norm(config):
    """The norm after the last block: needed by pre-LN stacks only (post-LN blocks end normalized)."""
    return norm_layer(config) if config.norm_position == "pre" else nn.Identity()


class Block(nn.Module):
    """One transformer layer: self-attention, cross-attention (encoder-decoder's decoder only), MLP.

    pre-LN (default, GPT-2): x + f(LN(x)), a clean residual path that trains without careful warmup.
    post-LN (the original Transformer, BERT): LN(x + f(x)).
    """

    def __init__(self, config: GPTConfig, causal=True, cross_attention=False):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.ln_1 = norm_layer(config)  # ln_*: the block's norms (LayerNorm or RMSNorm, config.norm)
        self.attn = SelfAttention(config, causal)
        self.ln_cross = norm_layer(config) if cross_attention else None
        self.cross_attn = CrossAttention(config) if cross_attention else None
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def residual(self, x, norm, sublayer):
        if self.post_norm:
            return norm(x + sublayer(x))  # post-LN
        return x + sublayer(norm(x))  # pre-LN

    def forward(self, x, key_padding_mask=None, kv_cache=None, layer=0, segment_ids=None, memory_kv=None,
                memory_padding_mask=None, rotary=None):
        x = self.residual(x, self.ln_1, lambda h: self.attn(h, key_padding_mask, kv_cache, layer, segment_ids,
                                                            rotary))
        if self.cross_attn is not None:
            x = self.residual(x, self.ln_cross, lambda h: self.cross_attn(h, memory_kv, memory_padding_mask))
        return self.residual(x, self.ln_2, self.mlp)


class Embeddings(nn.Module):
    """Token + learned position (+ segment) embeddings, then dropout (used by BERT and the encoder-decoder;
    the GPT keeps its wte/wpe at the top level, GPT-2's layout). Post-LN models normalize them here (BERT).
    With position='rope' there is no position table: the attention layers rotate q and k instead."""

    def __init__(self, config: GPTConfig, n_segments=0, token_embedding=None):
        super().__init__()
        self.wte = token_embedding if token_embedding is not None else nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.wse = nn.Embedding(n_segments, config.n_embd) if n_segments else None  # segment A/B
        self.ln = norm_layer(config) if config.norm_position == "post" else nn.Identity()
        self.drop = dropout_layer(config.dropout)

    def forward(self, idx, position_ids, segment_ids=None):
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        if self.wse is not None:
            x = x + self.wse(segment_ids if segment_ids is not None else torch.zeros_like(idx))
        return self.drop(self.ln(x))


# ----------------------------------------------------------------------------- shared model utilities
def position_ids_for(attention_mask, past, length, device, block_size):
    """Positions of `length` new tokens after `past` cached ones, (B or 1, T); with a padding mask (B, past+T)
    they count real tokens only, so left padding does not shift them."""
    if past + length > block_size:
        raise UserError(f"sequence of {past + length} tokens exceeds block_size={block_size}")
    if attention_mask is None:
        return torch.arange(past, past + length, device=device)[None, :]  # (1, T)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + length]  # (B, T)


def init_weights(model, init, n_layer):
    """Initialize every weight by `init`; biases 0, norm scales 1, embeddings N(0, 0.02).
    Linear layers tied to an embedding keep the embedding's init."""
    residual_std = 0.02 / math.sqrt(2 * n_layer)  # GPT-2: residual projections scaled by 1/√(2L)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in embedding_weights:
            if init == "xavier":
                nn.init.xavier_uniform_(module.weight)  # Var = 2 / (fan_in + fan_out)
            elif init == "he":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")  # Var = 2 / fan_in
            else:
                std = residual_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:  # tied un-embedding with its own bias
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:  # RMSNorm has none
                nn.init.zeros_(module.bias)


def cross_entropy_loss(logits, targets):
    """Mean cross-entropy over the targets != -100 (ignored); 0, not 0/0 = NaN, when all are ignored
    (an MLM batch may select no token, an SFT micro-batch may hold only prompt tokens)."""
    total = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


def parameter_table(groups, total):
    """Format {group name: count} and the total as the table `parameter_report` prints."""
    lines = [f"  {name:<38s}{count:>12,d}" for name, count in groups.items()]
    lines.append(f"  {'total':<38s}{total:>12,d}  ({total / 1e6:.2f} M)")
    return "\n".join(lines)


def stop_finished_rows(next_token, finished, eos_id):
    """A row that emitted eos_id keeps emitting it. Returns (next_token, finished) both (B,)."""
    if eos_id is None:
        return next_token, finished
    next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
    return next_token, finished | (next_token == eos_id)


# ------------------------------------------------------------------------------------------------ GPT
class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        learned = config.position == "learned"  # else rope: no table, each layer rotates q and k
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if learned else None  # learned positions
        self.drop = dropout_layer(config.dropout)
        self.blocks = nn.ModuleList([Block(config, causal=True) for _ in range(config.n_layer)])
        self.ln_f = final_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying: one matrix embeds and un-embeds tokens
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- init
    def reset_parameters(self):
        init_weights(self, self.config.init, self.config.n_layer)

    def num_parameters(self, exclude_positions=False):
        """Parameters counted once (a tied lm_head shares wte's matrix)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if exclude_positions and self.wpe is not None else n

    def parameter_report(self):
        """A short table of where the parameters are."""
        c = self.config
        tied = " (tied with lm_head)" if c.tie_embeddings else ""
        groups = {f"token embedding{tied}": self.wte.weight.numel()}
        if not c.tie_embeddings:
            groups["lm_head"] = self.lm_head.weight.numel()
        if self.wpe is not None:
            groups["position embedding"] = self.wpe.weight.numel()
        groups.update({
            f"{c.n_layer} x attention": sum(p.numel() for b in self.blocks for p in b.attn.parameters()),
            f"{c.n_layer} x MLP ({c.mlp})": sum(p.numel() for b in self.blocks for p in b.mlp.parameters()),
            "LayerNorms" if c.norm == "layernorm" else "RMSNorms": sum(p.numel() for n, p in self.named_parameters()
                                                                       if "ln_" in n),
        })
        return parameter_table(groups, self.num_parameters())

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token, forward + backward (Kaplan et al. 2020; PaLM appendix B): 6N + 12·L·C·T."""
        T = seq_len or self.config.block_size
        return 6 * self.num_parameters(exclude_positions=True) + 12 * self.config.n_layer * self.config.n_embd * T

    # ------------------------------------------------------------------------- the pretraining objective
    def objective_batch(self, x, y, generator=None):
        """A block x (B, T) of the token stream and y, the same block one token later, as training inputs:
        next-token prediction (Radford et al. 2018)."""
        return dict(idx=x, targets=y)

    def sample_text(self, tokenizer, prompt, max_new_tokens, temperature=0.8, top_k=50):
        """The prompt (text) continued by sampling, as text."""
        ids = torch.tensor([tokenizer.encode(prompt, bos=True)], device=self.wte.weight.device)  # (1, T)
        out = self.generate(ids, min(max_new_tokens, self.config.block_size - ids.size(1)), temperature=temperature,
                            top_k=top_k, eos_id=tokenizer.eos_id)
        return tokenizer.decode(out[0].tolist())

    # -------------------------------------------------------------------------------------- forward
    def forward(self, idx, targets=None, attention_mask=None, position_ids=None, kv_cache=None, segment_ids=None):
        """idx (B, T) token ids -> logits (B, T, V), and the mean cross-entropy if targets are given.

        attention_mask (B, Tk): 1 for real tokens, 0 for padding, over all positions seen so far (cache + idx).
        segment_ids (B, T): packed examples; pass position_ids that restart at 0 for each example.
        Targets equal to -100 are ignored by the loss (0, not NaN, if all are).
        """
        logits = self.lm_head(self.hidden_states(idx, attention_mask, position_ids, kv_cache, segment_ids))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, cross_entropy_loss(logits, targets)

    def hidden_states(self, idx, attention_mask=None, position_ids=None, kv_cache=None, segment_ids=None):
        """(B, T) ids -> (B, T, C) final hidden states (after ln_f), the input of the LM head; reward models and
        critics put their own head on these. Arguments as in forward."""
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = position_ids_for(attention_mask, past, T, idx.device, self.config.block_size)
        elif past + T > self.config.block_size:
            raise UserError(f"sequence of {past + T} tokens exceeds block_size={self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)  # learned positions (GPT-2)
        x = self.drop(x)
        rotary = rotary_angles(self.config, position_ids)  # rope: angles at the absolute positions, for every layer
        key_padding_mask = attention_mask.bool() if attention_mask is not None else None
        for layer, block in enumerate(self.blocks):
            x = block(x, key_padding_mask, kv_cache, layer, segment_ids, rotary=rotary)
        if kv_cache is not None:
            kv_cache.length += T
        return self.ln_f(x)

    def new_kv_cache(self, batch_size, max_len, device=None, dtype=None):
        c = self.config
        weight = self.wte.weight
        kv_heads = self.blocks[0].attn.n_kv_head  # the heads this process computes (all but under tensor parallelism)
        return KVCache(c.n_layer, batch_size, kv_heads, max_len, c.head_dim, device or weight.device,
                       dtype or weight.dtype)

    # ----------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 attention_mask=None, use_cache=True, generator=None, banned_ids=None):
        """Append up to max_new_tokens to each row of idx (B, T); temperature 0 means greedy.

        With attention_mask, prompts are left-padded. A row that emitted eos_id keeps emitting eos_id,
        and generation stops when every row has. banned_ids (e.g. chat role ids) are never sampled.
        Returns (B, T + n_generated).
        """
        new_tokens = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_id,
                                               attention_mask, use_cache, generator, banned_ids))
        return torch.cat([idx] + [token[:, None] for token in new_tokens], dim=1)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                        attention_mask=None, use_cache=True, generator=None, banned_ids=None):
        """Like generate, but yields each step's new tokens (B,) as soon as they are sampled (for streaming)."""
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise UserError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size="
                             f"{self.config.block_size}")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: positions are 0..T-1 and no layer builds a padding mask
        if use_cache:
            yield from self._generate_with_cache(idx, max_new_tokens, temperature, top_k, top_p, eos_id,
                                                 attention_mask, generator, banned_ids)
            return
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):  # the slow reference: the whole sequence runs again for every new token
            logits, _ = self(idx, attention_mask=attention_mask)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator,
                                           banned_ids)  # (B,)
            next_token, finished = stop_finished_rows(next_token, finished, eos_id)
            yield next_token
            idx = torch.cat([idx, next_token[:, None]], dim=1)
            if attention_mask is not None:
                attention_mask = F.pad(attention_mask, (0, 1), value=1)  # the new token is real
            if eos_id is not None and bool(finished.all()):
                break

    def _generate_with_cache(self, idx, max_new_tokens, temperature, top_k, top_p, eos_id, attention_mask,
                             generator, banned_ids):
        """The prompt runs once (prefill); then each step feeds only the newest token, whose keys and values
        are written in place into a cache preallocated for the whole generation."""
        B, T = idx.shape
        cache = self.new_kv_cache(B, T + max_new_tokens)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        if attention_mask is not None:  # left padding: one mask for every position, generated ones are real
            full_mask = F.pad(attention_mask, (0, max_new_tokens), value=1)  # (B, T + max_new_tokens)
        logits, _ = self(idx, attention_mask=attention_mask, kv_cache=cache)  # prefill: (B, T, V)
        for step in range(max_new_tokens):
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator,
                                           banned_ids)  # (B,)
            next_token, finished = stop_finished_rows(next_token, finished, eos_id)
            yield next_token
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                break  # no forward pass for a token nobody will sample after
            step_mask = None if attention_mask is None else full_mask[:, :T + step + 1]  # (B, cached + 1)
            logits, _ = self(next_token[:, None], attention_mask=step_mask, kv_cache=cache)  # (B, 1, V)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None, banned_ids=None):
    """logits (B, V) -> token ids (B,). Greedy when temperature == 0; otherwise softmax(logits / temperature),
    optionally restricted to the top_k tokens and to the smallest set whose probability reaches top_p (nucleus).
    banned_ids get logit −inf first, so they are never chosen."""
    if banned_ids:
        logits = logits.index_fill(-1, torch.tensor(banned_ids, device=logits.device), float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - F.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
