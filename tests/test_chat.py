"""chat.py run as a user runs it: multi-turn over stdin, streamed replies, /reset, context trimming."""
import os
import subprocess
import sys

import pytest
import torch

from nanollm.model import GPT, GPTConfig
from nanollm.tokenizer import Tokenizer, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    texts = [f"Question {i}: where does person {i} live? Person {i} lives in town {i % 7}." for i in range(300)]
    texts += ["李小明住在北京。", "你好，今天天气很好。"] * 20
    tokenizer = Tokenizer(train_tokenizer(texts, str(folder / "tokenizer"), vocab_size=400))
    torch.manual_seed(0)
    args = dict(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16)
    model = GPT(GPTConfig(**args))
    torch.save({"model": model.state_dict(), "model_args": args, "config": {}}, folder / "ckpt.pt")
    return folder


def chat(folder, stdin, *args):
    result = subprocess.run([sys.executable, os.path.join(REPO, "chat.py"), f"--out_dir={folder}", "--device=cpu",
                             *args], input=stdin, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_multi_turn_chat_with_reset_and_quit(checkpoint_dir):
    out = chat(checkpoint_dir, "where does person 3 live?\n李小明住在哪里？\n/reset\nhello\n/quit\nnever read\n",
               "--max_new_tokens=8", "--temperature=0")
    assert out.count("assistant> ") == 3  # three messages answered; the line after /quit is never read
    assert "conversation reset" in out


def test_long_conversation_is_trimmed_to_the_block_size(checkpoint_dir):
    turns = "".join(f"tell me about person {i} and town {i}\n" for i in range(12))  # far beyond 48 tokens in all
    out = chat(checkpoint_dir, turns, "--max_new_tokens=10", "--temperature=0.8", "--top_p=0.9")
    assert out.count("assistant> ") == 12


def test_greedy_stream_prints_what_generate_returns(checkpoint_dir):
    from nanollm.sft import prompt_ids

    tokenizer = Tokenizer(str(checkpoint_dir / "tokenizer.model"))
    model = GPT.from_pretrained(str(checkpoint_dir))
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "where does person 3 live?"}])
    out = model.generate(torch.tensor([ids]), 8, temperature=0, eos_id=tokenizer.eos_id)[0, len(ids):].tolist()
    expected = tokenizer.decode(out[:out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out,
                                skip_special=True)
    printed = chat(checkpoint_dir, "where does person 3 live?\n", "--max_new_tokens=8", "--temperature=0")
    assert printed.split("assistant> ", 1)[1].split("\nyou> ", 1)[0].strip() == expected.strip()
