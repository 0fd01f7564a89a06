"""A decoder-only GPT written out by hand: embeddings, pre-LayerNorm blocks, causal multi-head attention, MLP.

Teaches: scaled dot-product attention (Vaswani et al. 2017), the GPT-2 layout (Radford et al. 2019),
weight tying (Press & Wolf 2017), Xavier/He initialization (Glorot & Bengio 2010; He et al. 2015) and
generation with a key/value cache. Three attention paths compute the same thing: 'manual' (the math),
'sdpa' (PyTorch's fused kernel) and 'triton' (our FlashAttention kernel in kernels/attention.py).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_IMPLS = ("manual", "sdpa", "triton")
INITS = ("normal", "xavier", "he")
_announced = set()


def _say_once(message):
    """Log a choice of code path once per process (we never switch paths silently)."""
    if message not in _announced:
        _announced.add(message)
        print(f"[nanollm] {message}")


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256  # longest sequence (learned positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    attn_impl: str = "sdpa"  # 'manual' | 'sdpa' | 'triton'
    init: str = "normal"  # 'normal' (GPT-2) | 'xavier' | 'he'
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r}: expected one of {ATTN_IMPLS}")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}: expected one of {INITS}")


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions: (n_layer, B, H, max_len, D).

    `length` counts the positions already written; each forward appends T new ones.
    """

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device, dtype):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def append(self, layer, k, v):
        """Write k, v (B, H, T, D) after the cached positions; return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len={self.max_len}")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def attention_mask_matrix(key_padding_mask, t_query, t_key, device, segment_ids=None):
    """Boolean (B or 1, 1, Tq, Tk) matrix of allowed (query, key) pairs: causal, not padding, same segment.

    segment_ids (B, T) label the examples packed into one row: tokens attend only within their own example.
    Queries are the last Tq of Tk positions (Tk > Tq while decoding with a cache). A padding query would
    see no key at all (0/0 in softmax), so each query may always see itself: its output is ignored anyway.
    """
    query_pos = torch.arange(t_key - t_query, t_key, device=device)[:, None]  # (Tq, 1) absolute positions
    key_pos = torch.arange(t_key, device=device)[None, :]  # (1, Tk)
    allowed = (key_pos <= query_pos)[None, None]  # (1, 1, Tq, Tk) causal: key j visible from query i if j <= i
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()  # drop padding keys
        allowed = allowed | (key_pos == query_pos)[None, None]  # ...but a query always sees itself
    if segment_ids is not None:  # packed examples: block-diagonal (needs Tq == Tk)
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return allowed


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.attn_impl = config.attn_impl
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, key_padding_mask=None, kv_cache=None, layer=0, segment_ids=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)  # (B, H, Tk, D) with Tk = cached + T
        t_key = k.size(2)
        plain_causal = key_padding_mask is None and segment_ids is None and t_key == T  # the common training case
        dropout_p = self.dropout if self.training else 0.0

        if self.attn_impl == "triton" and t_key == T and segment_ids is None:
            from kernels.attention import flash_attention

            if dropout_p > 0:
                raise ValueError("attn_impl='triton' has no attention dropout; set dropout=0.0")
            y = flash_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)
        elif self.attn_impl == "manual":
            # softmax(Q Kᵀ / √d + mask) V, written out
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, Tk)
            allowed = attention_mask_matrix(key_padding_mask, T, t_key, x.device, segment_ids)
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = self.attn_dropout(F.softmax(scores, dim=-1))
            y = probs @ v  # (B, H, T, D)
        else:  # 'sdpa', and 'triton' while decoding with a cache (Tq != Tk)
            if self.attn_impl == "triton":
                _say_once("attn_impl='triton': KV-cache decoding and packed segments use PyTorch SDPA")
            mask = None if plain_causal else attention_mask_matrix(key_padding_mask, T, t_key, x.device, segment_ids)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=plain_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, key_padding_mask=None, kv_cache=None, layer=0, segment_ids=None):
        x = x + self.attn(self.ln_1(x), key_padding_mask, kv_cache, layer, segment_ids)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix embeds and un-embeds tokens
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- init
    def reset_parameters(self):
        """Initialize every weight by `config.init`; biases 0, LayerNorm scale 1, embeddings N(0, 0.02)."""
        init = self.config.init
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)  # GPT-2: residual projections scaled by 1/√(2L)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head:
                if init == "xavier":
                    nn.init.xavier_uniform_(module.weight)  # Var = 2 / (fan_in + fan_out)
                elif init == "he":
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")  # Var = 2 / fan_in
                else:
                    std = residual_std if name.endswith("c_proj") else 0.02
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_positions=False):
        """Parameters counted once (the tied lm_head shares wte's matrix)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if exclude_positions else n

    def parameter_report(self):
        """A short table of where the parameters are."""
        c = self.config
        groups = {
            "token embedding (tied with lm_head)": self.wte.weight.numel(),
            "position embedding": self.wpe.weight.numel(),
            f"{c.n_layer} x attention": sum(p.numel() for b in self.blocks for p in b.attn.parameters()),
            f"{c.n_layer} x MLP": sum(p.numel() for b in self.blocks for p in b.mlp.parameters()),
            "LayerNorms": sum(p.numel() for n, p in self.named_parameters() if "ln_" in n),
        }
        lines = [f"  {k:<38s}{v:>12,d}" for k, v in groups.items()]
        lines.append(f"  {'total':<38s}{self.num_parameters():>12,d}  ({self.num_parameters() / 1e6:.2f} M)")
        return "\n".join(lines)

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token, forward + backward (Kaplan et al. 2020; PaLM appendix B): 6N + 12·L·C·T."""
        T = seq_len or self.config.block_size
        return 6 * self.num_parameters(exclude_positions=True) + 12 * self.config.n_layer * self.config.n_embd * T

    # -------------------------------------------------------------------------------------- forward
    def forward(self, idx, targets=None, attention_mask=None, position_ids=None, kv_cache=None, segment_ids=None):
        """idx (B, T) token ids -> logits (B, T, V), and the mean cross-entropy if targets are given.

        attention_mask (B, Tk): 1 for real tokens, 0 for padding, over all positions seen so far (cache + idx).
        segment_ids (B, T): packed examples; pass position_ids that restart at 0 for each example.
        Targets equal to -100 are ignored by the loss.
        """
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=idx.device)[None, :]  # (1, T)
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size={self.config.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(position_ids))  # (B, T, C)
        key_padding_mask = attention_mask.bool() if attention_mask is not None else None
        for layer, block in enumerate(self.blocks):
            x = block(x, key_padding_mask, kv_cache, layer, segment_ids)
        if kv_cache is not None:
            kv_cache.length += T
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def new_kv_cache(self, batch_size, max_len, device=None, dtype=None):
        c = self.config
        weight = self.wte.weight
        return KVCache(c.n_layer, batch_size, c.n_head, max_len, c.n_embd // c.n_head,
                       device or weight.device, dtype or weight.dtype)

    # ----------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 attention_mask=None, use_cache=True, generator=None):
        """Append up to max_new_tokens to each row of idx (B, T); temperature 0 means greedy.

        With attention_mask, prompts are left-padded. A row that emitted eos_id keeps emitting eos_id,
        and generation stops when every row has. Returns (B, T + n_generated).
        """
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size="
                             f"{self.config.block_size}")
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        cache = self.new_kv_cache(B, T + max_new_tokens) if use_cache else None
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        step_input = idx
        for _ in range(max_new_tokens):
            if use_cache:
                logits, _ = self(step_input, attention_mask=attention_mask, kv_cache=cache)
            else:
                logits, _ = self(idx, attention_mask=attention_mask)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
                finished |= next_token == eos_id
            idx = torch.cat([idx, next_token[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)[:, None]], dim=1)
            step_input = next_token[:, None]
            if eos_id is not None and bool(finished.all()):
                break
        return idx


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> token ids (B,). Greedy when temperature == 0; otherwise softmax(logits / temperature),
    optionally restricted to the top_k tokens and to the smallest set whose probability reaches top_p (nucleus)."""
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
