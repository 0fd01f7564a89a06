"""Evaluate one or more GPTs in one table: perplexity on a text set and the SFT metrics on a question set.

    python evaluate.py                                          # out-sft/ on data/world (val) + the held-out SFT set
    python evaluate.py --out_dir=out,out-sft                    # base vs fine-tuned, side by side
    python evaluate.py --out_dir=out,out-int8,out-pruned,release --questions="" # compressed models, perplexity only
    python evaluate.py --out_dir=out --text=my_texts.txt --questions=my_eval.jsonl
A model is a checkpoint folder (ckpt.pt), a release folder (python -m nanollm.export), an int8 file or folder
(python -m nanollm.quantize) or a pruned checkpoint (python -m nanollm.prune). The text set is a prepared folder (its
`split`), a .bin token file, or .txt / .jsonl ({"text"}) files; the question set is 'heldout' (built in) or SFT files.
"""
import os
import sys
import time

import torch

from nanollm.configurator import MissingFileError, UserError, configure, reject_renamed
from nanollm.distributed import pick_device
from nanollm.evaluation import (byte_lengths_next_to, count_parameters, format_table, load_questions,
                                perplexity_on_tokens, read_token_stream, sft_metrics)
from nanollm.loader import load_model

# ------------------------------------------------------------------------------------------ settings
out_dir = "out-sft"  # the model(s) to evaluate, comma-separated: one table column each
text = os.path.join("data", "world")  # perplexity set ('' = none): prepared folder, .bin, .txt/.jsonl files/folders
split = "val"  # which split of a prepared folder
max_tokens = 0  # score at most this many tokens of the text set (0 = all)
block_size = 0  # perplexity window (0 = the model's block_size)
questions = "heldout"  # SFT question set ('' = none): 'heldout' (built-in) or .json/.jsonl files/folders
eval_examples = 240  # questions answered by greedy generation and scored (the loss uses all of them)
max_new_tokens = 32  # longest generated reply
batch_size = 32
world_seed = 0  # the world of the built-in held-out set (the pretraining world)
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'mps'
seed = 1337
# ----------------------------------------------------------------------------------------------------
reject_renamed(sys.argv[1:], {"model": "out_dir"})
config = configure(globals(), sys.argv[1:])

device = pick_device(device)
torch.manual_seed(seed)
paths = [path.strip() for path in out_dir.split(",") if path.strip()]
if not paths:
    raise UserError("out_dir is empty: name at least one checkpoint, release folder or int8 file")
for path in paths:  # every model must exist before the first one is evaluated
    if not os.path.exists(path):
        raise MissingFileError(f"model not found: {path} (train_pretrain.py writes out/, train_sft.py out-sft/)")
conversations = load_questions(questions, world_seed) if questions else []  # bad files fail before any model loads

columns, rows = {}, ["kind", "parameters"]
for path in paths:
    t0 = time.time()
    net, tokenizer, kind, _ = load_model(path, device)
    values = {"kind": kind, "parameters": count_parameters(net)}
    if text:
        tokens = read_token_stream(text, tokenizer, split, net.config.vocab_size)
        byte_lengths = byte_lengths_next_to(path, tokenizer)  # None: no tokenizer beside the model, no bits per byte
        scores = perplexity_on_tokens(net, tokens, block_size or None, batch_size, max_tokens, byte_lengths)
        values.update({"text tokens": scores["tokens"], "text loss": scores["loss"], "text ppl": scores["ppl"],
                       "text bytes": scores.get("bytes"), "text bpb": scores.get("bpb")})
    if conversations:
        scores = sft_metrics(net, tokenizer, conversations, eval_examples, max_new_tokens, batch_size)
        names = {"val_loss": "answer loss", "val_ppl": "answer ppl"}  # assistant tokens of the question set
        values.update({names.get(key, key): value for key, value in scores.items()})
    values["seconds"] = f"{time.time() - t0:.1f}"
    columns[path] = values
    rows += [row for row in values if row not in rows]
    print(f"[nanollm] evaluated {path} ({kind}) in {values['seconds']} s")

where = f"{text} ({split})" if text and os.path.isdir(text) else text
asked = f"{questions} ({len(conversations)} conversations, {min(eval_examples, len(conversations))} answered, greedy)"
print(f"\ntext set: {where or 'none'}; questions: {asked if questions else 'none'}")
print(format_table(columns, rows))
