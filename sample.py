"""Generate text from a trained checkpoint.

    python sample.py                                   # out/ckpt.pt, prompt "Talo"
    python sample.py --out_dir=out --prompt="Vessport is" --num_samples=3 --temperature=0.7 --top_p=0.9
"""
import os
import sys

import torch

from nanollm.configurator import configure
from nanollm.distributed import pick_device
from nanollm.model import GPT
from nanollm.tokenizer import Tokenizer

out_dir = "out"  # folder holding ckpt.pt and tokenizer.model
prompt = "Talo"
num_samples = 2
max_new_tokens = 80  # capped so prompt + answer fit in the model's block_size
temperature = 0.8  # 0 = greedy
top_k = 0  # 0 = off
top_p = 1.0  # 1.0 = off
seed = 1337
device = "auto"
configure(globals(), sys.argv[1:])

device = pick_device(device)
model = GPT.from_pretrained(out_dir).to(device).eval()  # our ckpt.pt (pretraining or SFT) or a GPT-2 folder
tokenizer = Tokenizer(os.path.join(out_dir, "tokenizer.model"))

torch.manual_seed(seed)
ids = torch.tensor([tokenizer.encode(prompt, bos=True)], device=device).repeat(num_samples, 1)
new_tokens = min(max_new_tokens, model.config.block_size - ids.size(1))
out = model.generate(ids, new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                     eos_id=tokenizer.eos_id)
for row in out.tolist():
    print(tokenizer.decode(row))
    print("-" * 60)
