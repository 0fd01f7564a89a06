import random

import pytest

from nanollm.clean import normalize_text
from nanollm.tokenizer import Tokenizer, train_tokenizer


def small_corpus(n_documents=400, seed=0):
    """English, Chinese, digits and indented code: enough for a few hundred pieces, trains in well under a second."""
    rng = random.Random(seed)
    animals, places = ["cat", "dog", "horse", "rabbit", "fox"], ["garden", "river", "forest", "market"]
    chinese = ["小猫在花园里玩。", "今天天气很好，我们去河边散步。", "森林里有一只狐狸。", "市场上有很多水果。"]
    documents = []
    for index in range(n_documents):
        kind = index % 3
        if kind == 0:
            documents.append(f"The {rng.choice(animals)} walked to the {rng.choice(places)} at {rng.randint(0, 2400)}.")
        elif kind == 1:
            documents.append(rng.choice(chinese) + rng.choice(chinese))
        else:
            documents.append(f"def f{index}(x):\n    return x * {rng.randint(2, 99)}")
    return documents


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tokenizer") / "bpe"
    return Tokenizer(train_tokenizer(small_corpus(), str(prefix), vocab_size=400, model_type="bpe"))


ROUND_TRIP_TEXTS = [
    "The cat walked to the garden.",
    "今天天气很好，我们去河边散步。",
    "1234567890 and 3.14159",
    "  leading, inner    runs and trailing   ",
    "tabs\tand\nnew\n\nlines",
    "emoji 😀👍🏽 and a rare ideograph 龘",
    "mixed: The 狐狸 jumped 3 times! ﬁne Ｆｕｌｌ-width",
    "    return x * 42\n",
    "<|user|>hello<|assistant|>你好",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_restores_normalized_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == normalize_text(text)
    assert tokenizer.unk_id not in ids  # byte fallback: nothing is out of vocabulary


def test_special_ids_are_fixed(tokenizer):
    pieces = [tokenizer.id_to_piece(index) for index in range(8)]
    assert pieces == ["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|mask|>"]
    ids = (tokenizer.unk_id, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
           tokenizer.system_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.mask_id)
    assert ids == (0, 1, 2, 3, 4, 5, 6, 7)
    assert tokenizer.pad_id != tokenizer.eos_id
    assert tokenizer.vocab_size == 400


def test_role_markers_in_text_become_single_ids(tokenizer):
    ids = tokenizer.encode("<|system|><|user|>hi<|assistant|>", bos=True, eos=True)
    assert ids[:3] == [2, 4, 5] and ids[-2:] == [6, 3]
    assert tokenizer.decode(ids) == "<|system|><|user|>hi<|assistant|>"  # bos/eos dropped, roles kept
    assert tokenizer.decode(ids, skip_special=True) == "hi"
    assert tokenizer.decode([1, 1] + tokenizer.encode("ok") + [3, 1]) == "ok"  # padding dropped
    assert 3 not in tokenizer.encode("</s>")  # a literal "</s>" in text is just characters


def test_encode_applies_normalize_text_and_batch_matches_single(tokenizer):
    assert tokenizer.encode("Ｆｕｌｌ\r\n") == tokenizer.encode("Full\n")
    texts = ROUND_TRIP_TEXTS[:5]
    assert tokenizer.encode_batch(texts, eos=True) == [tokenizer.encode(text, eos=True) for text in texts]


def test_trained_pieces_compress_chinese(tokenizer):
    text = "今天天气很好，我们去河边散步。"
    assert len(tokenizer.encode(text)) < len(text)  # learned multi-character pieces, not bytes
    digits = tokenizer.encode("0123456789")  # split_digits: one piece per digit
    assert [tokenizer.id_to_piece(index) for index in digits] == list("0123456789")


def test_training_is_deterministic(tmp_path):
    first = train_tokenizer(small_corpus(), str(tmp_path / "a"), vocab_size=400)
    second = train_tokenizer(small_corpus(), str(tmp_path / "b"), vocab_size=400)
    # the .model files differ only in the stored model_prefix; compare the vocabularies and their scores
    pieces = [[(tok.id_to_piece(i), tok.processor.get_score(i)) for i in range(tok.vocab_size)]
              for tok in (Tokenizer(first), Tokenizer(second))]
    assert pieces[0] == pieces[1]


def test_unigram_round_trip_and_file_input(tmp_path):
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(small_corpus()), encoding="utf-8")
    path = train_tokenizer(str(corpus_file), str(tmp_path / "uni"), vocab_size=350, model_type="unigram")
    tokenizer = Tokenizer(path)
    assert tokenizer.id_to_piece(7) == "<|mask|>"
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == normalize_text(text)


def test_small_corpus_gives_smaller_vocabulary_with_notice(tmp_path, capsys):
    path = train_tokenizer(["ab ab ab", "ba ba"], str(tmp_path / "tiny"), vocab_size=1000)
    assert 265 <= Tokenizer(path).vocab_size < 1000
    assert "corpus too small" in capsys.readouterr().out


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(["x"], str(tmp_path / "m"), vocab_size=400, model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["x"], str(tmp_path / "m"), vocab_size=100)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer(str(tmp_path / "missing.txt"), str(tmp_path / "m"), vocab_size=400)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(str(tmp_path / "nope.model"))


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_token_byte_lengths_sum_to_the_decoded_text_bytes(tokenizer, text):
    """Bits per byte divides by these counts: per-token bytes must add up to the bytes of the decoded text exactly
    (English, Chinese, emoji through byte fallback, leading spaces, whitespace runs; special tokens count 0)."""
    from nanollm.metrics import token_byte_lengths

    lengths = token_byte_lengths(tokenizer)
    assert lengths.shape == (tokenizer.vocab_size,)
    ids = tokenizer.encode(text, bos=True, eos=True)
    expected = len(tokenizer.decode(ids, skip_special=True).encode("utf-8"))
    assert int(lengths[ids].sum()) == expected
    assert expected == len(normalize_text(text).replace("<|user|>", "").replace("<|assistant|>", "").encode("utf-8"))
