"""sample.py and chat.py check their decoding settings (nanollm/sampling.py) before loading anything, and
sample.py decodes with whatever tokenizer the run saved: tokenizer.model or nanoGPT's character meta.pkl."""
import pickle

import pytest
import torch
from script_runner import run_script

from nanollm.configurator import UserError
from nanollm.model import GPT, GPTConfig
from nanollm.sampling import check_sampling
from nanollm.tokenizer import Tokenizer, train_tokenizer

VALID = dict(temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=10, num_samples=1)


@pytest.mark.parametrize("setting, value", [("temperature", -1.0), ("temperature", float("inf")),
                                            ("temperature", float("nan")), ("top_k", -1), ("top_p", 0.0),
                                            ("top_p", 2.0), ("top_p", float("nan")), ("max_new_tokens", 0),
                                            ("max_new_tokens", -5), ("num_samples", 0)])
def test_out_of_range_setting_is_named(setting, value):
    with pytest.raises(UserError, match=rf"^{setting}=.*: must be"):
        check_sampling(**{**VALID, setting: value})


def test_edge_values_are_valid():
    # greedy, top-k and top-p off, a single token, the smallest nucleus above 0
    assert check_sampling(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=1, num_samples=1) is None
    assert check_sampling(temperature=5.0, top_k=1, top_p=1e-6, max_new_tokens=1000, num_samples=8) is None


@pytest.mark.parametrize("argument, setting", [("--temperature=-1", "temperature"), ("--top_p=2.0", "top_p"),
                                               ("--top_p=0", "top_p"), ("--max_new_tokens=-5", "max_new_tokens"),
                                               ("--num_samples=0", "num_samples"), ("--top_k=-3", "top_k")])
def test_sample_py_refuses_bad_setting_in_one_line_before_loading(tmp_path, argument, setting):
    # out_dir does not exist: the setting must be refused before the script looks for a model
    result = run_script("sample.py", [f"--out_dir={tmp_path / 'no_model_here'}", argument], check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{setting}=" in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_chat_py_refuses_bad_setting_in_one_line_before_loading(tmp_path):
    result = run_script("chat.py", [f"--out_dir={tmp_path / 'no_model_here'}", "--top_p=0"], check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: top_p=0.0: must be in (0, 1] (1 = off)"]


def save_tiny_gpt(folder, vocab_size):
    torch.manual_seed(0)
    args = dict(vocab_size=vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    model = GPT(GPTConfig(**args))
    torch.save({"model": model.state_dict(), "model_args": args, "config": {}}, folder / "ckpt.pt")
    return model.eval()


def printed_samples(stdout):
    return [block.strip("\n") for block in stdout.split("-" * 60)[:-1]]


def test_greedy_sample_py_prints_what_generate_returns(tmp_path):
    texts = [f"Person {i} lives in town {i % 7} and likes tea." for i in range(200)]
    tokenizer = Tokenizer(train_tokenizer(texts, str(tmp_path / "tokenizer"), vocab_size=300))
    model = save_tiny_gpt(tmp_path, tokenizer.vocab_size)
    prompt = tokenizer.encode("Person 3", bos=True)
    expected = model.generate(torch.tensor([prompt]), 6, temperature=0, eos_id=tokenizer.eos_id)[0].tolist()
    result = run_script("sample.py", [f"--out_dir={tmp_path}", "--prompt=Person 3", "--temperature=0",
                                      "--max_new_tokens=6", "--num_samples=2", "--top_p=1.0", "--device=cpu"])
    assert printed_samples(result.stdout) == [tokenizer.decode(expected)] * 2  # greedy: both samples the same


def test_sample_py_decodes_with_nanogpt_meta_pkl(tmp_path):
    characters = "abcdefghij klmnop"
    stoi = {character: index for index, character in enumerate(characters)}
    meta = {"vocab_size": len(characters), "stoi": stoi, "itos": {i: c for c, i in stoi.items()}}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    model = save_tiny_gpt(tmp_path, len(characters))
    expected = model.generate(torch.tensor([[stoi[c] for c in "bad cab"]]), 9, temperature=0)[0].tolist()
    result = run_script("sample.py", [f"--out_dir={tmp_path}", "--prompt=bad cab", "--temperature=0",
                                      "--max_new_tokens=9", "--num_samples=1", "--device=cpu"])
    assert printed_samples(result.stdout) == ["".join(characters[i] for i in expected)]


def test_sample_py_without_tokenizer_says_it_needs_one(tmp_path):
    save_tiny_gpt(tmp_path, 64)  # as after training on nanoGPT's bare GPT-2 token files: no tokenizer saved
    result = run_script("sample.py", [f"--out_dir={tmp_path}", "--device=cpu"], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "sampling needs the tokenizer" in result.stderr and result.stderr.count("\n") == 1
