"""Evaluate any GPT the course produces: perplexity on a token stream, and the SFT metrics on a question set.

Teaches what perplexity measures, PPL = exp(-(1/N) Σ_t log p(x_t | x_<t)), and how its number depends on how the text
is cut into windows: here the stream is cut into non-overlapping windows of block_size tokens, so every token is
predicted exactly once, from the context since its window began (a sliding window gives a lower number at more cost).
Bits per byte (the NLL over the UTF-8 bytes of the text) does not depend on the tokenizer, so it compares models
with different vocabularies. Models are opened by nanollm.loader, which accepts every model file the course writes.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from nanollm.configurator import MissingFileError, UserError
from nanollm.data import (is_prepared, list_input_files, load_meta, load_tokenizer, parse_dataset, read_documents,
                          token_dtype)
from nanollm.metrics import bits_per_byte, text_nll_and_bytes, token_byte_lengths

HELDOUT = "heldout"  # the questions setting that names the built-in held-out SFT set


# ----------------------------------------------------------------------------- models
def byte_lengths_next_to(path, tokenizer):
    """(V,) UTF-8 bytes per token id, for bits per byte: from the model's tokenizer, else from nanoGPT's meta.pkl
    characters in the model's folder; None when neither is there (bits per byte is then not reported)."""
    if tokenizer is None:
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        tokenizer = load_tokenizer(folder)
    return token_byte_lengths(tokenizer) if tokenizer is not None else None


def count_parameters(model):
    """Weights and biases, counted once, whether float Parameters or int8 buffers of QuantLinear layers."""
    from nanollm.quantize import QuantLinear

    quantized = sum(m.weight_int8.numel() + (m.bias.numel() if m.bias is not None else 0)
                    for m in model.modules() if isinstance(m, QuantLinear))
    return sum(p.numel() for p in model.parameters()) + quantized


# ----------------------------------------------------------------------------- token streams
def _same_tokenizer(data_tokenizer_path, tokenizer, where):
    """Token ids mean nothing under another tokenizer: refuse to score a prepared set made by a different one."""
    if tokenizer is None:
        return
    with open(data_tokenizer_path, "rb") as a, open(tokenizer.model_path, "rb") as b:
        if a.read() != b.read():
            raise UserError(f"{where}: its tokenizer ({data_tokenizer_path}) differs from the model's "
                             f"({tokenizer.model_path}); perplexity over these ids would be meaningless")


