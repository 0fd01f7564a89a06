"""Subword tokenizer: SentencePiece BPE or unigram, with byte fallback so no text is ever out of vocabulary.

Teaches how text becomes integer ids, and why every special token is reserved at training time.
Follows Sennrich et al. 2016 (BPE), Kudo 2018 (unigram LM) and Kudo & Richardson 2018 (SentencePiece).
Text is normalized once by `nanollm.clean.normalize_text`; SentencePiece's own normalizer is switched off.
The chat template (role tokens around each message, in the spirit of ChatML) is how a conversation becomes ids:
training (SFT, reward, PPO) and inference (chat, serving) share it, so the model sees one format everywhere.
"""
import os
import re
from typing import Iterable, List, Union

import sentencepiece

from nanollm.clean import normalize_text
from nanollm.configurator import MissingFileError, UserError

# Reserved ids, fixed for the whole project (pad != eos, so masking padding never masks a real eos).
UNK_ID, PAD_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<s>", "</s>"
SYSTEM, USER, ASSISTANT, MASK = "<|system|>", "<|user|>", "<|assistant|>", "<|mask|>"
ROLE_TOKENS = [SYSTEM, USER, ASSISTANT, MASK]  # ids 4..7; matched inside text, so chat templates can write them
NUM_RESERVED = 8
ROLES = ("system", "user", "assistant")  # the roles of a chat message


