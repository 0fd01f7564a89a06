"""Encoder-decoder transformer (Vaswani et al. 2017) with BART's denoising objective (Lewis et al. 2020).

The encoder reads a corrupted text bidirectionally; the decoder writes the original left to right, attending to its
own past (causal self-attention) and to the encoder output (cross-attention). Objective, BART text infilling: spans
with Poisson(λ=3) lengths covering 30% of the tokens are each replaced by ONE <|mask|>, so the model must also infer
how many tokens are missing. We chose it over T5 span corruption because it needs only the reserved <|mask|> token
(T5 needs sentinel tokens our tokenizer does not reserve). Generation caches decoder self-attention keys/values and
computes the cross-attention keys/values once per source.
"""
import torch
import torch.nn as nn

from nanollm.configurator import UserError
from nanollm.model import (Block, Embeddings, GPTConfig, KVCache, cross_entropy_loss, final_norm, init_weights,
                           parameter_table, position_ids_for, rotary_angles, sample_next_token, stop_finished_rows)
from nanollm.tokenizer import BOS_ID, PAD_ID, Tokenizer

MASK_ID = Tokenizer.mask_id  # <|mask|>, reserved by the tokenizer

MASK_RATIO = 0.3  # share of tokens inside masked spans (BART)
MEAN_SPAN = 3.0  # Poisson λ of the span lengths (BART)


class EncoderDecoder(nn.Module):
    """n_layer encoder blocks and n_layer decoder blocks; one token matrix embeds source and target and
    un-embeds the output (tied three ways, as in BART)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.encoder_embeddings = Embeddings(config, token_embedding=self.wte)
        self.encoder_blocks = nn.ModuleList([Block(config, causal=False) for _ in range(config.n_layer)])
        self.encoder_ln = final_norm(config)
        self.decoder_embeddings = Embeddings(config, token_embedding=self.wte)
        self.decoder_blocks = nn.ModuleList([Block(config, causal=True, cross_attention=True)
                                             for _ in range(config.n_layer)])
        self.decoder_ln = final_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying
        init_weights(self, config.init, config.n_layer)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def parameter_report(self):
        c = self.config

        def count(modules):
            return sum(p.numel() for m in modules for p in m.parameters())

        groups = {
            "token embedding (shared" + (", tied)" if c.tie_embeddings else ")"): self.wte.weight.numel(),
            "position embeddings (enc + dec)": count([self.encoder_embeddings.wpe, self.decoder_embeddings.wpe]
                                                     if c.position == "learned" else []),
            f"encoder: {c.n_layer} x (attention + MLP + LN)": count(self.encoder_blocks) + count([self.encoder_ln]),
            f"decoder: {c.n_layer} x self-attention": count(b.attn for b in self.decoder_blocks),
            f"decoder: {c.n_layer} x cross-attention": count(b.cross_attn for b in self.decoder_blocks),
            f"decoder: {c.n_layer} x (MLP + LN)": count(self.decoder_blocks) + count([self.decoder_ln])
            - count(b.attn for b in self.decoder_blocks) - count(b.cross_attn for b in self.decoder_blocks),
        }
        if not c.tie_embeddings:
            groups["lm_head"] = self.lm_head.weight.numel()
        return parameter_table(groups, self.num_parameters())

    # ---------------------------------------------------------------------------------------- passes
    def encode(self, src, src_attention_mask=None):
        """src (B, S) -> memory (B, S, C). src_attention_mask (B, S): 1 real token, 0 padding."""
        position_ids = position_ids_for(src_attention_mask, 0, src.size(1), src.device, self.config.block_size)
        x = self.encoder_embeddings(src, position_ids)
        rotary = rotary_angles(self.config, position_ids)  # None for learned positions
        padding = src_attention_mask.bool() if src_attention_mask is not None else None
        for block in self.encoder_blocks:
            x = block(x, padding, rotary=rotary)  # bidirectional
        return self.encoder_ln(x)

    def cross_keys_values(self, memory):
        """Each decoder layer's cross-attention keys and values of the memory: a list of n_layer (k, v) pairs."""
        return [block.cross_attn.memory_keys_values(memory) for block in self.decoder_blocks]

    def decode(self, tgt, memory_kv, src_attention_mask=None, kv_cache=None):
        """tgt (B, T) decoder input ids -> logits (B, T, V); positions continue after the kv_cache's."""
        past = kv_cache.length if kv_cache is not None else 0
        position_ids = position_ids_for(None, past, tgt.size(1), tgt.device, self.config.block_size)
        x = self.decoder_embeddings(tgt, position_ids)  # (B, T, C)
        rotary = rotary_angles(self.config, position_ids)  # self-attention only; cross-attention has no rotation
        padding = src_attention_mask.bool() if src_attention_mask is not None else None
        for layer, block in enumerate(self.decoder_blocks):
            x = block(x, kv_cache=kv_cache, layer=layer, memory_kv=memory_kv[layer], memory_padding_mask=padding,
                      rotary=rotary)
        if kv_cache is not None:
            kv_cache.length += tgt.size(1)
        return self.lm_head(self.decoder_ln(x))

    def forward(self, src, tgt, targets=None, src_attention_mask=None):
        """Teacher forcing: logits (B, T, V) for decoder inputs tgt given source src; loss over targets != -100."""
        memory = self.encode(src, src_attention_mask)
        logits = self.decode(tgt, self.cross_keys_values(memory), src_attention_mask)
        if targets is None:
            return logits, None
        return logits, cross_entropy_loss(logits, targets)

    def objective_batch(self, x, y=None, generator=None):
        """A block x (B, T) of the token stream as training inputs: BART text infilling (Lewis et al. 2020)."""
        return infilling_batch(x, generator)

    def sample_text(self, tokenizer, prompt, max_new_tokens, temperature=0.8, top_k=50):
        """The decoder rewrites the prompt with a <|mask|> appended, writing out that span, as text."""
        src = torch.tensor([tokenizer.encode(prompt, bos=True) + [tokenizer.mask_id]],
                           device=self.wte.weight.device)  # (1, S)
        out = self.generate(src, min(max_new_tokens, self.config.block_size - 1), temperature=temperature,
                            top_k=top_k, eos_id=tokenizer.eos_id)
        return tokenizer.decode(out[0].tolist())

    def new_kv_cache(self, batch_size, max_len, device=None, dtype=None):
        c, weight = self.config, self.wte.weight
        return KVCache(c.n_layer, batch_size, c.kv_heads, max_len, c.head_dim, device or weight.device,
                       dtype or weight.dtype)

    # ------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, src, max_new_tokens, src_attention_mask=None, temperature=0.0, top_k=None, top_p=None,
                 eos_id=None, start_id=BOS_ID, use_cache=True, generator=None):
        """Decoder output for each source row: (B, 1 + n_generated), starting with start_id.

        With the cache, the encoder runs once, cross-attention keys/values are computed once, and each step feeds
        one token. Without it, every step reruns the whole model (the reference the cache must match).
        """
        B = src.size(0)
        if 1 + max_new_tokens > self.config.block_size:
            raise UserError(f"1 + max_new_tokens ({max_new_tokens}) exceeds block_size={self.config.block_size}")
        tgt = torch.full((B, 1), start_id, dtype=torch.long, device=src.device)
        if use_cache:
            memory_kv = self.cross_keys_values(self.encode(src, src_attention_mask))  # once per source
            cache = self.new_kv_cache(B, 1 + max_new_tokens)
        finished = torch.zeros(B, dtype=torch.bool, device=src.device)
        step_input = tgt
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self.decode(step_input, memory_kv, src_attention_mask, kv_cache=cache)
            else:
                logits, _ = self(src, tgt, src_attention_mask=src_attention_mask)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
            next_token, finished = stop_finished_rows(next_token, finished, eos_id)
            tgt = torch.cat([tgt, next_token[:, None]], dim=1)
            step_input = next_token[:, None]
            if eos_id is not None and bool(finished.all()):
                break
        return tgt


