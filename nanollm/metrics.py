"""Text-generation metrics, written out by hand so each formula can be read next to its source.

Perplexity, bits per byte (tokenizer-independent; as in nanochat's evaluation), exact match / accuracy,
corpus BLEU (Papineni et al. 2002, smoothing of Lin & Och 2004),
ROUGE-L (Lin 2004), SQuAD token precision/recall/F1 (Rajpurkar et al. 2016) and per-class
precision/recall/F1 for classification. Every metric splits text with the one
function `tokenize_for_metrics`, so English and Chinese are scored the same way.
The text scores are fractions in [0, 1] (multiply by 100 for the percentages papers print).
Rank statistics, for how well a reward model orders responses: pairwise accuracy, Pearson, Spearman's rho
(Spearman 1904) and Kendall's tau-b (Kendall 1945).
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

import torch
import torch.nn.functional as F

# CJK ideographs (basic, extension A, compatibility, extensions B+) and Japanese kana: written
# without spaces, so each character is one token ("正面" -> ["正", "面"]).
CJK_CHARACTER = re.compile(
    "([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f])"
)
# English articles dropped by SQuAD's answer normalization.
ARTICLES = {"a", "an", "the"}


# ----------------------------------------------------------------------------- tokenization
def tokenize_for_metrics(text: str) -> list[str]:
    """NFKC-normalize, lowercase, drop punctuation and symbols, split on whitespace; one token per CJK char.

    "Hello, World!" -> ["hello", "world"];  "GPT-2模型" -> ["gpt", "2", "模", "型"].
    """
    if not isinstance(text, str):
        raise ValueError(f"tokenize_for_metrics expects a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text).lower()  # full-width "ＡＢＣ，" -> "abc,"
    # Unicode categories P* (punctuation) and S* (symbols) become word separators.
    text = "".join(" " if unicodedata.category(character)[0] in "PS" else character for character in text)
    text = CJK_CHARACTER.sub(r" \1 ", text)  # space around every CJK character
    return text.split()


def answer_tokens(text: str) -> list[str]:
    """SQuAD answer normalization: metric tokens with the articles a/an/the removed."""
    return [token for token in tokenize_for_metrics(text) if token not in ARTICLES]


# ----------------------------------------------------------------------------- input checks
def _check_texts(texts, name: str) -> list[str]:
    """A non-empty list of strings (a bare string is refused: it would be scored character by character)."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise ValueError(f"{name} must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError(f"{name} is empty: a metric over no examples is undefined")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{name}[{index}] is {type(text).__name__}, expected str")
    return list(texts)


def _reference_lists(references, count: int) -> list[list[str]]:
    """Each reference as a list of acceptable strings: "ref" -> ["ref"]; ["ref1", "ref2"] stays."""
    if isinstance(references, str) or not isinstance(references, (list, tuple)):
        raise ValueError(f"references must be a list, got {type(references).__name__}")
    if len(references) != count:
        raise ValueError(f"got {count} predictions but {len(references)} references")
    reference_lists = []
    for index, reference in enumerate(references):
        options = [reference] if isinstance(reference, str) else reference
        if not isinstance(options, (list, tuple)) or len(options) == 0:
            raise ValueError(f"references[{index}] must be a str or a non-empty list of str")
        reference_lists.append(_check_texts(options, f"references[{index}]"))
    return reference_lists


# ----------------------------------------------------------------------------- perplexity
def perplexity(mean_nll) -> float:
    """exp(mean negative log-likelihood per token, in nats); a uniform guess over V tokens gives V."""
    mean_nll = float(mean_nll)  # also accepts a 0-dim tensor
    if math.isnan(mean_nll) or mean_nll < 0:
        raise ValueError(f"mean_nll must be a non-negative number, got {mean_nll}")
    if mean_nll > 700:  # exp overflows a float past ~709.78
        return math.inf
    return math.exp(mean_nll)  # PPL = exp(-(1/N) Σ_t log p(x_t | x_<t))


