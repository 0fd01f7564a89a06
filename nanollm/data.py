"""Data preparation and batching: text -> clean -> split -> SentencePiece -> flat token files -> random batches.

Teaches nanoGPT's on-disk format (Karpathy 2022): every document as <s> tokens </s>, concatenated into
one flat uint16/uint32 array per split, read through a memory map. Batches are a pure function of
(seed, split, step, micro_step), so DDP ranks and resumed runs read exactly what one uninterrupted run reads.
nanoGPT's own folders (uint16 train.bin/val.bin, with or without meta.pkl) are read as they are.
"""
import hashlib
import itertools
import json
import os
import pickle
import random
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from nanollm.clean import clean_documents
from nanollm.configurator import MissingFileError, UserError
from nanollm import records, world
from nanollm.records import read_json, read_lines
from nanollm.tokenizer import Tokenizer, train_tokenizer

PIPELINE_VERSION = 2  # bump when preparation changes meaning: every cached dataset is then rebuilt
PREPARED_FILES = ("train.bin", "val.bin", "meta.json")
META_FIELDS = ("vocab_size", "dtype", "tokenizer", "train_tokens", "val_tokens")
ENCODE_CHUNK = 1024  # documents per SentencePiece batch call


# ----------------------------------------------------------------------------- reading sources

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size-1) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def is_prepared(folder: Union[str, Path]) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name in PREPARED_FILES)


def parse_dataset(dataset: Union[str, Sequence[str]]) -> List[str]:
    """'world' -> ['world']; 'a.txt,b/' -> ['a.txt', 'b/']; a list is taken as is."""
    if isinstance(dataset, (str, os.PathLike)):
        parts = [part.strip() for part in str(dataset).split(",")]
    else:
        parts = [str(part).strip() for part in dataset]
    parts = [part for part in parts if part]
    if not parts:
        raise UserError(f"dataset is empty: {dataset!r}")
    return parts


def dataset_name(sources: List[str]) -> str:
    """Folder name under data/: 'world', a file's stem, or 'first+N' for several sources."""
    stems = [Path(source).stem or "dataset" for source in sources]
    return stems[0] if len(stems) == 1 else f"{stems[0]}+{len(stems) - 1}"


def list_input_files(sources: List[str], suffixes: Tuple[str, ...] = (".txt", ".jsonl")) -> List[Path]:
    """Expand folders into their files with one of `suffixes` (recursive, sorted). Missing paths raise."""
    wanted = " or ".join(suffixes)
    files = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise MissingFileError(f"dataset path not found: {path}")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
            if not found:
                raise MissingFileError(f"no {wanted} files under folder: {path}")
            files.extend(found)
        elif path.suffix in suffixes:
            files.append(path)
        else:
            raise UserError(f"{path}: unsupported file type {path.suffix!r} (expected {wanted})")
    return files


def read_txt(path: Path) -> List[str]:
    """A .txt file holds one document per non-empty line (multi-line documents: use .jsonl)."""
    return [line for _, line in read_lines(path) if line.strip()]


def read_jsonl(path: Path) -> List[str]:
    """A .jsonl file holds one {"text": "..."} object per line; blank lines are skipped."""
    documents = []
    for line_number, record in records.read_jsonl(path):
        if not isinstance(record, dict) or "text" not in record:
            raise UserError(f"{path}:{line_number}: missing field 'text'")
        if not isinstance(record["text"], str):
            raise UserError(f"{path}:{line_number}: field 'text' must be a string, "
                             f"got {type(record['text']).__name__}")
        documents.append(record["text"])
    return documents


def read_documents(files: List[Path]) -> List[str]:
    documents = []
    for path in files:
        documents.extend(read_jsonl(path) if path.suffix == ".jsonl" else read_txt(path))
    return documents


def source_fingerprint(sources: List[str], world_seed: int, world_documents: Optional[int]) -> dict:
    """What identifies the raw input: files (path, size, mtime) or the world generator (its code and seed)."""
    if sources == ["world"]:
        code_hash = hashlib.sha256(Path(world.__file__).read_bytes()).hexdigest()  # a new generator, a new corpus
        return {"world_seed": world_seed, "world_documents": world_documents, "world_code": code_hash}
    files = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in list_input_files(sources)]
    return {"files": files}


# ----------------------------------------------------------------------------- splitting and encoding

