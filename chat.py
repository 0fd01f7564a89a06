"""Talk to a fine-tuned model in the terminal: multi-turn, tokens printed as they are generated.

    python chat.py                                  # out-sft/ (after python train_sft.py)
    python chat.py --out_dir=out-sft --system="Answer briefly." --temperature=0.7 --top_p=0.9
Type a message and press Enter; /reset forgets the conversation, /quit (or Ctrl-D) leaves.
The prompt is the SFT chat template (nanollm/tokenizer.py: prompt_ids), so the model sees what it was trained on.
"""
import sys

import torch

from nanollm.configurator import UserError, configure
from nanollm.distributed import pick_device
from nanollm.loader import load_model
from nanollm.sampling import check_sampling
from nanollm.tokenizer import Tokenizer, prompt_ids

out_dir = "out-sft"  # folder holding ckpt.pt and tokenizer.model (or a release folder, an int8 model)
system = ""  # an optional system message at the start of every conversation
max_new_tokens = 100
temperature = 0.7  # 0 = greedy
top_k = 0  # 0 = off
top_p = 0.9  # 1.0 = off
seed = 1337
device = "auto"
configure(globals(), sys.argv[1:])  # from here on a UserError prints one line and exits with code 2
check_sampling(temperature, top_k, top_p, max_new_tokens)

device = pick_device(device)
model, tokenizer, _, _ = load_model(out_dir, device)
if not isinstance(tokenizer, Tokenizer):
    raise UserError(f"out_dir={out_dir!r}: no tokenizer.model beside the model (the chat template needs it)")
torch.manual_seed(seed)


def fit_context(messages):
    """Prompt ids of the conversation; the oldest turns (after the system message) are dropped until the
    prompt leaves room for an answer in the model's block_size."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while True:
        ids = prompt_ids(tokenizer, messages)
        if len(ids) + 1 <= model.config.block_size - min(max_new_tokens, model.config.block_size // 2):
            return ids, messages
        if len(messages) - first <= 1:  # a single user message that is too long: keep its end
            return ids[-(model.config.block_size // 2):], messages
        messages = messages[:first] + messages[first + 2:]  # drop the oldest user/assistant pair


def stream_reply(ids):
    """Generate a reply to prompt ids, printing text as it arrives; return the whole reply text."""
    prompt = torch.tensor([ids], device=device)
    budget = min(max_new_tokens, model.config.block_size - len(ids))
    reply_ids, printed = [], ""
    for token in model.generate_stream(prompt, budget, temperature=temperature, top_k=top_k or None,
                                       top_p=top_p, eos_id=tokenizer.eos_id):
        if int(token) == tokenizer.eos_id:
            break
        reply_ids.append(int(token))
        text = tokenizer.decode(reply_ids, skip_special=True)
        if not text.endswith("\ufffd"):  # wait while a multi-byte character is still half decoded
            print(text[len(printed):], end="", flush=True)
            printed = text
    print(tokenizer.decode(reply_ids, skip_special=True)[len(printed):], flush=True)
    return tokenizer.decode(reply_ids, skip_special=True).strip()


messages = [{"role": "system", "content": system}] if system else []
print(f"[nanollm] chatting with {out_dir} ({model.num_parameters() / 1e6:.2f} M parameters); /reset, /quit")
while True:
    try:
        user = input("you> ").strip()
    except EOFError:
        print()
        break
    if user == "/quit":
        break
    if user == "/reset":
        messages = messages[:1] if system else []
        print("[nanollm] conversation reset")
        continue
    if not user:
        continue
    messages.append({"role": "user", "content": user})
    ids, messages = fit_context(messages)
    print("assistant> ", end="", flush=True)
    messages.append({"role": "assistant", "content": stream_reply(ids)})