def perplexity_from_sums(total_nll, n_tokens) -> float:
    """Perplexity from the NLL summed over all target tokens and their count (sum over batches first)."""
    n_tokens = int(n_tokens)
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}: no target tokens to score")
    return perplexity(float(total_nll) / n_tokens)


# ----------------------------------------------------------------------------- bits per byte
def bits_per_byte(nll_sum, n_bytes) -> float:
    """Bits per UTF-8 byte of text: the NLL summed over the scored tokens (nats), over ln 2 times their bytes.

    Perplexity is per token, so it changes with the vocabulary; bits per byte counts the text itself, so models with
    different tokenizers (a character-level one too) can be compared (as in nanochat's evaluation; also the unit of
    compression benchmarks). bpb = Σ_t NLL_t / (ln 2 · Σ_t bytes(x_t)).
    """
    n_bytes = int(n_bytes)
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}: no text bytes to score")
    return float(nll_sum) / (math.log(2) * n_bytes)


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """(V,) int64: how many UTF-8 bytes each token id decodes to, built once from the tokenizer.

    SentencePiece (nanollm.tokenizer.Tokenizer): a piece's text with '▁' read as a space (add_dummy_prefix is off,
    so decode(ids) is exactly the pieces joined); a byte-fallback piece <0xNN> is 1 byte; the 8 reserved ids
    (unk, pad, bos, eos, role markers) are 0 bytes: they are structure, not text (decode(skip_special=True) drops them).
    Character codec (nanoGPT's meta.pkl, nanollm.data.CharCodec): each character's UTF-8 length.
    Tokens with 0 bytes are left out of bits per byte altogether (nanochat does the same), so the number does not
    depend on how many special tokens a tokenizer inserts.
    """
    if hasattr(tokenizer, "itos"):  # a CharCodec: id -> one character (itos may have gaps: those ids never occur)
        lengths = torch.zeros(max(tokenizer.itos) + 1, dtype=torch.long)
        for index, character in tokenizer.itos.items():
            lengths[index] = len(character.encode("utf-8"))
        return lengths
    from nanollm.tokenizer import NUM_RESERVED

    processor = tokenizer.processor  # sentencepiece.SentencePieceProcessor
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    for index in range(NUM_RESERVED, tokenizer.vocab_size):
        if processor.is_byte(index):
            lengths[index] = 1  # <0xNN>: one raw byte of a character the vocabulary lacks
        elif not (processor.is_control(index) or processor.is_unknown(index) or processor.is_unused(index)):
            lengths[index] = len(processor.id_to_piece(index).replace("\u2581", " ").encode("utf-8"))
    return lengths


def text_nll_and_bytes(logits, targets, byte_lengths) -> tuple:
    """One batch's share of bits per byte: (Σ NLL in nats, Σ UTF-8 bytes) over the targets that decode to text.

    logits (B, T, V), targets (B, T) token ids, byte_lengths (V,) from token_byte_lengths on the same device.
    Targets of 0 bytes (special tokens, or -100 = ignored) count in neither sum.
    """
    target_bytes = byte_lengths[targets.clamp(min=0)] * (targets >= 0)  # (B, T)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().clamp(min=0), reduction="none")  # (B*T,)
    return (nll * (target_bytes.flatten() > 0)).sum().item(), int(target_bytes.sum().item())


# ----------------------------------------------------------------------------- exact match / accuracy
def exact_match(predictions, references, normalize: bool = True) -> float:
    """Fraction of predictions equal to (any of) their reference(s).

    normalize=True compares SQuAD-normalized tokens (case, punctuation, articles, spacing ignored);
    normalize=False compares the raw strings.
    """
    predictions = _check_texts(predictions, "predictions")
    reference_lists = _reference_lists(references, len(predictions))
    canonical = answer_tokens if normalize else (lambda text: text)
    matches = [
        any(canonical(prediction) == canonical(reference) for reference in options)
        for prediction, options in zip(predictions, reference_lists)
    ]
    return sum(matches) / len(matches)


