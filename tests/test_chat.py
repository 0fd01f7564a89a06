"""chat.py run as a user runs it: multi-turn over stdin, streamed replies, /reset, context trimming (the prompts the
model receives are recorded and compared with the conversation they must hold)."""
import io
import os
import runpy
import subprocess
import sys

import pytest
import torch

from nanollm.loader import load_model
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


def chat_in_process(folder, stdin, *args, monkeypatch):
    """chat.py run in this process (runpy) with `stdin` as its input; every prompt it hands to generate_stream is
    recorded with the tokens it got back, so a test can check the conversation the model actually saw."""
    calls = []
    original = GPT.generate_stream

    def recording(self, idx, *a, **k):
        call = {"prompt": idx[0].tolist(), "tokens": []}
        calls.append(call)
        for token in original(self, idx, *a, **k):
            call["tokens"].append(int(token))
            yield token

    monkeypatch.setattr(GPT, "generate_stream", recording)
    monkeypatch.setattr(sys, "argv", ["chat.py", f"--out_dir={folder}", "--device=cpu", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    runpy.run_path(os.path.join(REPO, "chat.py"), run_name="__main__")
    return calls


def reply_text(tokenizer, tokens):
    """What chat.py keeps of a reply: the text before eos, special tokens removed, stripped."""
    tokens = tokens[:tokens.index(tokenizer.eos_id)] if tokenizer.eos_id in tokens else tokens
    return tokenizer.decode(tokens, skip_special=True).strip()


@pytest.mark.slow  # a subprocess
def test_multi_turn_chat_with_reset_and_quit(checkpoint_dir):
    out = chat(checkpoint_dir, "where does person 3 live?\n李小明住在哪里？\n/reset\nhello\n/quit\nnever read\n",
               "--max_new_tokens=8", "--temperature=0")
    assert out.count("assistant> ") == 3  # three messages answered; the line after /quit is never read
    assert "conversation reset" in out


def test_the_model_sees_the_whole_history_and_reset_keeps_only_the_system_message(checkpoint_dir, monkeypatch):
    from nanollm.tokenizer import prompt_ids

    tokenizer = Tokenizer(str(checkpoint_dir / "tokenizer.model"))
    system = {"role": "system", "content": "Be brief."}
    calls = chat_in_process(checkpoint_dir, "where does person 3 live?\n李小明住在哪里？\n/reset\nhello\n",
                            "--system=Be brief.", "--max_new_tokens=6", "--temperature=0", monkeypatch=monkeypatch)
    first, second = ({"role": "user", "content": text} for text in ("where does person 3 live?", "李小明住在哪里？"))
    answer = {"role": "assistant", "content": reply_text(tokenizer, calls[0]["tokens"])}
    assert len(calls) == 3
    assert calls[0]["prompt"] == prompt_ids(tokenizer, [system, first])
    assert calls[1]["prompt"] == prompt_ids(tokenizer, [system, first, answer, second])  # the first turn is kept
    assert calls[2]["prompt"] == prompt_ids(tokenizer, [system, {"role": "user", "content": "hello"}])  # after /reset


def test_long_conversation_drops_the_oldest_turns_and_keeps_the_system_message(checkpoint_dir, monkeypatch):
    from nanollm.tokenizer import prompt_ids

    tokenizer = Tokenizer(str(checkpoint_dir / "tokenizer.model"))
    system = {"role": "system", "content": "Hi."}
    users = [f"person {i}" for i in range(12)]  # far beyond 48 tokens in all, one or two turns fit
    max_new_tokens, block_size = 10, 48
    calls = chat_in_process(checkpoint_dir, "".join(u + "\n" for u in users), "--system=Hi.",
                            f"--max_new_tokens={max_new_tokens}", "--temperature=0.8", "--top_p=0.9",
                            monkeypatch=monkeypatch)
    assert len(calls) == len(users)
    history = []  # every (user, assistant) pair so far, oldest first
    kept_pairs = []  # how many earlier pairs each prompt holds
    kept_from = 0  # index of the oldest pair chat.py still keeps; a dropped pair never comes back
    for user, call in zip(users, calls):
        def prompt(start):
            pairs = [message for pair in history[start:] for message in pair]
            return prompt_ids(tokenizer, [system] + pairs + [{"role": "user", "content": user}])
        # a prompt fits when it leaves room for an answer: len + 1 <= block_size - min(max_new_tokens, block_size/2)
        fits = [start for start in range(kept_from, len(history) + 1)
                if len(prompt(start)) + 1 <= block_size - min(max_new_tokens, block_size // 2)]
        kept_from = fits[0]  # only as many of the oldest pairs are dropped as needed
        assert call["prompt"] == prompt(kept_from), len(history)
        kept_pairs.append(len(history) - kept_from)
        history.append(({"role": "user", "content": user},
                        {"role": "assistant", "content": reply_text(tokenizer, call["tokens"])}))
    print("earlier pairs in each prompt:", kept_pairs)
    assert kept_from >= 3 and max(kept_pairs) >= 1  # trimmed several times, and earlier turns were kept when they fit


@pytest.mark.slow  # a subprocess
def test_greedy_stream_prints_what_generate_returns(checkpoint_dir):
    from nanollm.tokenizer import prompt_ids

    tokenizer = Tokenizer(str(checkpoint_dir / "tokenizer.model"))
    model = load_model(str(checkpoint_dir)).model
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "where does person 3 live?"}])
    out = model.generate(torch.tensor([ids]), 8, temperature=0, eos_id=tokenizer.eos_id)[0, len(ids):].tolist()
    expected = tokenizer.decode(out[:out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out,
                                skip_special=True)
    printed = chat(checkpoint_dir, "where does person 3 live?\n", "--max_new_tokens=8", "--temperature=0")
    assert printed.split("assistant> ", 1)[1].split("\nyou> ", 1)[0].strip() == expected.strip()
