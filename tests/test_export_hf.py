"""Hugging Face export: the folder loads in `transformers` with our logits and greedy generations, our tokenizer's ids
and our chat template; our GPT-2 importer reads it back; options with no standard equivalent are refused."""
import json
import os
import random
import re

import pytest
import torch

from nanollm.bert import BERT, BertConfig
from nanollm.configurator import UserError
from nanollm.export import main as export_main
from nanollm.export_hf import export_hf
from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig, architecture_args
from nanollm.tokenizer import Tokenizer, encode_messages, prompt_ids, train_tokenizer
from conftest import require

TEXTS = [
    "The cat walked to the garden.",
    "今天天气很好，我们去河边散步。",
    "mixed: The 狐狸 jumped 3 times! 1234567890 and 3.14159",
    "  leading, inner    runs and trailing   ",
    "tabs\tand\nnew\n\nlines\r\nwindows line end",
    "emoji 😀👍🏽, a rare ideograph 龘, a bell \x07 and a byte order mark \ufeff",
    "ﬁne Ｆｕｌｌ-width",  # NFKC: ligature split, full-width letters to ASCII
    "    return x * 42\n",
    "<|user|>hello<|assistant|>你好",
    "",
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the 小猫 live?"},
            {"role": "assistant", "content": "In the  garden."}, {"role": "user", "content": "And the fox?"}]


@pytest.fixture(scope="module")
def transformers():
    return require("transformers")  # a test-only extra (pip install -e ".[test]"); importing it takes seconds


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A BPE tokenizer trained on English, Chinese, digits and code, as train_tokenizer writes it."""
    chinese = ["小猫在花园里玩。", "今天天气很好，我们去河边散步。", "森林里有一只狐狸。"]
    texts = [f"The cat {i} walked to the garden at {i * 37}. " + chinese[i % 3] + f"\ndef f{i}(x):\n    return x"
             for i in range(300)]
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tokenizer") / "bpe"), vocab_size=400)


def random_gpt(seed=0, **options):
    """A tiny GPT whose every weight, bias and norm scale is random (the default init zeroes biases, sets scales to
    1: a wrong mapping of those would go unnoticed)."""
    torch.manual_seed(seed)
    args = dict(vocab_size=410, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    model = GPT(GPTConfig(**dict(args, **options))).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def assert_same_as_transformers(transformers, model, folder):
    """Logits within 1e-4 (fp32) and greedy generations identical; returns the loaded model."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    idx = torch.randint(8, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf_model(idx).logits - model(idx)[0]).abs().max().item() <= 1e-4
        prompt = idx[:1, :6]
        ours = model.generate(prompt, 26, temperature=0, eos_id=3)[0].tolist()
        theirs = hf_model.generate(prompt, max_new_tokens=26, do_sample=False)[0].tolist()
    ours = ours[:ours.index(3) + 1] if 3 in ours[6:] else ours  # we repeat eos after it; transformers stops
    assert theirs == ours
    return hf_model


LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu")
LAYOUTS = {  # test id: (our options, the layout, the class transformers builds)
    "gpt2": (dict(bias=True), "gpt2", "GPT2LMHeadModel"),
    "gpt2-zero-bias-untied": (dict(bias=False, tie_embeddings=False), "gpt2", "GPT2LMHeadModel"),
    "llama-multi-query": (dict(LLAMA, bias=False, n_kv_head=1), "llama", "LlamaForCausalLM"),
    "llama-grouped-bias-untied": (dict(LLAMA, bias=True, tie_embeddings=False, n_head=4, n_embd=32, n_kv_head=2),
                                  "llama", "LlamaForCausalLM"),
    "qwen3-qk-norm": (dict(LLAMA, bias=False, qk_norm=True, n_head=4, n_embd=32, n_kv_head=2), "qwen3",
                      "Qwen3ForCausalLM"),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_export_loads_in_transformers_with_our_logits_and_generations(transformers, tokenizer_path, tmp_path, name):
    options, expected_layout, expected_class = LAYOUTS[name]
    model = random_gpt(**options)
    folder, layout = export_hf(model, tokenizer_path, str(tmp_path / "hf"))
    assert layout == expected_layout
    hf_model = assert_same_as_transformers(transformers, model, folder)
    assert type(hf_model).__name__ == expected_class
    assert (hf_model.generation_config.eos_token_id, hf_model.generation_config.pad_token_id) == (3, 1)
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "model.safetensors",
                                          "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                                          "tokenizer_config.json"]  # no temporary file left behind


def test_our_gpt2_importer_reads_the_export_with_identical_logits(tokenizer_path, tmp_path):
    model = random_gpt(seed=2)
    folder, _ = export_hf(model, tokenizer_path, str(tmp_path / "hf"))
    loaded = load_model(folder)
    assert loaded.kind == "gpt2" and loaded.tokenizer.encode("小猫") == Tokenizer(tokenizer_path).encode("小猫")
    idx = torch.randint(0, 410, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.model(idx)[0], model(idx)[0])


@pytest.fixture(scope="module")
def hf_tokenizer(transformers, tokenizer_path, tmp_path_factory):
    folder, _ = export_hf(random_gpt(), tokenizer_path, str(tmp_path_factory.mktemp("hf")))
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("text", TEXTS)
def test_transformers_tokenizer_gives_our_ids_and_text(hf_tokenizer, tokenizer_path, text):
    ours = Tokenizer(tokenizer_path)
    ids = ours.encode(text)
    assert hf_tokenizer(text)["input_ids"] == ids
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special=True)