def accuracy(predictions, labels) -> float:
    """Fraction of predictions equal to their label (labels compared as given: str, int, ...)."""
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions but {len(labels)} labels")
    if len(predictions) == 0:
        raise ValueError("predictions is empty: accuracy over no examples is undefined")
    return sum(prediction == label for prediction, label in zip(predictions, labels)) / len(labels)


# ----------------------------------------------------------------------------- BLEU
def _ngram_counts(tokens: list[str], n: int) -> Counter:
    """How often each n-gram (a tuple of n tokens) occurs."""
    return Counter(tuple(tokens[start:start + n]) for start in range(len(tokens) - n + 1))


def _closest_length(hypothesis_length: int, reference_lengths: list[int]) -> int:
    """The reference length nearest the hypothesis length; on a tie the shorter one (as NLTK, sacrebleu)."""
    return min(reference_lengths, key=lambda length: (abs(length - hypothesis_length), length))


def corpus_bleu(hypotheses, references, max_n: int = 4, smooth: bool = False) -> float:
    """Corpus BLEU in [0, 1] (Papineni et al. 2002), tokens from `tokenize_for_metrics`.

    references[i] is one string or a list of strings (several references for hypothesis i).
    Clipped n-gram matches and n-gram totals are summed over the whole corpus before dividing, so this
    is not the mean of sentence BLEUs. smooth=True applies Lin & Och (2004) add-one smoothing to the
    n >= 2 precisions, p_n = (matches_n + 1) / (total_n + 1) ("method 2" in Chen & Cherry 2014), so
    short outputs without any 4-gram match do not score 0.
    """
    hypotheses = _check_texts(hypotheses, "hypotheses")
    reference_lists = _reference_lists(references, len(hypotheses))
    if max_n < 1:
        raise ValueError(f"max_n must be at least 1, got {max_n}")

    matches = [0] * (max_n + 1)  # matches[n]: clipped n-gram matches over the corpus
    totals = [0] * (max_n + 1)  # totals[n]: n-grams in the hypotheses over the corpus
    hypothesis_length, reference_length = 0, 0
    for hypothesis, options in zip(hypotheses, reference_lists):
        hypothesis_tokens = tokenize_for_metrics(hypothesis)
        references_tokens = [tokenize_for_metrics(reference) for reference in options]
        hypothesis_length += len(hypothesis_tokens)  # c
        reference_lengths = [len(tokens) for tokens in references_tokens]
        reference_length += _closest_length(len(hypothesis_tokens), reference_lengths)  # r
        for n in range(1, max_n + 1):
            hypothesis_counts = _ngram_counts(hypothesis_tokens, n)
            # an n-gram is credited at most as often as it occurs in any single reference
            max_reference_counts = Counter()
            for tokens in references_tokens:
                max_reference_counts |= _ngram_counts(tokens, n)  # | keeps the max count per n-gram
            # clipped count: Count_clip = min(Count, Max_Ref_Count)
            clipped = [min(count, max_reference_counts[ngram]) for ngram, count in hypothesis_counts.items()]
            matches[n] += sum(clipped)
            totals[n] += max(0, len(hypothesis_tokens) - n + 1)

    if hypothesis_length == 0:
        return 0.0
    log_precision_sum = 0.0
    for n in range(1, max_n + 1):
        if smooth and n >= 2:
            matched, total = matches[n] + 1, totals[n] + 1  # Lin & Och (2004) add-one
        else:
            matched, total = matches[n], totals[n]
        if matched == 0:
            return 0.0  # one zero precision makes the geometric mean zero
        log_precision_sum += math.log(matched / total)
    # brevity penalty: BP = 1 if c > r else exp(1 - r/c)
    if hypothesis_length > reference_length:
        brevity_penalty = 1.0
    else:
        brevity_penalty = math.exp(1 - reference_length / hypothesis_length)
    # BLEU = BP · exp(Σ_n (1/N) log p_n), uniform weights 1/N
    return brevity_penalty * math.exp(log_precision_sum / max_n)