# ----------------------------------------------------------------------------------------- objective
def infill(tokens, generator=None, mask_ratio=MASK_RATIO, mean_span=MEAN_SPAN, mask_id=MASK_ID):
    """BART text infilling of one sequence tokens (T,) -> corrupted (S,), S <= T.

    Spans with lengths ~ Poisson(mean_span) (at least 1; BART's 0-length insertions are left out) are drawn at
    random until round(mask_ratio·T) tokens are covered; overlapping spans merge. Each run of covered tokens is
    replaced by a single mask_id.
    """
    T = tokens.numel()
    covered = torch.zeros(T, dtype=torch.bool)
    budget = round(mask_ratio * T)
    while int(covered.sum()) < budget:
        length = max(1, int(torch.poisson(torch.tensor([mean_span]), generator=generator)))
        length = min(length, budget - int(covered.sum()))
        start = int(torch.randint(0, T - length + 1, (1,), generator=generator))
        covered[start:start + length] = True
    run_start = covered & ~torch.cat([torch.zeros(1, dtype=torch.bool), covered[:-1]])  # first token of each span
    keep = ~covered | run_start
    return torch.where(run_start, torch.full_like(tokens, mask_id), tokens)[keep]


def infilling_batch(x, generator=None, mask_ratio=MASK_RATIO, mean_span=MEAN_SPAN, start_id=BOS_ID):
    """A block x (B, T) of the token stream -> the model's keyword arguments for BART infilling.

    src (B, S): each row infilled, right-padded with <pad>; src_attention_mask (B, S);
    tgt (B, T) = start_id, x[:, :-1] (decoder input, shifted right); targets (B, T) = x (the original text).
    """
    rows = [infill(row, generator, mask_ratio, mean_span) for row in x.cpu()]
    width = max(row.numel() for row in rows)
    src = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    src_attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        src[i, :row.numel()] = row
        src_attention_mask[i, :row.numel()] = 1
    tgt = torch.cat([torch.full_like(x[:, :1], start_id), x[:, :-1]], dim=1)
    return dict(src=src.to(x.device), tgt=tgt, targets=x, src_attention_mask=src_attention_mask.to(x.device))