def read_token_stream(source, tokenizer=None, split="val", vocab_size=None):
    """A 1-D int64 tensor of token ids from one of:
    a prepared folder (train.bin/val.bin/meta.json: its `split`) | a .bin file (dtype from meta.json beside it,
    else uint16/uint32 by vocab_size) | .txt (one document per line) / .jsonl ({"text"}) files or folders,
    comma-separated, encoded as in data preparation: <s> tokens </s> per document."""
    sources = parse_dataset(source)
    if len(sources) == 1 and os.path.isdir(sources[0]) and is_prepared(sources[0]):
        folder = sources[0]
        meta = load_meta(folder)
        _same_tokenizer(os.path.join(folder, meta["tokenizer"]), tokenizer, folder)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return torch.from_numpy(np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=meta["dtype"]).astype(np.int64))
    if len(sources) == 1 and sources[0].endswith(".bin"):
        path = sources[0]
        if not os.path.isfile(path):
            raise MissingFileError(f"token file not found: {path}")
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isfile(os.path.join(folder, "meta.json")):
            meta = load_meta(folder)
            dtype = meta["dtype"]
            _same_tokenizer(os.path.join(folder, meta["tokenizer"]), tokenizer, path)
        elif vocab_size is not None:
            dtype = token_dtype(vocab_size)
        else:
            raise UserError(f"{path}: no meta.json beside it and no vocab_size to infer the token dtype")
        return torch.from_numpy(np.fromfile(path, dtype=dtype).astype(np.int64))
    if tokenizer is None:
        raise UserError(f"{source}: text needs the model's tokenizer, and none was found next to the model")
    documents = read_documents(list_input_files(sources))
    if not documents:
        raise UserError(f"{source}: no documents")
    ids = [token for document in tokenizer.encode_batch(documents, bos=True, eos=True) for token in document]
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- perplexity
@torch.no_grad()
def perplexity_on_tokens(model, tokens, block_size=None, batch_size=16, max_tokens=0, byte_lengths=None):
    """Mean NLL and perplexity of `tokens` (1-D), cut into non-overlapping windows of block_size inputs:
    window w reads tokens[wT : wT + T] and predicts tokens[wT + 1 : wT + T + 1]; the last window may be shorter.
    Every token but the first is predicted once. Returns {"loss", "ppl", "tokens"} (tokens = predictions made), and
    with byte_lengths ((V,) bytes per token id, nanollm.metrics.token_byte_lengths) also "bpb" and "bytes": the NLL of
    the predicted tokens that are text, over ln 2 times their UTF-8 bytes."""
    block_size = block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise UserError(f"block_size={block_size} exceeds the model's block_size={model.config.block_size}")
    if max_tokens:
        tokens = tokens[:max_tokens + 1]
    if tokens.numel() < 2:
        raise UserError(f"need at least 2 tokens to predict one, got {tokens.numel()}")
    if int(tokens.max()) >= model.config.vocab_size:
        raise UserError(f"token id {int(tokens.max())} >= the model's vocab_size={model.config.vocab_size}")
    was_training = model.training
    model.eval()
    device = model.wte.weight.device
    n_predicted = tokens.numel() - 1
    n_full = n_predicted // block_size
    inputs = tokens[:n_full * block_size].view(n_full, block_size)  # (W, T)
    targets = tokens[1:n_full * block_size + 1].view(n_full, block_size)  # (W, T), shifted by one
    windows = [(inputs[start:start + batch_size], targets[start:start + batch_size])
               for start in range(0, n_full, batch_size)]
    if n_predicted > n_full * block_size:  # the shorter last window
        windows.append((tokens[n_full * block_size:-1][None], tokens[n_full * block_size + 1:][None]))
    if byte_lengths is not None:
        byte_lengths = byte_lengths.to(device)
    total, text_nll, n_bytes = 0.0, 0.0, 0
    for x, y in windows:
        logits, _ = model(x.to(device))  # (B, T, V)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        if byte_lengths is not None:
            batch_nll, batch_bytes = text_nll_and_bytes(logits, y.to(device), byte_lengths)
            text_nll, n_bytes = text_nll + batch_nll, n_bytes + batch_bytes
    model.train(was_training)
    loss = total / n_predicted
    scores = {"loss": loss, "ppl": float(np.exp(loss)), "tokens": n_predicted}  # PPL = exp(mean NLL)
    if byte_lengths is not None and n_bytes > 0:
        scores.update(bpb=bits_per_byte(text_nll, n_bytes), bytes=n_bytes)
    return scores


# ----------------------------------------------------------------------------- question sets
def load_questions(questions=HELDOUT, world_seed=0):
    """Conversations to answer: 'heldout' = the built-in held-out SFT set (nanollm/instructions.py), or
    .json/.jsonl files or folders in any SFT record format (nanollm/sft.py)."""
    from nanollm.sft import load_conversations, normalize_record

    if questions == HELDOUT:
        from nanollm.instructions import demo_records

        heldout = demo_records(world_seed=world_seed)["heldout"]
        return [conversation for name, records in heldout.items() for line, record in enumerate(records, start=1)
                for conversation in normalize_record(record, f"heldout/{name}:{line}")]
    return load_conversations(questions)


def sft_metrics(model, tokenizer, conversations, eval_examples=240, max_new_tokens=32, batch_size=32):
    """Assistant-token loss/perplexity over all `conversations` and the text metrics (exact match, token F1,
    ROUGE-L, BLEU; accuracy for classification) of greedy replies to eval_examples of them, evenly spread."""
    import contextlib

    from nanollm.sft import encode_conversations, evaluate

    if tokenizer is None:
        raise UserError("the SFT metrics need the model's tokenizer (tokenizer.model next to the model)")
    examples, _ = encode_conversations(tokenizer, conversations, model.config.block_size)
    count = min(eval_examples, len(conversations))
    chosen = [conversations[i * len(conversations) // count] for i in range(count)] if count else []
    scores, _ = evaluate(model, tokenizer, chosen, examples, max_new_tokens, batch_size, contextlib.nullcontext())
    return scores


def format_table(columns, rows):
    """columns: {column name: {row name: value}} -> a markdown table; floats with 4 decimals, '-' if missing."""
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(cell(values.get(row)) for values in columns.values()) + " |" for row in rows]
    return "\n".join(lines)