def split_documents(documents: List[str], val_fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """Seeded shuffle, then the first round(n * val_fraction) documents (at least 1) go to val."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(documents) < 2:
        raise UserError(f"need at least 2 documents to split into train and val, got {len(documents)}")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(documents) * val_fraction)), len(documents) - 1)
    val = [documents[index] for index in order[:n_val]]
    train = [documents[index] for index in order[n_val:]]
    return train, val


def encode_documents(tokenizer: Tokenizer, documents: List[str], dtype: np.dtype, description: str) -> np.ndarray:
    """Every document as bos + tokens + eos, concatenated into one flat array."""
    chunks = []
    for start in tqdm(range(0, len(documents), ENCODE_CHUNK), desc=f"encode {description}", unit="chunk"):
        batch = tokenizer.encode_batch(documents[start:start + ENCODE_CHUNK], bos=True, eos=True)
        total = sum(len(ids) for ids in batch)
        chunks.append(np.fromiter(itertools.chain.from_iterable(batch), dtype=dtype, count=total))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def _write_atomic(path: str, write) -> None:
    """Write through a temp file and os.replace: a crash never leaves a half-written file under `path`."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as handle:
        write(handle)
    os.replace(temporary, path)


def _write_json(path: str, payload: dict) -> None:
    _write_atomic(path, lambda handle: handle.write(json.dumps(payload, indent=2, ensure_ascii=False).encode()))


# ----------------------------------------------------------------------------- the pipeline

def prepare_dataset(dataset: Union[str, Sequence[str]] = "world", data_dir: Optional[str] = None,
                    vocab_size: int = 4096, tokenizer_type: str = "bpe", val_fraction: float = 0.05,
                    seed: int = 1337, world_seed: int = 0, world_documents: Optional[int] = None) -> str:
    """Build (or reuse) train.bin, val.bin, meta.json and tokenizer.model; return their folder.

    dataset: 'world' (built-in synthetic corpus, `world_seed`), .txt/.jsonl files or folders (comma-separated
    string or list), or a folder already holding train.bin/val.bin/meta.json (returned unchanged), or a nanoGPT
    folder: train.bin/val.bin of uint16 ids with meta.pkl (vocab_size, itos/stoi) or without (GPT-2's vocabulary).
    data_dir defaults to data/<name> under the current directory. `seed` drives only the train/val split.
    """
    sources = parse_dataset(dataset)
    if len(sources) == 1 and sources[0] != "world" and os.path.isdir(sources[0]) and is_prepared(sources[0]):
        load_meta(sources[0])  # validate before handing it on
        print(f"[data] using prepared dataset {sources[0]}")
        return os.path.abspath(sources[0])
    if len(sources) == 1 and os.path.isdir(sources[0]) and is_nanogpt_folder(sources[0]):
        meta = nanogpt_meta(sources[0])  # validate before handing it on
        codec = "meta.pkl's characters" if isinstance(load_tokenizer(sources[0]), CharCodec) else "no tokenizer"
        print(f"[data] using nanoGPT dataset {sources[0]}: uint16 tokens (train {meta['train_tokens']:,}, val "
              f"{meta['val_tokens']:,}), vocab {meta['vocab_size']} from {meta['vocab_source']}, {codec}")
        return os.path.abspath(sources[0])
    if tokenizer_type not in ("bpe", "unigram"):
        raise UserError(f"tokenizer_type must be 'bpe' or 'unigram', got {tokenizer_type!r}")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data_dir = os.path.abspath(data_dir or os.path.join("data", dataset_name(sources)))
    settings = {"pipeline_version": PIPELINE_VERSION,
                "sources": source_fingerprint(sources, world_seed, world_documents), "vocab_size": vocab_size,
                "tokenizer_type": tokenizer_type, "val_fraction": val_fraction, "seed": seed}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    meta_path = os.path.join(data_dir, "meta.json")
    if is_prepared(data_dir) and os.path.isfile(os.path.join(data_dir, "tokenizer.model")):
        try:
            cached = read_json(meta_path).get("fingerprint")
        except (ValueError, AttributeError):
            cached = None
        if cached == fingerprint:
            print(f"[data] cache hit: {data_dir} is up to date (fingerprint {fingerprint[:12]})")
            return data_dir

    # 1. read (bad input fails here, before any file is touched)
    if sources == ["world"]:
        size = {} if world_documents is None else {"n_documents": world_documents}
        raw = world.generate_corpus(seed=world_seed, **size)
        source_text = f"world(seed={world_seed})"
    else:
        files = list_input_files(sources)
        raw = read_documents(files)
        source_text = ", ".join(str(path) for path in files)
    print(f"[data] read {len(raw)} documents from {source_text}")
    # 2. clean
    documents, stats = clean_documents(tqdm(raw, desc="clean", unit="doc"))
    print(f"[data] {stats}")
    if not documents:
        raise UserError(f"empty corpus after cleaning: no document kept from {source_text}")
    # 3. split by document
    train_documents, val_documents = split_documents(documents, val_fraction, seed)
    os.makedirs(data_dir, exist_ok=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # a stale meta must not vouch for half-rewritten files if we crash below
    # 4. tokenizer on the train split only (val stays unseen)
    print(f"[data] training {tokenizer_type} tokenizer (vocab {vocab_size}) on {len(train_documents)} documents")
    temporary_prefix = os.path.join(data_dir, "tokenizer.tmp")
    train_tokenizer(train_documents, temporary_prefix, vocab_size, tokenizer_type)
    os.replace(f"{temporary_prefix}.model", os.path.join(data_dir, "tokenizer.model"))
    os.replace(f"{temporary_prefix}.vocab", os.path.join(data_dir, "tokenizer.vocab"))
    tokenizer = Tokenizer(os.path.join(data_dir, "tokenizer.model"))
    # 5. encode and write
    dtype = token_dtype(tokenizer.vocab_size)
    counts = {}
    for split, documents_of_split in (("train", train_documents), ("val", val_documents)):
        tokens = encode_documents(tokenizer, documents_of_split, dtype, split)
        _write_atomic(os.path.join(data_dir, f"{split}.bin"), tokens.tofile)
        counts[split] = int(tokens.size)
    meta = {
        "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "tokenizer": "tokenizer.model",
        "tokenizer_type": tokenizer_type, "train_tokens": counts["train"], "val_tokens": counts["val"],
        "n_documents": len(documents), "train_documents": len(train_documents), "val_documents": len(val_documents),
        "clean": stats.as_dict(), "special_tokens": special_token_ids(tokenizer),
        "dataset": sources, "settings": settings, "fingerprint": fingerprint,
    }
    _write_json(meta_path, meta)  # written last: its presence means the folder is complete
    print(f"[data] wrote {data_dir}: train {counts['train']:,} tokens, val {counts['val']:,} tokens, "
          f"vocab {tokenizer.vocab_size}, {dtype.name}")
    return data_dir


def special_token_ids(tokenizer: Tokenizer) -> dict:
    names = ("unk", "pad", "bos", "eos", "system", "user", "assistant", "mask")
    return {f"{name}_id": getattr(tokenizer, f"{name}_id") for name in names}


def load_meta(data_dir: Union[str, Path]) -> dict:
    """Read meta.json (or describe a nanoGPT folder), with errors that name the file and the missing field."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path) and is_nanogpt_folder(data_dir):
        return nanogpt_meta(data_dir)
    if not os.path.isfile(path):
        raise MissingFileError(f"meta file not found: {path} (run prepare_dataset first)")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for field in META_FIELDS:
        if field not in meta:
            raise UserError(f"{path}: missing field '{field}'")
    return meta


def load_tokenizer(folder: Union[str, Path]):
    """The tokenizer of a data folder or a model's out_dir: a Tokenizer (meta.json's or tokenizer.model), a CharCodec
    (nanoGPT's character-level meta.pkl), or None (bare nanoGPT token files: GPT-2 BPE, which nanollm does not ship)."""
    if os.path.isfile(os.path.join(folder, "meta.json")):
        return Tokenizer(os.path.join(folder, load_meta(folder)["tokenizer"]))
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        return Tokenizer(os.path.join(folder, "tokenizer.model"))
    if os.path.isfile(os.path.join(folder, "meta.pkl")):
        return CharCodec.from_meta(read_meta_pkl(os.path.join(folder, "meta.pkl")), os.path.join(folder, "meta.pkl"))
    return None


def tokenizer_file(data_dir: Union[str, Path]) -> Optional[str]:
    """The file that decodes the data's token ids, to copy beside the model: our tokenizer.model, nanoGPT's meta.pkl
    (its characters), or None (bare nanoGPT token files: GPT-2's BPE, not part of nanollm)."""
    if os.path.isfile(os.path.join(data_dir, "meta.json")):
        return os.path.join(data_dir, load_meta(data_dir)["tokenizer"])
    if os.path.isfile(os.path.join(data_dir, "meta.pkl")):
        return os.path.join(data_dir, "meta.pkl")
    return None


# ----------------------------------------------------------------------------- nanoGPT's data folders

# nanoGPT's prepare.py scripts (Karpathy 2022) write train.bin/val.bin as uint16 token ids. The character-level
# ones (shakespeare_char) add meta.pkl = {'vocab_size': int, 'itos': {int: str}, 'stoi': {str: int}}; the
# GPT-2-tokenized ones (openwebtext, shakespeare) write no meta.pkl: their vocabulary is GPT-2's 50,257 tokens
# (nanoGPT's train.py pads that to 50,304 for speed; we keep the true size, which GPT-2's weights also have).
NANOGPT_DTYPE = np.dtype(np.uint16)
GPT2_VOCAB_SIZE = 50257


def is_nanogpt_folder(folder: Union[str, Path]) -> bool:
    """train.bin and val.bin without our meta.json and tokenizer.model (a half-written folder of ours has those)."""
    return (os.path.isfile(os.path.join(folder, "train.bin")) and os.path.isfile(os.path.join(folder, "val.bin"))
            and not os.path.exists(os.path.join(folder, "meta.json"))
            and not os.path.exists(os.path.join(folder, "tokenizer.model")))


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only what pickle builds without importing anything (dict, list, str, int, ...). A pickle that
    names a class or function (os.system, say) is refused before anything is called: unpickling runs code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}; only plain dicts, strings and ints are read")


def read_meta_pkl(path: Union[str, Path]) -> dict:
    """nanoGPT's meta.pkl, read safely and checked: vocab_size (int > 0), optional itos/stoi."""
    try:
        with open(path, "rb") as handle:
            meta = _PlainDataUnpickler(handle).load()
    except Exception as error:  # any malformed or hostile pickle: one line naming the file
        raise UserError(f"{path}: not a plain nanoGPT meta.pkl ({error})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a dict, got {type(meta).__name__}")
    vocab_size = meta.get("vocab_size")
    if type(vocab_size) is not int or vocab_size <= 0:
        raise UserError(f"{path}: field 'vocab_size' must be a positive int, got {vocab_size!r}")
    if vocab_size > 2 ** 16:
        raise UserError(f"{path}: vocab_size {vocab_size} does not fit nanoGPT's uint16 token files")
    return meta


def nanogpt_meta(data_dir: Union[str, Path]) -> dict:
    """Describe a nanoGPT folder in meta.json's terms: uint16 tokens, vocab from meta.pkl (else GPT-2's), no
    tokenizer file (load_tokenizer gives a CharCodec or None)."""
    pkl_path = os.path.join(data_dir, "meta.pkl")
    vocab_size = read_meta_pkl(pkl_path)["vocab_size"] if os.path.isfile(pkl_path) else GPT2_VOCAB_SIZE
    counts = {}
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        size = os.path.getsize(path)
        if size % NANOGPT_DTYPE.itemsize:
            raise UserError(f"{path}: {size} bytes is not a whole number of uint16 tokens")
        counts[f"{split}_tokens"] = size // NANOGPT_DTYPE.itemsize
    return {"vocab_size": vocab_size, "dtype": NANOGPT_DTYPE.name, "tokenizer": None, **counts, "format": "nanogpt",
            "vocab_source": "meta.pkl" if os.path.isfile(pkl_path) else "GPT-2 (no meta.pkl)"}


class CharCodec:
    """nanoGPT's character-level vocabulary (meta.pkl's stoi/itos) with a Tokenizer's encode/decode, so sampling
    code works unchanged. It has no special tokens: bos/eos requests are ignored and eos_id is None."""
    bos_id = eos_id = None

    def __init__(self, stoi: dict, itos: dict, source: str):
        self.stoi, self.itos, self.source, self.vocab_size = stoi, itos, source, len(itos)

    @classmethod
    def from_meta(cls, meta: dict, source: str) -> Optional["CharCodec"]:
        """A codec from meta.pkl's itos/stoi, or None when it has none (only a vocab_size)."""
        stoi, itos = meta.get("stoi"), meta.get("itos")
        if stoi is None and itos is None:
            return None
        if not (isinstance(stoi, dict) and isinstance(itos, dict)
                and all(isinstance(c, str) and type(i) is int for c, i in stoi.items())
                and all(stoi.get(c) == i for i, c in itos.items())):
            raise UserError(f"{source}: 'stoi' and 'itos' must be inverse dicts of str <-> int")
        return cls(stoi, itos, source)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        missing = sorted(set(text) - set(self.stoi))
        if missing:
            raise UserError(f"{self.source}: characters {''.join(missing)!r} are not in the vocabulary")
        return [self.stoi[character] for character in text]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return "".join(self.itos.get(int(token), "\ufffd") for token in ids)


def unigram_perplexity(data_dir: str, chunk_tokens: int = 1 << 24) -> float:
    """Baseline a trained model must beat: perplexity on val of token frequencies counted on train.

    p(token) = (count_train(token) + 1) / (N_train + V)   (add-one smoothing, so unseen val tokens stay finite)
    ppl = exp(-mean over val tokens of log p(token))
    """
    meta = load_meta(data_dir)
    vocab_size, dtype = meta["vocab_size"], np.dtype(meta["dtype"])
    counts = np.ones(vocab_size, dtype=np.float64)  # the +1 of add-one smoothing
    train = np.memmap(os.path.join(data_dir, "train.bin"), dtype=dtype, mode="r")
    for start in range(0, len(train), chunk_tokens):  # chunks keep memory flat on big corpora
        counts += np.bincount(train[start:start + chunk_tokens], minlength=vocab_size)
    del train
    log_probabilities = np.log(counts / counts.sum())  # (V,)
    val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=dtype, mode="r")
    negative_log_likelihood = 0.0
    for start in range(0, len(val), chunk_tokens):
        negative_log_likelihood -= float(log_probabilities[val[start:start + chunk_tokens]].sum())
    n_val = len(val)
    del val
    return float(np.exp(negative_log_likelihood / n_val))


