"""BERT: a bidirectional transformer encoder trained by masked-language modeling, built from nanollm/model.py.

Teaches why an encoder sees both sides (no causal mask, only a padding mask) and the MLM objective of Devlin et al.
2019: 15% of tokens are selected; of those 80% become <|mask|>, 10% a random token, 10% stay unchanged; the loss is
taken on the selected positions only. Like RoBERTa (Liu et al. 2019) we drop next-sentence prediction and train on
packed windows of the token stream. The first token (<s>, BERT's [CLS]), pooled, feeds a classification head.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollm.model import (Block, Embeddings, GPTConfig, cross_entropy_loss, final_norm, init_weights, norm_layer,
                           parameter_table, position_ids_for, rotary_angles)
from nanollm.tokenizer import NUM_RESERVED, Tokenizer

MASK_ID = Tokenizer.mask_id  # <|mask|>, reserved by the tokenizer
MLM_PROBABILITY = 0.15  # share of tokens selected for prediction (Devlin et al. 2019)
MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # of the selected: <|mask|>, random token; the remaining 10% stay


@dataclass
class BertConfig(GPTConfig):
    n_segments: int = 2  # segment (token type) embeddings for sentence pairs A/B; 0 = none
    n_classes: int = 0  # classes of the head on the pooled [CLS] output; 0 = no head (MLM pretraining)


class BERT(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config, n_segments=config.n_segments)
        self.blocks = nn.ModuleList([Block(config, causal=False) for _ in range(config.n_layer)])
        self.ln_f = final_norm(config)
        # MLM head (Devlin et al. 2019): dense + GELU + LayerNorm, then the tied un-embedding with its own bias
        self.mlm_dense = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.mlm_ln = norm_layer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.embeddings.wte.weight  # weight tying
        # classification head: pooled = tanh(W·h_[CLS] + b), then a linear layer to the classes
        self.pooler = nn.Linear(config.n_embd, config.n_embd) if config.n_classes else None
        self.classifier = nn.Linear(config.n_embd, config.n_classes) if config.n_classes else None
        init_weights(self, config.init, config.n_layer)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def parameter_report(self):
        c = self.config
        tied = " (token tied with lm_head)" if c.tie_embeddings else ""
        groups = {
            f"embeddings{tied}": sum(p.numel() for p in self.embeddings.parameters()),
            f"{c.n_layer} x attention": sum(p.numel() for b in self.blocks for p in b.attn.parameters()),
            f"{c.n_layer} x MLP": sum(p.numel() for b in self.blocks for p in b.mlp.parameters()),
            "block norms": sum(p.numel() for b in self.blocks for m in (b.ln_1, b.ln_2) for p in m.parameters())
            + sum(p.numel() for p in self.ln_f.parameters()),
            "MLM head" + (" (its matrix is tied)" if tied else ""): sum(p.numel() for n, p in self.named_parameters()
                                                                       if n.startswith(("mlm_", "lm_head."))),
        }
        if self.classifier is not None:
            groups["pooler + classifier"] = sum(p.numel() for m in (self.pooler, self.classifier)
                                                for p in m.parameters())
        return parameter_table(groups, self.num_parameters())

    def encode(self, idx, attention_mask=None, segment_ids=None):
        """idx (B, T) -> hidden states (B, T, C). attention_mask (B, T): 1 real token, 0 padding."""
        position_ids = position_ids_for(attention_mask, 0, idx.size(1), idx.device, self.config.block_size)
        x = self.embeddings(idx, position_ids, segment_ids)  # (B, T, C)
        rotary = rotary_angles(self.config, position_ids)  # None for learned positions
        key_padding_mask = attention_mask.bool() if attention_mask is not None else None
        for block in self.blocks:
            x = block(x, key_padding_mask, rotary=rotary)  # bidirectional: every real token sees every real token
        return self.ln_f(x)

    def hidden_states(self, idx, attention_mask=None):
        """The name reward models and critics call on any trunk: (B, T) -> (B, T, C), as encode."""
        return self.encode(idx, attention_mask)

    def forward(self, idx, targets=None, attention_mask=None, segment_ids=None):
        """Masked-LM logits (B, T, V), and the loss over targets != -100 (the selected positions)."""
        hidden = self.encode(idx, attention_mask, segment_ids)
        logits = self.lm_head(self.mlm_ln(F.gelu(self.mlm_dense(hidden))))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, cross_entropy_loss(logits, targets)

    def objective_batch(self, x, y=None, generator=None):
        """A block x (B, T) of the token stream as training inputs: masked tokens (15%, 80/10/10, Devlin et al.
        2019); the targets are the original tokens at the selected positions."""
        inputs, targets = mask_tokens(x, self.config.vocab_size, generator)
        return dict(idx=inputs, targets=targets)

    def sample_text(self, tokenizer, prompt, max_new_tokens=None, **sampling):
        """The prompt with a <|mask|> appended and filled in, as text (BERT predicts, it does not continue)."""
        ids = torch.tensor([tokenizer.encode(prompt, bos=True) + [tokenizer.mask_id]],
                           device=self.lm_head.weight.device)  # (1, T + 1)
        return tokenizer.decode(fill_mask(self, ids)[0].tolist())

    def pooled_output(self, hidden, attention_mask=None):
        """tanh(W·h + b) at the [CLS] position: the first real token of each row. hidden (B, T, C) -> (B, C)."""
        if self.pooler is None:
            raise ValueError("this BERT has no classification head: build it with BertConfig(n_classes=...)")
        first = attention_mask.long().argmax(dim=1) if attention_mask is not None else torch.zeros(
            hidden.size(0), dtype=torch.long, device=hidden.device)  # (B,) left padding allowed
        cls = hidden[torch.arange(hidden.size(0), device=hidden.device), first]  # (B, C)
        return torch.tanh(self.pooler(cls))

    def classify(self, idx, labels=None, attention_mask=None, segment_ids=None):
        """Class logits (B, n_classes) from the pooled [CLS] output, and the cross-entropy if labels (B,) given."""
        hidden = self.encode(idx, attention_mask, segment_ids)
        pooled = F.dropout(self.pooled_output(hidden, attention_mask), self.config.dropout, self.training)  # (B, C)
        logits = self.classifier(pooled)  # (B, n_classes)
        if labels is None:
            return logits, None
        return logits, F.cross_entropy(logits.float(), labels)

    def load_pretrained_encoder(self, state_dict):
        """Load an MLM-pretrained BERT's weights into this model; only the (new) pooler/classifier may be missing."""
        result = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(("pooler.", "classifier."))]
        if missing or result.unexpected_keys:
            raise ValueError(f"BERT weights do not match: missing {missing}, unexpected {result.unexpected_keys}")


