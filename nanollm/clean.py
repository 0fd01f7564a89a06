"""Text cleaning: the first thing real data goes through, and the one normalization shared by data and inference.

Teaches why a pipeline strips markup, drops garbage lines and removes duplicates before training
(duplicated text is memorized and wastes compute: Lee et al. 2022, "Deduplicating Training Data
Makes Language Models Better"; heuristic line filters in the spirit of C4, Raffel et al. 2020).
`normalize_text` is applied both here and by `Tokenizer.encode`, so training and inference see the same text.
"""
import hashlib
import html
import re
import unicodedata
from dataclasses import dataclass, fields
from typing import Iterable

# Tags whose content is never text (removed together with what is between them).
_SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# A tag must start right after "<" with a letter, so "a < b and c > d" is not mistaken for markup.
_BLOCK_TAG = re.compile(r"</?(?:p|div|br|li|ul|ol|tr|table|h[1-6]|blockquote|pre|section|article)\b[^<>]*/?>",
                        re.IGNORECASE)
_INLINE_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")  # the ";" is required
_BLANK_LINES = re.compile(r"\n{3,}")
# Control characters (Unicode category Cc: U+0000-001F, U+007F-009F) except \t and \n, surrogates, the BOM.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufeff]")
_NOT_ALPHANUMERIC = re.compile(r"[^\w\s]|_")  # visible characters outside Unicode categories L and N

MIN_TEXT_FRACTION = 0.5  # lines whose letters/digits (any script, CJK too) are < 50% of visible chars are garbage


def count_control_characters(text: str) -> int:
    """How many characters `normalize_text` would drop as control characters (\\r of a \\r\\n pair excluded)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return len(_CONTROL.findall(text))


def normalize_text(text: str) -> str:
    """The one normalization used by data preparation and by `Tokenizer.encode`.

    1. line endings: \\r\\n and \\r become \\n;
    2. control characters dropped (all of Unicode category Cc except \\n and \\t, surrogates, the BOM);
    3. Unicode NFKC (full-width letters/digits to ASCII, ligatures split, no-break space to space).
    Whitespace runs are NOT collapsed, so indentation in code survives and decode(encode(x)) == x
    for every x that is already normalized. The function is idempotent.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    # Control characters go before NFKC: dropping one afterwards could leave a non-NFKC pair behind.
    return unicodedata.normalize("NFKC", text)


def strip_html(text: str) -> str:
    """Remove HTML comments, script/style blocks and tags (block tags become newlines), then unescape entities."""
    text = _COMMENT.sub("", text)
    text = _SCRIPT_STYLE.sub("", text)
    text = _BLOCK_TAG.sub("\n", text)
    text = _INLINE_TAG.sub("", text)
    return _ENTITY.sub(lambda match: html.unescape(match.group()), text)  # unknown names stay as they are


def text_fraction(line: str) -> float:
    """Fraction of the visible (non-space) characters that are text: letters (CJK ideographs are category Lo),
    combining marks and digits (arithmetic like "12+5=17" is text). Symbol soup scores low."""
    visible = sum(len(word) for word in line.split())
    if visible == 0:
        return 0.0
    others = _NOT_ALPHANUMERIC.findall(line)  # regex runs in C; usually only a few punctuation marks remain
    marks = sum(1 for character in others if unicodedata.category(character)[0] == "M")
    return (visible - len(others) + marks) / visible


@dataclass
class CleanStats:
    """Counts of what cleaning did. Units: documents, except `dropped_non_text`, which counts lines."""
    documents_in: int = 0
    html_stripped: int = 0      # documents changed by removing markup or unescaping entities
    control_removed: int = 0    # documents that contained control characters
    dropped_non_text: int = 0   # LINES dropped because they were mostly symbols
    dropped_empty: int = 0      # documents empty after cleaning
    dropped_duplicate: int = 0  # documents identical (after cleaning) to an earlier one
    kept: int = 0               # documents kept

    def as_dict(self) -> dict:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def __str__(self) -> str:
        return ("clean: " + ", ".join(f"{name}={value}" for name, value in self.as_dict().items()))


def clean_document(text: str, stats: CleanStats, min_text_fraction: float = MIN_TEXT_FRACTION) -> str:
    """Clean one document, updating `stats` (html, control, non-text lines). Returns '' if nothing is left."""
    stripped = strip_html(text)  # entities are unescaped before control characters go: "&#1;" is one too
    if stripped != text:
        stats.html_stripped += 1
        text = stripped
    if count_control_characters(text) > 0:
        stats.control_removed += 1
    text = normalize_text(text)
    lines = []
    for line in text.split("\n"):
        line = line.rstrip()  # trailing spaces are invisible noise; leading indentation is kept
        if not line.strip():
            lines.append("")  # blank lines separate paragraphs; runs are collapsed below
            continue
        if text_fraction(line) < min_text_fraction:
            stats.dropped_non_text += 1
            continue
        lines.append(line)
    text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")
    if not text.strip():
        return ""
    return normalize_text(text)  # a no-op for NFKC text; guarantees the result is a fixed point


def clean_documents(documents: Iterable[str], min_text_fraction: float = MIN_TEXT_FRACTION):
    """Clean every document, drop empty ones and exact duplicates (by hash of the cleaned text).

    Returns (cleaned documents in input order, CleanStats).
    """
    stats = CleanStats()
    seen_hashes = set()
    kept = []
    for document in documents:
        stats.documents_in += 1
        text = clean_document(document, stats, min_text_fraction)
        if not text:
            stats.dropped_empty += 1
            continue
        digest = hashlib.sha1(text.encode("utf-8")).digest()
        if digest in seen_hashes:
            stats.dropped_duplicate += 1
            continue
        seen_hashes.add(digest)
        kept.append(text)
    stats.kept = len(kept)
    return kept, stats
