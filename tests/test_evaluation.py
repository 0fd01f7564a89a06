"""Evaluation: perplexity against a token-by-token hand computation, token streams, and evaluate.py end to end."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanollm.evaluation import format_table, load_questions, perplexity_on_tokens, read_token_stream
from nanollm.loader import load_model
from nanollm.metrics import token_byte_lengths
from nanollm.model import GPT, GPTConfig
from nanollm.quantize import quantize_model, save_quantized
from nanollm.tokenizer import Tokenizer, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [f"Person {i} lives in town {i % 7} and likes the number {i * 3}." for i in range(200)]


def tiny_gpt(vocab_size=50, block_size=8, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16)).eval()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A folder as train_pretrain.py leaves it (ckpt.pt + tokenizer.model), with an untrained tiny GPT."""
    folder = tmp_path_factory.mktemp("ckpt")
    tokenizer = Tokenizer(train_tokenizer(TEXTS, str(folder / "tokenizer"), vocab_size=300))
    args = dict(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    torch.save({"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args, "config": {}}, folder / "ckpt.pt")
    return folder


def test_perplexity_equals_exp_mean_nll_computed_token_by_token():
    model = tiny_gpt()
    tokens = torch.randint(0, 50, (29,), generator=torch.Generator().manual_seed(0))  # 28 predictions: 3 windows + 4
    # by hand: token i (i >= 1) is predicted from the tokens since the start of its window of 8, one forward each
    nll = []
    with torch.no_grad():
        for i in range(1, len(tokens)):
            start = (i - 1) // 8 * 8
            logits = model(tokens[start:i][None])[0][0, -1]  # (V,) the prediction for position i
            nll.append(-F.log_softmax(logits.double(), dim=-1)[tokens[i]].item())
    result = perplexity_on_tokens(model, tokens, batch_size=2)
    assert result["tokens"] == 28
    assert result["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    assert perplexity_on_tokens(model, tokens, block_size=4)["tokens"] == 28  # other windows: same count
    assert perplexity_on_tokens(model, tokens, max_tokens=10)["tokens"] == 10


def test_a_model_with_all_logits_equal_has_perplexity_vocab_size():
    model = tiny_gpt()
    with torch.no_grad():
        model.wte.weight.zero_()  # tied with lm_head: every logit is 0, p = 1/V for every token
    tokens = torch.randint(0, 50, (40,))
    assert perplexity_on_tokens(model, tokens)["ppl"] == pytest.approx(50.0, rel=1e-6)


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_times_tokens_over_bytes():
    model = tiny_gpt()
    with torch.no_grad():
        model.wte.weight.zero_()  # every token costs ln 50 nats = log2(50) bits
    byte_lengths = torch.tensor([0] * 4 + [1, 2, 3, 4] * 11 + [1, 1])  # (50,) ids 0-3 are "special": 0 bytes
    tokens = torch.tensor([2, 4, 5, 6, 7, 0, 3, 8])  # predicted: 4 5 6 7 0 3 8 -> 1+2+3+4+0+0+1 = 11 bytes, 5 text tokens
    result = perplexity_on_tokens(model, tokens, byte_lengths=byte_lengths)
    assert result["bytes"] == 11
    assert result["bpb"] == pytest.approx(5 * math.log2(50) / 11, rel=1e-6)  # special tokens in neither sum
    assert "bpb" not in perplexity_on_tokens(model, tokens)  # no byte lengths, no bits per byte


def test_token_streams_from_text_jsonl_bin_and_a_prepared_folder(tmp_path, checkpoint_dir):
    tokenizer = Tokenizer(str(checkpoint_dir / "tokenizer.model"))
    (tmp_path / "a.txt").write_text("Person 1 lives in town 1.\n\nPerson 2 likes 6.\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Town 3."}) + "\n", encoding="utf-8")
    expected = [t for text in ("Person 1 lives in town 1.", "Person 2 likes 6.", "Town 3.")
                for t in tokenizer.encode(text, bos=True, eos=True)]  # <s> ids </s> per document, as data.py writes
    stream = read_token_stream(f"{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}", tokenizer)
    assert stream.tolist() == expected
    np.array(expected, dtype=np.uint16).tofile(tmp_path / "tokens.bin")
    assert read_token_stream(str(tmp_path / "tokens.bin"), vocab_size=300).tolist() == expected
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    np.array(expected, dtype=np.uint16).tofile(prepared / "val.bin")
    np.array(expected[:5], dtype=np.uint16).tofile(prepared / "train.bin")
    (prepared / "tokenizer.model").write_bytes((checkpoint_dir / "tokenizer.model").read_bytes())
    meta = {"vocab_size": 300, "dtype": "uint16", "tokenizer": "tokenizer.model", "train_tokens": 5,
            "val_tokens": len(expected)}
    (prepared / "meta.json").write_text(json.dumps(meta))
    assert read_token_stream(str(prepared), tokenizer, "val").tolist() == expected
    assert read_token_stream(str(prepared), tokenizer, "train").tolist() == expected[:5]
    other = Tokenizer(train_tokenizer(["something else entirely"] * 50 + TEXTS[:20], str(tmp_path / "other"), 300))
    with pytest.raises(ValueError, match="differs from the model's"):
        read_token_stream(str(prepared), other)


def test_load_model_reads_checkpoints_and_int8_files(tmp_path, checkpoint_dir):
    model, tokenizer, kind, _ = load_model(str(checkpoint_dir))
    assert kind == "pretrain" and tokenizer.vocab_size == model.config.vocab_size
    quantize_model(model)
    save_quantized(model, tmp_path / "small.pt")
    loaded, tokenizer, kind, _ = load_model(str(tmp_path / "small.pt"))
    assert kind == "int8" and tokenizer is None  # no tokenizer.model beside that file
    idx = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_builtin_heldout_questions_and_the_table():
    conversations = load_questions("heldout")
    assert len(conversations) == 240 and conversations[0].messages[-1]["role"] == "assistant"
    table = format_table({"a": {"ppl": 2.5, "tokens": 1200}, "b": {"ppl": 3.0}}, ["ppl", "tokens"])
    assert table.splitlines() == ["| metric | a | b |", "|---|---|---|", "| ppl | 2.5000 | 3.0000 |",
                                  "| tokens | 1,200 | - |"]


def test_evaluate_script_prints_one_table_for_two_models(tmp_path, checkpoint_dir):
    model, tokenizer, _, _ = load_model(str(checkpoint_dir))
    int8_dir = tmp_path / "int8"
    int8_dir.mkdir()
    quantize_model(model)
    save_quantized(model, int8_dir / "model_int8.pt")
    (int8_dir / "tokenizer.model").write_bytes((checkpoint_dir / "tokenizer.model").read_bytes())
    (tmp_path / "text.txt").write_text("\n".join(TEXTS[:30]) + "\n", encoding="utf-8")
    questions = [{"question": f"Where does person {i} live?", "answer": f"Person {i} lives in town {i % 7}."}
                 for i in range(5)] + [{"text": "I like it", "label": "positive"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    result = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), f"--out_dir={checkpoint_dir},{int8_dir}",
                             f"--text={tmp_path / 'text.txt'}", f"--questions={tmp_path / 'q.jsonl'}",
                             "--max_new_tokens=4", "--device=cpu"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert f"| metric | {checkpoint_dir} | {int8_dir} |" in out
    for row in ("text ppl", "answer ppl", "exact_match", "token_f1", "rouge_l_f1", "bleu", "accuracy"):
        assert re.search(rf"^\| {row} \| [0-9.]+ \| [0-9.]+ \|$", out, re.M), row
    expected = perplexity_on_tokens(load_model(str(checkpoint_dir))[0],
                                    read_token_stream(str(tmp_path / "text.txt"), tokenizer))["ppl"]
    printed = float(re.search(r"^\| text ppl \| ([0-9.]+) \|", out, re.M).group(1))
    assert printed == pytest.approx(expected, abs=1e-4)
    assert re.search(r"^\| kind \| pretrain \| int8 \|$", out, re.M)
    # bits per byte: the same NLL over the bytes of the decoded text (ASCII lines, so no token splits a character)
    tokens = read_token_stream(str(tmp_path / "text.txt"), tokenizer)
    scores = perplexity_on_tokens(load_model(str(checkpoint_dir))[0], tokens, byte_lengths=token_byte_lengths(tokenizer))
    assert scores["bytes"] == len(tokenizer.decode(tokens.tolist(), skip_special=True).encode("utf-8"))
    printed = float(re.search(r"^\| text bpb \| ([0-9.]+) \|", out, re.M).group(1))
    assert printed == pytest.approx(scores["bpb"], abs=1e-4)