def mask_tokens(idx, vocab_size, generator=None, mlm_probability=MLM_PROBABILITY, mask_id=MASK_ID):
    """MLM corruption of idx (B, T) -> (inputs, targets), both (B, T) on idx's device.

    Each non-special token is selected with probability mlm_probability; a selected token becomes mask_id (80%),
    a random non-special token (10%) or stays (10%). targets hold the original id at selected positions, -100
    elsewhere (ignored by the loss). Special tokens (ids < NUM_RESERVED: pad, <s>, </s>, ...) are never selected.
    """
    shape = idx.shape
    selection_draw = torch.rand(shape, generator=generator).to(idx.device)
    action_draw = torch.rand(shape, generator=generator).to(idx.device)  # one draw picks mask / random / keep
    random_tokens = torch.randint(NUM_RESERVED, vocab_size, shape, generator=generator).to(idx.device)
    selected = (selection_draw < mlm_probability) & (idx >= NUM_RESERVED)
    to_mask = selected & (action_draw < MASK_FRACTION)
    to_random = selected & (action_draw >= MASK_FRACTION) & (action_draw < MASK_FRACTION + RANDOM_FRACTION)
    inputs = torch.where(to_mask, torch.full_like(idx, mask_id), idx)
    inputs = torch.where(to_random, random_tokens, inputs)
    targets = torch.where(selected, idx, torch.full_like(idx, -100))
    return inputs, targets


def mlm_accuracy(logits, targets):
    """Share of selected positions (targets != -100) whose argmax prediction is the original token."""
    selected = targets != -100
    if not selected.any():
        return float("nan")
    return (logits.argmax(dim=-1)[selected] == targets[selected]).float().mean().item()


@torch.no_grad()
def fill_mask(model, idx, mask_id=MASK_ID, attention_mask=None):
    """Replace every mask_id in idx (B, T) by the model's most likely token."""
    logits, _ = model(idx, attention_mask=attention_mask)
    return torch.where(idx == mask_id, logits.argmax(dim=-1), idx)
