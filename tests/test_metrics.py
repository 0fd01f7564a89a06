"""Each metric against numbers worked out by hand (the arithmetic is in the comments)."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanollm.metrics import (
    classification_scores,
    token_scores,
    accuracy,
    bits_per_byte,
    corpus_bleu,
    exact_match,
    generation_metrics,
    mean_token_f1,
    perplexity,
    perplexity_from_sums,
    rouge_l,
    rouge_l_f1,
    token_byte_lengths,
    token_f1,
    tokenize_for_metrics,
)


# ----------------------------------------------------------------------------- tokenization
def test_tokenize_lowercases_and_splits_on_punctuation():
    assert tokenize_for_metrics("Hello, World!  It's 3.5%") == ["hello", "world", "it", "s", "3", "5"]
    # symbols (Unicode category S*) separate words too, as SQuAD strips string.punctuation
    assert tokenize_for_metrics("$5 + 3 = 8") == ["5", "3", "8"]


def test_tokenize_splits_cjk_into_characters():
    assert tokenize_for_metrics("正面") == ["正", "面"]
    assert tokenize_for_metrics("GPT-2模型很好！") == ["gpt", "2", "模", "型", "很", "好"]
    # full-width letters/digits/commas are folded by NFKC; Chinese punctuation is dropped
    assert tokenize_for_metrics("ＡＢＣ，１２３。") == ["abc", "123"]


def test_tokenize_empty_and_punctuation_only():
    assert tokenize_for_metrics("") == []
    assert tokenize_for_metrics(" ...!? 。") == []


# ----------------------------------------------------------------------------- perplexity
def test_perplexity_hand_values():
    # probabilities 1/2, 1/4, 1/8: NLL sum = ln2 + ln4 + ln8 = 6 ln2; mean = 2 ln2; PPL = e^(2 ln2) = 4
    assert perplexity_from_sums(6 * math.log(2), 3) == pytest.approx(4.0)
    assert perplexity(2 * math.log(2)) == pytest.approx(4.0)
    assert perplexity(0.0) == 1.0  # a model certain of every token
    assert perplexity(torch.tensor(math.log(7.0))) == pytest.approx(7.0)  # 0-dim tensor accepted


def test_perplexity_of_uniform_logits_is_vocab_size():
    # cross-entropy of constant logits is ln V per token, so perplexity is V
    vocab_size = 50
    logits = torch.zeros(2, 5, vocab_size)  # (B, T, V)
    targets = torch.randint(0, vocab_size, (2, 5))  # (B, T)
    total_nll = F.cross_entropy(logits.view(-1, vocab_size), targets.view(-1), reduction="sum")
    assert perplexity_from_sums(total_nll, targets.numel()) == pytest.approx(vocab_size, rel=1e-5)


def test_perplexity_rejects_bad_input_and_overflows_to_inf():
    with pytest.raises(ValueError, match="n_tokens"):
        perplexity_from_sums(1.0, 0)
    with pytest.raises(ValueError):
        perplexity(float("nan"))
    with pytest.raises(ValueError):
        perplexity(-0.5)
    assert perplexity(1000.0) == math.inf


# ----------------------------------------------------------------------------- exact match / accuracy
def test_exact_match_normalized_and_raw():
    predictions = ["The Cat!", "dog", "正面。", "x"]
    references = ["cat", "cat", "正面", "x"]
    # normalized: "the cat!" -> [cat] == [cat] ✓, dog ✗, [正, 面] ✓, x ✓ -> 3/4
    assert exact_match(predictions, references) == pytest.approx(3 / 4)
    # raw strings: only "x" == "x" -> 1/4
    assert exact_match(predictions, references, normalize=False) == pytest.approx(1 / 4)


def test_exact_match_any_of_several_references():
    assert exact_match(["Paris"], [["Paris, France", "paris"]]) == 1.0
    assert exact_match(["Lyon"], [["Paris, France", "paris"]]) == 0.0


def test_accuracy_hand_value():
    # matches at positions 0 and 2 -> 2/4
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(["正面", "负面", "正面"], ["正面", "正面", "正面"]) == pytest.approx(2 / 3)


def test_metrics_reject_mismatched_or_empty_lists():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        corpus_bleu([], [])
    with pytest.raises(ValueError, match="list of strings"):
        rouge_l_f1("a bare string", "another")
    with pytest.raises(ValueError, match=r"predictions\[1\] is int"):
        mean_token_f1(["ok", 3], ["ok", "3"])
    with pytest.raises(ValueError, match=r"references\[0\]\[1\] is int"):
        corpus_bleu(["ok"], [["ok", 3]])


# ----------------------------------------------------------------------------- BLEU
def test_bleu_clips_repeated_words():
    # Papineni et al.'s example: 7 x "the" vs a reference with 2 x "the".
    # unigram: Count_clip(the) = min(7, 2) = 2 -> p1 = 2/7; c = 7 > r = 6 -> BP = 1 -> BLEU-1 = 2/7
    hypothesis = "the the the the the the the"
    assert corpus_bleu([hypothesis], ["the cat is on the mat"], max_n=1) == pytest.approx(2 / 7)
    # bigram "the the" never occurs in the reference -> p2 = 0 -> BLEU-2 = 0 without smoothing
    assert corpus_bleu([hypothesis], ["the cat is on the mat"], max_n=2) == 0.0


def test_bleu_brevity_penalty():
    # hyp "the cat sat" (c = 3), ref of 6 tokens (r = 6)
    # p1 = 3/3, p2 = 2/2 ("the cat", "cat sat") -> geometric mean 1; BP = exp(1 - 6/3) = e^-1
    assert corpus_bleu(["the cat sat"], ["the cat sat on the mat"], max_n=2) == pytest.approx(math.exp(-1))


def test_bleu_sums_counts_over_the_corpus():
    # sentence 1: hyp "one two three four five", ref "... four six"
    #   1-grams 4/5, 2-grams 3/4 (one two, two three, three four), 3-grams 2/3, 4-grams 1/2
    # sentence 2: identical 3 tokens: 1-grams 3/3, 2-grams 2/2, 3-grams 1/1, 4-grams 0/0
    # corpus: p1 = 7/8, p2 = 5/6, p3 = 3/4, p4 = 1/2; c = r = 8 -> BP = 1
    # BLEU = (7/8 · 5/6 · 3/4 · 1/2)^(1/4) = (105/384)^(1/4) ≈ 0.7232
    hypotheses = ["one two three four five", "red green blue"]
    references = ["one two three four six", "red green blue"]
    expected = (7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25
    assert corpus_bleu(hypotheses, references) == pytest.approx(expected)
    assert expected == pytest.approx(0.7232, abs=1e-4)
    # sentence 2 alone has no 4-gram at all, so its own unsmoothed BLEU is 0: corpus BLEU is not a mean
    assert corpus_bleu(hypotheses[1:], references[1:]) == 0.0


MULTI_HYPOTHESIS = "the cat is on the mat"
MULTI_REFERENCES = ["the cat sat on the mat", "there is a cat on the mat"]


def test_bleu_multiple_references():
    # hyp (6 tokens): the cat is on the mat
    # 1-grams: the min(2, max(2, 1)) = 2, cat 1, is 1 (only ref 2 has it), on 1, mat 1 -> 6/6
    # 2-grams: the cat ✓ (ref 1), cat is ✗, is on ✗, on the ✓, the mat ✓ -> 3/5
    # ref lengths 6 and 7, closest to c = 6 is r = 6 -> BP = 1;  BLEU-2 = sqrt(1 · 3/5)
    assert corpus_bleu([MULTI_HYPOTHESIS], [MULTI_REFERENCES], max_n=2) == pytest.approx(math.sqrt(3 / 5))
    # with ref 1 alone "is" is unmatched: p1 = 5/6, p2 = 3/5 -> sqrt(1/2)
    assert corpus_bleu([MULTI_HYPOTHESIS], [MULTI_REFERENCES[:1]], max_n=2) == pytest.approx(math.sqrt(1 / 2))
    assert corpus_bleu([MULTI_HYPOTHESIS], [MULTI_REFERENCES[0]], max_n=2) == pytest.approx(math.sqrt(1 / 2))


def test_bleu_smoothing_lin_och_add_one():
    # same example, 4-grams: the cat is on / cat is on the / is on the mat: none in either ref -> 0/3,
    # so unsmoothed BLEU-4 = 0. 3-grams: only "on the mat" matches -> 1/4.
    # add-one on n >= 2: p1 = 6/6, p2 = (3+1)/(5+1), p3 = (1+1)/(4+1), p4 = (0+1)/(3+1)
    # BLEU = (1 · 2/3 · 2/5 · 1/4)^(1/4) = (1/15)^(1/4) ≈ 0.5081
    assert corpus_bleu([MULTI_HYPOTHESIS], [MULTI_REFERENCES]) == 0.0
    smoothed = corpus_bleu([MULTI_HYPOTHESIS], [MULTI_REFERENCES], smooth=True)
    assert smoothed == pytest.approx((1 / 15) ** 0.25)
    assert smoothed == pytest.approx(0.5081, abs=1e-4)
    # the unigram precision is never smoothed: 我 喜 欢 猫 vs 我 喜 欢 狗
    # p1 = 3/4, p2 = (2+1)/(3+1) = 3/4, p3 = (1+1)/(2+1) = 2/3 (我喜欢 only), p4 = (0+1)/(1+1) = 1/2
    # BLEU = (3/4 · 3/4 · 2/3 · 1/2)^(1/4) = (3/16)^(1/4)  (smoothing p1 too would give 4/5 for it)
    assert corpus_bleu(["我喜欢猫"], ["我喜欢狗"], smooth=True) == pytest.approx((3 / 16) ** 0.25)


def test_bleu_clips_by_the_max_over_references_not_the_sum():
    # "the" occurs once in each reference: Max_Ref_Count = max(1, 1) = 1, so p1 = 1/3 (a sum would give 2/3)
    # ref lengths 2 and 2 -> r = 2 < c = 3 -> BP = 1
    assert corpus_bleu(["the the the"], [["the cat", "the dog"]], max_n=1) == pytest.approx(1 / 3)


def test_bleu_closest_reference_length_tie_takes_shorter():
    # c = 5, refs of length 4 and 6 are equally close -> r = 4 (shorter) -> c > r -> BP = 1
    # unigrams: one two three four from either ref, five from ref 2 -> 5/5 -> BLEU-1 = 1
    # (taking r = 6 would give BP = exp(1 - 6/5) ≈ 0.819)
    references = [["one two three four", "one two three four five six"]]
    assert corpus_bleu(["one two three four five"], references, max_n=1) == pytest.approx(1.0)


def test_bleu_edge_cases_and_chinese():
    sentence = "the quick brown fox jumps over the lazy dog"
    assert corpus_bleu([sentence], [sentence]) == pytest.approx(1.0)
    assert corpus_bleu([""], [sentence]) == 0.0
    assert corpus_bleu([""], [sentence], smooth=True) == 0.0
    # 我 喜 欢 猫 vs 我 喜 欢 狗: p1 = 3/4, p2 = 2/3 (我喜, 喜欢; not 欢猫); c = r = 4
    # BLEU-2 = sqrt(3/4 · 2/3) = sqrt(1/2)
    assert corpus_bleu(["我喜欢猫"], ["我喜欢狗"], max_n=2) == pytest.approx(math.sqrt(1 / 2))
    with pytest.raises(ValueError, match="max_n"):
        corpus_bleu([sentence], [sentence], max_n=0)


# ----------------------------------------------------------------------------- ROUGE-L
def test_rouge_l_uses_subsequence_not_substring():
    # LCS of "one two three four five six" and "one three six seven" = one·three·six = 3
    # (the longest common *substring* would be only 1)
    # P = 3/6, R = 3/4, F1 = 2 · 1/2 · 3/4 / (1/2 + 3/4) = 0.75 / 1.25 = 0.6
    scores = rouge_l("one two three four five six", "one three six seven")
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(0.75)
    assert scores["f1"] == pytest.approx(0.6)


def test_rouge_l_word_order_matters():
    # Lin (2004): "police killed the gunman" vs "the gunman police killed": LCS = 2 -> P = R = F1 = 1/2
    assert rouge_l("the gunman police killed", "police killed the gunman")["f1"] == pytest.approx(0.5)


def test_rouge_l_edge_cases_chinese_and_corpus_mean():
    assert rouge_l("Same words here.", "same words here")["f1"] == pytest.approx(1.0)
    assert rouge_l("", "something") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # 今 天 天 气 很 好 vs 今 天 天 气 不 错: LCS = 4 of 6 -> P = R = F1 = 2/3
    assert rouge_l("今天天气很好", "今天天气不错")["f1"] == pytest.approx(2 / 3)
    # corpus: mean(2/3, 0) = 1/3; with two references the better one (F1 = 1) counts
    assert rouge_l_f1(["今天天气很好", "abc"], ["今天天气不错", "xyz"]) == pytest.approx(1 / 3)
    assert rouge_l_f1(["今天天气很好"], [["今天天气不错", "今天天气很好"]]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- token F1
def test_token_f1_squad_normalization():
    # "The cat sat on a mat." -> cat sat on mat; "the cat was on the mat" -> cat was on mat
    # overlap: cat, on, mat = 3 -> P = R = 3/4 -> F1 = 3/4
    assert token_f1("The cat sat on a mat.", "the cat was on the mat") == pytest.approx(0.75)


def test_token_f1_counts_bags_not_sets():
    # overlap = min(3, 2) for cat + min(1, 2) for dog = 3; P = 3/4, R = 3/5
    # F1 = 2 · 3/4 · 3/5 / (3/4 + 3/5) = 0.9 / 1.35 = 2/3   (sets would give overlap 2 -> 4/9)
    assert token_f1("cat cat cat dog", "cat cat dog dog bird") == pytest.approx(2 / 3)


def test_token_f1_edge_cases_and_chinese():
    assert token_f1("An answer!", "answer") == pytest.approx(1.0)
    assert token_f1("", "cat") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty after removing articles: SQuAD scores 1
    assert token_f1("dog", "cat") == 0.0
    # 负 面 vs 正 面: overlap 面 -> P = R = 1/2 -> F1 = 1/2 (exact match would give 0)
    assert token_f1("负面", "正面") == pytest.approx(0.5)
    assert exact_match(["负面"], ["正面"]) == 0.0
    # corpus mean of 1/2 and 1, and best-of-references
    assert mean_token_f1(["负面", "正面"], ["正面", "正面"]) == pytest.approx(0.75)
    assert mean_token_f1(["负面"], [["正面", "负面"]]) == pytest.approx(1.0)


def test_generation_metrics_bundle():
    predictions = ["the cat is on the mat", "正面"]
    references = [MULTI_REFERENCES, "正面"]
    metrics = generation_metrics(predictions, references)
    # exact match: item 1 matches neither reference, item 2 matches -> 1/2
    assert metrics["exact_match"] == pytest.approx(1 / 2)
    # token F1, item 1: [cat is on mat] vs ref 2 [there is cat on mat]: overlap 4, P = 1, R = 4/5 -> 8/9
    # (ref 1 gives only 3/4); item 2: 1 -> mean (8/9 + 1)/2 = 17/18
    assert metrics["token_f1"] == pytest.approx(17 / 18)
    # ROUGE-L, item 1 vs ref 1: LCS "the cat on the mat" = 5 of 6 -> 5/6 (ref 2: 8/13); item 2: 1 -> 11/12
    assert metrics["rouge_l_f1"] == pytest.approx(11 / 12)
    # smoothed BLEU on corpus counts (item 1 as above, 正面 adds 2/2 unigrams and 1/1 bigram):
    # p1 = 8/8, p2 = (4+1)/(6+1) = 5/7, p3 = (1+1)/(4+1) = 2/5, p4 = (0+1)/(3+1) = 1/4
    # c = 6 + 2 = 8 = r -> BP = 1 -> BLEU = (5/7 · 2/5 · 1/4)^(1/4) = (1/14)^(1/4)
    assert metrics["bleu"] == pytest.approx((1 / 14) ** 0.25)
    # token recall, item 1: best reference by recall: ref 2 (4 of 5 reference tokens said) vs ref 1 ([cat sat on
    # mat]: 3 of 4) -> 4/5; item 2: 1 -> (4/5 + 1) / 2 = 9/10
    assert metrics["token_recall"] == pytest.approx(9 / 10)


def test_token_precision_and_recall_by_hand():
    # prediction [tom is 34 years old] vs reference [tom is 34]: overlap 3 -> P = 3/5, R = 3/3, F1 = 2·(3/5)/(8/5)
    scores = token_scores("Tom is 34 years old.", "Tom is 34")
    assert scores == pytest.approx({"precision": 3 / 5, "recall": 1.0, "f1": 3 / 4})
    assert token_scores("", "") == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert token_scores("x", "") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_per_class_precision_recall_f1_by_hand():
    labels = ["正面", "正面", "正面", "负面", "负面"]
    predictions = ["正面", "负面", "正面", "负面", "neutral"]  # 'neutral' is no class: a miss of 负面
    scores = classification_scores(predictions, labels)
    assert scores["accuracy"] == pytest.approx(3 / 5)
    # 正面: TP 2, predicted 2, actual 3 -> P = 1, R = 2/3, F1 = 4/5;  负面: TP 1, predicted 2, actual 2 -> P = R = F1 = 1/2
    assert scores["precision[正面]"] == 1.0 and scores["recall[正面]"] == pytest.approx(2 / 3)
    assert scores["f1[正面]"] == pytest.approx(4 / 5) and scores["recall[负面]"] == pytest.approx(1 / 2)
    assert scores["macro_precision"] == pytest.approx(3 / 4) and scores["macro_recall"] == pytest.approx(7 / 12)
    assert scores["macro_f1"] == pytest.approx((4 / 5 + 1 / 2) / 2)
    # a class never predicted: precision 0 (not 0/0), F1 0
    assert classification_scores(["a", "a"], ["a", "b"])["f1[b]"] == 0.0


# ----------------------------------------------------------------------------- bits per byte
def test_bits_per_byte_hand_computed():
    # "héllo" is 6 UTF-8 bytes (é = 2); a total NLL of 6·ln 2 nats is 6 bits: 1 bit per byte
    assert len("héllo".encode("utf-8")) == 6
    assert bits_per_byte(6 * math.log(2), 6) == pytest.approx(1.0)
    # 3 tokens, each predicted with p = 1/4 (NLL = ln 4 = 2 bits), decoding to "猫!" = 3 + 1 = 4 bytes: 6 bits / 4 bytes
    assert bits_per_byte(3 * math.log(4), len("猫!".encode("utf-8"))) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="n_bytes"):
        bits_per_byte(1.0, 0)


def test_token_byte_lengths_of_a_character_codec():
    from nanollm.data import CharCodec

    itos = {0: "\n", 1: "a", 2: "é", 3: "猫", 4: "😀"}
    codec = CharCodec({c: i for i, c in itos.items()}, itos, "meta.pkl")
    assert token_byte_lengths(codec).tolist() == [1, 1, 2, 3, 4]
    ids = codec.encode("a猫é😀\n")
    assert int(token_byte_lengths(codec)[ids].sum()) == len("a猫é😀\n".encode("utf-8")) == 11