# ----------------------------------------------------------------------------- batches

def batch_seed(seed: int, split: str, step: int, micro_step: int) -> int:
    """Mix (seed, split, step, micro_step) into one 63-bit generator seed (a hash: no two keys collide in practice)."""
    key = f"{seed}/{split}/{step}/{micro_step}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def get_batch(data_dir: str, split: str, batch_size: int, block_size: int, seed: int, step: int,
              micro_step: int, device: Union[str, torch.device] = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `split`: x = tokens[i : i+T], y = tokens[i+1 : i+T+1]; both int64 (B, T).

    A pure function of its arguments. The memmap is opened per call (one kept open grows resident memory).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    meta = load_meta(data_dir)
    dtype, vocab_size = np.dtype(meta["dtype"]), meta["vocab_size"]
    path = os.path.join(data_dir, f"{split}.bin")
    n_tokens = os.path.getsize(path) // dtype.itemsize
    if n_tokens < block_size + 1:
        raise UserError(f"{path}: {n_tokens} tokens, need at least block_size + 1 = {block_size + 1}")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    generator = torch.Generator().manual_seed(batch_seed(seed, split, step, micro_step))
    starts = torch.randint(n_tokens - block_size, (batch_size,), generator=generator).tolist()  # i in [0, N-T-1]
    windows = np.stack([tokens[i:i + block_size + 1].astype(np.int64) for i in starts])  # (B, T+1)
    del tokens
    if windows.size and windows.max() >= vocab_size:  # an id past the embedding table: wrong vocab_size or dtype
        raise UserError(f"{path}: token id {windows.max()} >= vocab_size {vocab_size} (from "
                         f"{meta.get('vocab_source', 'meta.json')})")
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))  # (B, T) tokens[i : i+T]
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))  # (B, T) tokens[i+1 : i+T+1]
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- token lists -> padded tensors
def pad_sequences(sequences, pad_id, side="right"):
    """Lists of ids -> (input_ids, attention_mask), both (B, T), padded on the right or the left."""
    width = max(len(ids) for ids in sequences)
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    rows, masks = [], []
    for ids in sequences:
        padding = [pad_id] * (width - len(ids))
        rows.append(ids + padding if side == "right" else padding + ids)
        masks.append([1] * len(ids) + [0] * len(padding) if side == "right" else [0] * len(padding) + [1] * len(ids))
    return torch.tensor(rows), torch.tensor(masks)


def last_token_index(attention_mask):
    """(B, T) mask -> (B,) index of each row's last real token; right and left padding alike."""
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("a row of the batch has no real token (its attention_mask is all 0)")
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)  # (T,)
    return (attention_mask.long() * positions).argmax(-1)  # the largest position whose mask is 1
