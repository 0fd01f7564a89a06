import pytest

from nanollm.clean import (CleanStats, clean_documents, count_control_characters, normalize_text, strip_html,
                           text_fraction)


def test_cleaning_counts_on_hand_written_input():
    documents = [
        "<p>Hello <b>world</b> &amp; friends</p>",                   # html (tags + entity)
        "Plain text line.",
        "Bad\x00 control\x07 chars here",                            # 2 control characters, 1 document
        "Good line\n#### ---- ####\n!? -- a1 ~~\n12 + 5 = 17\nAnother good line",  # 2 non-text lines
        "Plain text line.",                                         # duplicate
        "   \n\t",                                                   # empty
        "=====",                                                     # 1 non-text line, then empty
        "Plain text line.   ",                                      # duplicate once trailing spaces go
        "中文文本，测试一下。",  # kept: 8 of 10 visible chars are letters
        "Ｆｕｌｌ width",                                              # NFKC -> ASCII
    ]
    kept, stats = clean_documents(documents)
    assert kept == [
        "Hello world & friends",
        "Plain text line.",
        "Bad control chars here",
        "Good line\n12 + 5 = 17\nAnother good line",  # digits are text
        "中文文本,测试一下。",  # NFKC maps the full-width comma to ","
        "Full width",
    ]
    expected = CleanStats(documents_in=10, html_stripped=1, control_removed=1, dropped_non_text=3,
                          dropped_empty=2, dropped_duplicate=2, kept=6)
    assert stats == expected
    assert "dropped_duplicate=2" in str(stats) and "kept=6" in str(stats)


def test_cleaned_documents_are_fixed_points_of_normalize_text():
    documents = ["  indented\tcode = f(x)   \n\n\n\nnext paragraph", "e\x00\u0301 café ﬁne Ａ１",
                 "<i>x</i>&nbsp;y word"]
    kept, _ = clean_documents(documents)
    assert kept[0] == "  indented\tcode = f(x)\n\nnext paragraph"  # indentation kept, blank-line run collapsed
    for text in kept:
        assert normalize_text(text) == text


def test_normalize_text_line_endings_controls_nfkc_and_whitespace():
    assert normalize_text("a\r\nb\rc") == "a\nb\nc"
    assert normalize_text("x\x00y\x1b\x7fz\ufeff") == "xyz"
    assert normalize_text("ﬁ Ａ１ ½") == "fi A1 1⁄2"
    assert normalize_text("a   b\t\tc\n\n  d") == "a   b\t\tc\n\n  d"  # runs of whitespace are preserved
    assert normalize_text("e\x00\u0301") == "é"  # control dropped before NFKC composes the pair
    assert count_control_characters("a\r\nb\x00\x01") == 2


@pytest.mark.parametrize("text", ["", "Hello, World!", "你好，世界", "e\u0301\u0327", "Ａ\r\n\x00ﬁ",
                                  "😀👍🏽 a\t b"])
def test_normalize_text_is_idempotent(text):
    once = normalize_text(text)
    assert normalize_text(once) == once


def test_strip_html_removes_markup_but_not_comparisons():
    assert strip_html("line one<br>line two") == "line one\nline two"
    assert strip_html("<script>var a = 1 < 2;</script>kept<!-- note -->") == "kept"
    assert strip_html("a < b and c > d") == "a < b and c > d"
    assert strip_html("<|user|> hi") == "<|user|> hi"  # chat markers are not HTML
    assert strip_html("caf&eacute; &#20013; &lt;tag&gt;") == "café 中 <tag>"


def test_text_fraction_counts_letters_digits_and_marks_of_any_script():
    assert text_fraction("abc 123") == 1.0
    assert text_fraction("中文!!") == pytest.approx(2 / 4)
    assert text_fraction("a_b-c") == pytest.approx(3 / 5)  # "_" is not text although regex \w says so
    assert text_fraction("नमस्ते") == 1.0  # Devanagari vowel signs are marks (category M)
    assert text_fraction("#$%& x") == pytest.approx(1 / 5)
    assert text_fraction("   ") == 0.0


def test_control_pattern_matches_unicode_categories():
    import unicodedata
    for code in range(0x10000):
        character = chr(code)
        expected = (unicodedata.category(character) in ("Cc", "Cs") and character not in "\n\t\r") or code == 0xFEFF
        assert (count_control_characters(character) == 1) == expected, hex(code)
    assert count_control_characters("\U0001F600\U000E0001") == 0  # emoji and tag characters are kept


def test_cleaner_removes_exactly_the_dirt_the_world_injects():
    from nanollm.world import build_corpus
    corpus = build_corpus(seed=0, n_documents=800, dirty_fraction=0.2)
    kept, stats = clean_documents(corpus.documents)
    injected = corpus.kinds.count  # 40 of each dirty kind
    assert (stats.html_stripped, stats.control_removed) == (injected("html"), injected("control"))
    assert stats.dropped_non_text == stats.dropped_empty == injected("garbage")
    assert stats.dropped_duplicate == injected("duplicate")
    expected = [normalize_text(source) for source, kind in zip(corpus.sources, corpus.kinds)
                if kind not in ("garbage", "duplicate")]
    assert kept == expected
