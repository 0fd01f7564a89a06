"""Generate text from a trained checkpoint.

    python sample.py                                   # out/ckpt.pt, prompt "Talo"
    python sample.py --out_dir=out --prompt="Vessport is" --num_samples=3 --temperature=0.7 --top_p=0.9
"""
import os
import sys

import torch

from nanollm.configurator import UserError, configure
from nanollm.distributed import pick_device
from nanollm.loader import load_model
from nanollm.sampling import check_sampling

out_dir = "out"  # folder holding ckpt.pt and tokenizer.model (or a nanoGPT meta.pkl)
prompt = "Talo"
num_samples = 2
max_new_tokens = 80  # capped so prompt + answer fit in the model's block_size
temperature = 0.8  # 0 = greedy
top_k = 0  # 0 = off
top_p = 1.0  # 1.0 = off
seed = 1337
device = "auto"
configure(globals(), sys.argv[1:])  # from here on a UserError prints one line and exits with code 2
check_sampling(temperature, top_k, top_p, max_new_tokens, num_samples)

if not os.path.isdir(out_dir):
    raise UserError(f"out_dir={out_dir!r}: no such folder")
device = pick_device(device)
model, tokenizer, _, _ = load_model(out_dir, device)  # any checkpoint, release, int8 file or GPT-2 folder
if tokenizer is None:  # tokenizer.model, or nanoGPT's character vocabulary (meta.pkl), beside the model
    raise UserError(f"out_dir={out_dir!r} has no tokenizer.model or meta.pkl: sampling needs the tokenizer the "
                    f"model was trained with (nanoGPT's GPT-2 token files come without one)")

torch.manual_seed(seed)
ids = torch.tensor([tokenizer.encode(prompt, bos=True)], device=device).repeat(num_samples, 1)
if ids.size(1) >= model.config.block_size:
    raise UserError(f"prompt is {ids.size(1)} tokens: it leaves no room in the model's block_size="
                    f"{model.config.block_size}")
new_tokens = min(max_new_tokens, model.config.block_size - ids.size(1))
out = model.generate(ids, new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                     eos_id=tokenizer.eos_id)
for row in out.tolist():
    print(tokenizer.decode(row))
    print("-" * 60)