# ----------------------------------------------------------------------------- ROUGE-L
def _longest_common_subsequence(first: list[str], second: list[str]) -> int:
    """LCS length by dynamic programming, keeping one row: O(len(first) * len(second)) time."""
    previous = [0] * (len(second) + 1)
    for token in first:
        current = [0]
        for column, other in enumerate(second):
            # LCS[i][j] = LCS[i-1][j-1] + 1 if tokens match, else max(LCS[i-1][j], LCS[i][j-1])
            if token == other:
                current.append(previous[column] + 1)
            else:
                current.append(max(previous[column + 1], current[column]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> dict:
    """ROUGE-L (Lin 2004): precision = LCS/len(prediction), recall = LCS/len(reference), F1 (β = 1).

    An empty prediction or reference scores 0 (as the rouge-score package does).
    """
    prediction_tokens, reference_tokens = tokenize_for_metrics(prediction), tokenize_for_metrics(reference)
    common = _longest_common_subsequence(prediction_tokens, reference_tokens)
    if common == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    precision = common / len(prediction_tokens)
    recall = common / len(reference_tokens)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall)}


def rouge_l_f1(predictions, references) -> float:
    """Mean ROUGE-L F1 over a corpus; with several references the best one counts."""
    predictions = _check_texts(predictions, "predictions")
    reference_lists = _reference_lists(references, len(predictions))
    scores = [
        max(rouge_l(prediction, reference)["f1"] for reference in options)
        for prediction, options in zip(predictions, reference_lists)
    ]
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------- token precision / recall / F1
def token_scores(prediction: str, reference: str) -> dict:
    """SQuAD token precision, recall and F1: overlap of the two bags of normalized tokens (articles removed).

    precision = overlap / |prediction|, recall = overlap / |reference|, F1 = their harmonic mean. As in the SQuAD
    script, if either side is empty after normalization every score is 1 when both are, else 0.
    """
    prediction_tokens, reference_tokens = answer_tokens(prediction), answer_tokens(reference)
    if not prediction_tokens or not reference_tokens:
        same = float(prediction_tokens == reference_tokens)
        return {"precision": same, "recall": same, "f1": same}
    # multiset intersection: each token counted min(count in prediction, count in reference) times
    overlap = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if overlap == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(reference_tokens)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall)}


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 (see token_scores)."""
    return token_scores(prediction, reference)["f1"]


def mean_token_score(predictions, references, score="f1") -> float:
    """Mean SQuAD token `score` ('precision' | 'recall' | 'f1') over a corpus; with several references the best
    one counts (for each example, the reference with the highest such score)."""
    predictions = _check_texts(predictions, "predictions")
    reference_lists = _reference_lists(references, len(predictions))
    scores = [
        max(token_scores(prediction, reference)[score] for reference in options)
        for prediction, options in zip(predictions, reference_lists)
    ]
    return sum(scores) / len(scores)


def mean_token_f1(predictions, references) -> float:
    """Mean SQuAD token F1 over a corpus; with several references the best one counts."""
    return mean_token_score(predictions, references, "f1")


# ----------------------------------------------------------------------------- classification: per-class scores
def classification_scores(predictions, labels) -> dict:
    """Accuracy, and per class c: precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2PR/(P+R) (0 when undefined),
    plus their unweighted (macro) means over the classes that occur as labels. Keys: 'accuracy', 'macro_precision',
    'macro_recall', 'macro_f1', 'precision[c]', 'recall[c]', 'f1[c]'. A prediction outside the labels counts as a
    false negative of its example's class (and a false positive of no class that is scored)."""
    result = {"accuracy": accuracy(predictions, labels)}
    per_class = {}
    for label in sorted(set(labels), key=str):
        true_positive = sum(p == label and l == label for p, l in zip(predictions, labels))
        predicted, actual = sum(p == label for p in predictions), sum(l == label for l in labels)
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual  # actual >= 1: the class occurs as a label
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = (precision, recall, f1)
        result.update({f"precision[{label}]": precision, f"recall[{label}]": recall, f"f1[{label}]": f1})
    for index, name in enumerate(("macro_precision", "macro_recall", "macro_f1")):
        result[name] = sum(scores[index] for scores in per_class.values()) / len(per_class)
    return result