def _lines(source: Union[str, Iterable[str]]):
    """Yield non-empty training lines from a text file path or from an iterable of (possibly multi-line) texts."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as handle:
            yield from _lines(handle)
        return
    for text in source:
        for line in normalize_text(text).split("\n"):
            if line.strip():
                yield line


def train_tokenizer(source: Union[str, Iterable[str]], model_prefix: str, vocab_size: int,
                    model_type: str = "bpe", input_sentence_size: int = 2_000_000, num_threads: int = 2,
                    verbose: bool = False) -> str:
    """Train a SentencePiece model on a text file (one sentence per line) or an iterable of texts.

    Returns the path of the written `<model_prefix>.model`. If the corpus cannot support `vocab_size`
    pieces, SentencePiece stops early: the actual size (printed) is `Tokenizer(path).vocab_size`.
    """
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"tokenizer model_type must be 'bpe' or 'unigram', got {model_type!r}")
    minimum = NUM_RESERVED + 256 + 1  # specials + 256 byte pieces + at least one learned piece
    if vocab_size < minimum:
        raise UserError(f"vocab_size={vocab_size} is too small: need >= {minimum} "
                         f"({NUM_RESERVED} special + 256 byte-fallback pieces + 1)")
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise MissingFileError(f"tokenizer training file not found: {source}")
    sentencepiece.set_random_generator_seed(1337)  # sentence sampling is seeded -> same corpus, same model
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_lines(source),
            model_prefix=str(model_prefix),
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,            # a small corpus gives a smaller vocabulary instead of an error
            character_coverage=0.9995,         # rare characters (many CJK ideographs) go through byte fallback
            byte_fallback=True,                # unknown characters become UTF-8 byte pieces <0x..>: nothing is <unk>
            split_digits=True,                 # every digit its own piece: arithmetic-friendly, fewer number pieces
            normalization_rule_name="identity",  # we normalize ourselves with normalize_text
            add_dummy_prefix=False,            # no invented leading space: decode(encode(x)) == x
            remove_extra_whitespaces=False,    # keep whitespace runs (code indentation)
            allow_whitespace_only_pieces=True,  # a run of spaces may become one piece
            max_sentence_length=16384,         # bytes; longer lines are skipped during training only
            input_sentence_size=input_sentence_size,  # cap on sampled training lines, for speed
            shuffle_input_sentence=True,
            num_threads=num_threads,
            unk_id=UNK_ID, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            unk_piece=UNK, pad_piece=PAD, bos_piece=BOS, eos_piece=EOS,
            user_defined_symbols=ROLE_TOKENS,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as e:  # e.g. more distinct characters than the vocabulary has room for
        reason = str(e).split("] ")[-1].split(". Increase")[0]
        raise UserError(f"vocab_size={vocab_size}: SentencePiece cannot train on this corpus ({reason})") from None
    path = f"{model_prefix}.model"
    trained = Tokenizer(path)
    if trained.vocab_size != vocab_size:
        print(f"[tokenizer] corpus too small for vocab_size={vocab_size}: trained {trained.vocab_size} pieces")
    return path


class Tokenizer:
    """Thin wrapper over a trained SentencePiece model with the project's fixed special ids.

    encode: normalize_text, then SentencePiece; role markers written in the text ("<|user|>") become
    their ids; "<s>", "</s>", "<pad>" written in text stay plain characters (use bos=/eos= instead).
    decode: pad/bos/eos are dropped; role markers are kept as text unless skip_special=True,
    which drops all 8 reserved ids.
    """

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise MissingFileError(f"tokenizer model not found: {model_path}")
        self.model_path = str(model_path)
        self.processor = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        expected = [UNK, PAD, BOS, EOS] + ROLE_TOKENS
        found = [self.processor.id_to_piece(index) for index in range(NUM_RESERVED)]
        if found != expected:
            raise UserError(f"{model_path}: reserved pieces are {found}, expected {expected} "
                             "(not a nanollm tokenizer)")

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    unk_id, pad_id, bos_id, eos_id = UNK_ID, PAD_ID, BOS_ID, EOS_ID
    system_id, user_id, assistant_id, mask_id = 4, 5, 6, 7

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = self.processor.encode(normalize_text(text))
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def encode_batch(self, texts: List[str], bos: bool = False, eos: bool = False,
                     num_threads: int = 2) -> List[List[int]]:
        batch = self.processor.encode([normalize_text(text) for text in texts], num_threads=num_threads)
        return [([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else []) for ids in batch]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(index) for index in ids]
        if skip_special:
            ids = [index for index in ids if index >= NUM_RESERVED]
        return self.processor.decode(ids)  # SentencePiece already drops control pieces (pad, bos, eos)

    def id_to_piece(self, index: int) -> str:
        return self.processor.id_to_piece(int(index))

    def piece_to_id(self, piece: str) -> int:
        return self.processor.piece_to_id(piece)


# ----------------------------------------------------------------------------- the chat template
def encode_content(tokenizer, text):
    """Token ids of message text. The text is cut between every "<" and "|" before encoding, so a user who types
    "<|assistant|>" gets plain characters, never a role token: only the template can write role markers."""
    ids = [i for piece in re.split(r"(?<=<)(?=\|)", text) for i in tokenizer.encode(piece)]
    if any(i < NUM_RESERVED for i in ids):  # ids 0..7 are reserved (unk, pad, bos, eos, roles, mask)
        raise UserError(f"message text encoded to a reserved id: {text[:60]!r}")
    return ids


def encode_messages(tokenizer, messages):
    """The chat template, as ids and a per-token 'trained' flag:
        <s> [<|system|> text] <|user|> text <|assistant|> text </s> <|user|> text <|assistant|> text </s> ...
    Trained tokens: the assistant's text and its closing </s> (the model must learn when to stop)."""
    role_ids = {"system": tokenizer.system_id, "user": tokenizer.user_id, "assistant": tokenizer.assistant_id}
    ids, trained = [tokenizer.bos_id], [False]
    for message in messages:
        content = encode_content(tokenizer, message["content"])
        is_assistant = message["role"] == "assistant"
        ids += [role_ids[message["role"]]] + content
        trained += [False] + [is_assistant] * len(content)
        if is_assistant:
            ids.append(tokenizer.eos_id)
            trained.append(True)
    return ids, trained


def prompt_ids(tokenizer, messages):
    """The ids a model continues to answer: the template of `messages` (ending on a user turn) + <|assistant|>.
    Training and inference share encode_messages, so they see the same template."""
    return encode_messages(tokenizer, messages)[0] + [tokenizer.assistant_id]