def test_transformers_tokenizer_gives_our_ids_on_random_text(hf_tokenizer, tokenizer_path):
    """Random strings over the corpus's characters, whitespace runs and role markers: SentencePiece's BPE and the
    merges written for `tokenizers` must segment every one the same way (no special-token text besides roles)."""
    ours, rng = Tokenizer(tokenizer_path), random.Random(0)
    alphabet = list("The cat walked to garden 0123456789 小猫在花园里玩。，def f(x):\n    return") + ["  ", "\t", "<|user|>"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    assert [hf_tokenizer(text)["input_ids"] for text in texts] == [ours.encode(text) for text in texts]


def test_chat_template_formats_conversations_as_ours(hf_tokenizer, tokenizer_path):
    ours = Tokenizer(tokenizer_path)
    as_ids = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert as_ids == prompt_ids(ours, MESSAGES)  # <s> <|system|> ... <|user|> ... <|assistant|>
    finished = MESSAGES[:3]  # ends on the assistant's turn: closed by </s>, no new <|assistant|>
    as_text = hf_tokenizer.apply_chat_template(finished, tokenize=False)
    assert as_text == "<s><|system|>Be brief.<|user|>Where does the 小猫 live?<|assistant|>In the  garden.</s>"
    assert hf_tokenizer(as_text)["input_ids"] == encode_messages(ours, finished)[0]
    with pytest.raises(Exception, match="role must be"):
        hf_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


REFUSED = [  # (our options, the words of the one-line error)
    (dict(norm_position="post"), "norm_position='post'"),
    (dict(LLAMA, mlp="relu2"), "mlp='relu2'"),
    (dict(position="rope"), "a mix of GPT-2"),
    (dict(qk_norm=True), "qk_norm=True: GPT-2's block"),
    (dict(n_kv_head=1), "n_kv_head=1: GPT-2's block"),
    (dict(LLAMA, qk_norm=True, bias=True), "bias=True with qk_norm=True"),
]


@pytest.mark.parametrize("options, words", REFUSED)
def test_options_without_a_standard_layout_are_refused_in_one_line_before_writing(tokenizer_path, tmp_path, options,
                                                                                  words):
    with pytest.raises(UserError, match=re.escape(words)) as error:
        export_hf(random_gpt(**options), tokenizer_path, str(tmp_path / "hf"))
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "hf")


def test_models_other_than_the_gpt_are_refused(tokenizer_path, tmp_path):
    bert = BERT(BertConfig(vocab_size=410, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(UserError, match="a BERT: only the GPT"):
        export_hf(bert, tokenizer_path, str(tmp_path / "hf"))


def test_a_unigram_tokenizer_is_refused(tmp_path):
    texts = [f"The cat {i} walked to the garden. 小猫在花园里玩。" for i in range(200)]
    unigram = train_tokenizer(texts, str(tmp_path / "unigram"), vocab_size=300, model_type="unigram")
    with pytest.raises(UserError, match="unigram"):
        export_hf(random_gpt(), unigram, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")


def test_command_line_writes_the_folder_and_keeps_the_release_format(tokenizer_path, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    model = random_gpt(seed=4)
    torch.save({"model": model.state_dict(), "model_args": architecture_args(model.config),
                "config": {"model_type": "gpt"}}, out_dir / "ckpt.pt")
    os.link(tokenizer_path, out_dir / "tokenizer.model")
    export_main([f"--out_dir={out_dir}", f"--release_dir={tmp_path / 'hf'}", "--format=hf"])  # onnx=auto: none
    assert "model.onnx" not in os.listdir(tmp_path / "hf")  # engines read model.safetensors; --onnx=yes adds it
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["eos_token_id"] == 3 and config["n_layer"] == 2
    export_main([f"--out_dir={out_dir}", f"--release_dir={tmp_path / 'release'}", "--onnx=no"])
    assert load_model(str(tmp_path / "release")).kind == "release"
    with pytest.raises(UserError, match="format='gguf'"):
        export_main([f"--out_dir={out_dir}", f"--release_dir={tmp_path / 'x'}", "--format=gguf"])