# ----------------------------------------------------------------------------- all at once
def generation_metrics(predictions, references) -> dict:
    """Every text metric for one list of generations, e.g. for a before/after table.

    BLEU is smoothed here because short answers often share no 4-gram with the reference.
    """
    return {
        "exact_match": exact_match(predictions, references),
        "token_f1": mean_token_f1(predictions, references),
        "token_recall": mean_token_score(predictions, references, "recall"),  # how much of the answer was said
        "rouge_l_f1": rouge_l_f1(predictions, references),
        "bleu": corpus_bleu(predictions, references, smooth=True),
    }


# ----------------------------------------------------------------------------- rank statistics (reward models)
def preference_pairs(preference):
    """All (i, j) with preference[i] > preference[j]: the ordered pairs a ranking of len(preference) items implies
    (ties make no pair)."""
    k = len(preference)
    return [(i, j) for i in range(k) for j in range(k) if preference[i] > preference[j]]


def _ranks(values):
    """Ranks 1..n with ties given their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks, start = [0.0] * len(values), 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1  # the average of ranks start+1 .. end+1
        start = end + 1
    return ranks


def pearson(x, y):
    """Σ(x−x̄)(y−ȳ) / √(Σ(x−x̄)² Σ(y−ȳ)²); nan if either is constant."""
    n = len(x)
    mean_x, mean_y = sum(x) / n, sum(y) / n
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    spread = math.sqrt(sum((a - mean_x) ** 2 for a in x) * sum((b - mean_y) ** 2 for b in y))
    return covariance / spread if spread > 0 else float("nan")


def spearman(x, y):
    """Spearman's rho: the Pearson correlation of the (average) ranks."""
    return pearson(_ranks(x), _ranks(y))


def kendall_tau(x, y):
    """Kendall's tau-b: (concordant − discordant) / √((n0 − ties_x)(n0 − ties_y)), n0 = n(n−1)/2."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            sign = (x[i] - x[j]) * (y[i] - y[j])
            concordant += sign > 0
            discordant += sign < 0
            ties_x += x[i] == x[j]
            ties_y += y[i] == y[j]
    n0 = len(x) * (len(x) - 1) / 2
    denominator = math.sqrt((n0 - ties_x) * (n0 - ties_y))
    return (concordant - discordant) / denominator if denominator > 0 else float("nan")


def pair_accuracy(rewards, preference, keep=None):
    """Over groups: the fraction of pairs (preference_i > preference_j) with r_i > r_j; an equal reward counts 1/2.
    Ties in preference make no pair; keep(g, i, j) may select pairs. Returns (accuracy, number of pairs)."""
    correct, total = 0.0, 0
    for g, (group_rewards, group_preference) in enumerate(zip(rewards, preference)):
        for i, j in preference_pairs(group_preference):
            if keep is None or keep(g, i, j):
                total += 1
                difference = group_rewards[i] - group_rewards[j]
                correct += 1.0 if difference > 0 else 0.5 if difference == 0 else 0.0
    return (correct / total if total else float("nan")), total


def ranking_metrics(rewards, preference, prefix):
    """Pairwise accuracy and the mean per-prompt Spearman and Kendall correlation of rewards with `preference`."""
    accuracy, n_pairs = pair_accuracy(rewards, preference)
    rhos = [spearman(r, p) for r, p in zip(rewards, preference) if len(set(p)) > 1]
    taus = [kendall_tau(r, p) for r, p in zip(rewards, preference) if len(set(p)) > 1]
    return {f"{prefix}pair_acc": accuracy, f"{prefix}pairs": n_pairs, f"{prefix}spearman": _mean(rhos),
            f"{prefix}kendall": _mean(taus)}


def _mean(values):
    """Mean of the values that are not nan (a prompt whose rewards are all equal has no correlation)."""
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")
