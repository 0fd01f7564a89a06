"""Tests for nanollm/world.py: determinism, facts stated consistently, correct arithmetic, exact dirty-line counts."""
import re

import pytest

from nanollm.world import World, build_corpus, generate_corpus

CJK = "\u4e00-\u9fff"
CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f]")
TAG = re.compile(r"</?[a-zA-Z][^>]*>")
CLEAN_KINDS = {"encyclopedia", "story", "dialogue", "arithmetic"}


def symbol_fraction(text: str) -> float:
    """Share of non-space characters that are neither letters nor digits (CJK counts as letters)."""
    visible = [c for c in text if not c.isspace()]
    return sum(not c.isalnum() for c in visible) / max(1, len(visible))


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


@pytest.fixture(scope="module")
def corpus(world):
    return build_corpus(seed=0, n_documents=4000, dirty_fraction=0.1, world=world)


def test_same_seed_same_corpus_and_different_seed_differs():
    first = generate_corpus(seed=3, n_documents=800)
    assert first == generate_corpus(seed=3, n_documents=800)
    assert first != generate_corpus(seed=4, n_documents=800)
    assert World(5).facts() == World(5).facts()
    assert World(5).facts() != World(6).facts()


def test_default_corpus_size_and_one_line_per_document():
    documents = generate_corpus()  # its speed is no test's business: wall time on a shared machine is noise
    megabytes = sum(len(d.encode("utf-8")) for d in documents) / 1e6
    assert 3 <= megabytes <= 6, megabytes
    assert all(d and len(d.splitlines()) == 1 and "\n" not in d and "\r" not in d for d in documents)


def test_facts_lookup_and_entities_agree(world):
    facts = world.facts()
    assert len({(f.entity, f.attribute) for f in facts}) == len(facts)
    assert {f.entity for f in facts} == set(world.entities())
    assert all(world.lookup(f.entity, f.attribute) == f.value for f in facts)
    for person in world.entities("person"):
        friend, city = world.lookup(person, "friend"), world.lookup(person, "city")
        assert friend != person and world.kind(friend) == "person" and world.kind(city) == "place"
        assert world.language(friend) == world.language(city) == world.language(person)
    for thing in world.entities("object"):
        assert world.kind(world.lookup(thing, "owner")) == "person"
    with pytest.raises(KeyError, match="unknown entity"):
        world.lookup("Nobody Here", "age")
    with pytest.raises(KeyError, match="no attribute"):
        world.lookup(world.entities("place")[0], "age")


# (regex, attribute, which group is the entity) for sentences whose meaning is unambiguous
EN_NAME = r"([A-Z][a-z]+ [A-Z][a-z]+)"
ZH_NAME = rf"(?<![{CJK}])([{CJK}]{{2,3}})"
PATTERNS = [
    (rf"{EN_NAME} lives in ([A-Z][a-z]+)\.", "city", 1),
    (rf"{EN_NAME} is (\d+) years old", "age", 1),
    (rf"{EN_NAME} works as an? ([a-z]+)", "job", 1),
    (rf"The favorite color of {EN_NAME} is ([a-z]+)\.", "favorite_color", 1),
    (rf"{EN_NAME} owns (the [A-Z][a-z]+ [a-z]+)\.", "owner", 2),
    (r"(?:^|\. )((?:the|The) [A-Z][a-z]+ [a-z]+) is made of ([a-z]+)", "material", 1),
    (rf"{EN_NAME} is \d+ years old and lives in ([A-Z][a-z]+)\.", "city", 1),  # stories
    (rf"named {EN_NAME} who lives in ([A-Z][a-z]+),", "city", 1),
    (rf"went to see {EN_NAME}, who lives in ([A-Z][a-z]+)\.", "city", 1),
    (rf"{ZH_NAME}住在([{CJK}]{{2}})。", "city", 1),
    (rf"看望住在([{CJK}]{{2}})的([{CJK}]{{2,3}})。", "city", 2),
    (rf"{ZH_NAME}今年(\d+)岁", "age", 1),
    (rf"{ZH_NAME}最好的朋友是([{CJK}]{{2,3}})。", "friend", 1),
]


def test_fact_sentences_in_clean_documents_agree_with_lookup(world, corpus):
    clean = [d for d, k in zip(corpus.documents, corpus.kinds) if k in CLEAN_KINDS]
    for pattern, attribute, entity_group in PATTERNS:
        matches = [m for d in clean for m in re.finditer(pattern, d)]
        assert len(matches) >= 20, (pattern, len(matches))
        for match in matches:
            entity = match.group(entity_group)
            value = match.group(3 - entity_group)
            entity = "the" + entity[3:] if entity.startswith("The ") else entity
            assert world.lookup(entity, attribute) == value, match.group(0)


def test_every_fact_is_stated_verbatim_somewhere():
    small = World(seed=1, n_people=8, n_places=4, n_objects=6)
    text = "\n".join(generate_corpus(seed=1, n_documents=3000, world=small))
    missing = [f for f in small.facts() if small.statement(f.entity, f.attribute) not in text]
    assert missing == []


ARITHMETIC_PATTERNS = [
    (r"(\d+) (plus|minus|times) (\d+)(?: is| equals|\? It is) (\d+)\.", None),
    (r"has (\d+) ([a-z]+) and gets (\d+) more, so [A-Z][a-z]+ [A-Z][a-z]+ has (\d+) \2\.", "plus"),
    (r"had (\d+) ([a-z]+) and gave away (\d+), so [A-Z][a-z]+ [A-Z][a-z]+ has (\d+) left\.", "minus"),
    (r"(\d+)(加|减|乘以)(\d+)(?:等于|的结果是)(\d+)。", None),
    (rf"有(\d+)个([{CJK}]+)，又买了(\d+)个，现在有(\d+)个。", "plus"),
    (rf"有(\d+)个([{CJK}]+)，送给朋友(\d+)个，还剩(\d+)个。", "minus"),
]
OPERATIONS = {"plus": lambda a, b: a + b, "加": lambda a, b: a + b, "minus": lambda a, b: a - b,
              "减": lambda a, b: a - b, "times": lambda a, b: a * b, "乘以": lambda a, b: a * b}


def test_arithmetic_documents_are_correct_and_fully_parsed(corpus):
    documents = [d for d, k in zip(corpus.documents, corpus.kinds) if k == "arithmetic"]
    checked = 0
    for document in documents:
        numbers_parsed = 0
        for pattern, fixed_operation in ARITHMETIC_PATTERNS:
            for match in re.finditer(pattern, document):
                a, operation, b, result = match.groups()
                operation = fixed_operation or operation
                assert OPERATIONS[operation](int(a), int(b)) == int(result), match.group(0)
                numbers_parsed += 3
                checked += 1
        assert numbers_parsed == len(re.findall(r"\d+", document)), document  # no equation escaped the parser
    assert checked > 1000 and any(re.search(f"[{CJK}]", d) for d in documents)


def test_dirty_line_counts_match_the_corpus(corpus):
    documents, kinds, stats = corpus.documents, corpus.kinds, corpus.stats()
    assert stats["html"] == stats["control"] == stats["garbage"] == stats["duplicate"] == 100  # 4000 * 0.1 / 4
    assert sum(stats.values()) == len(documents) == 4000
    assert sum(bool(TAG.search(d)) for d in documents) == stats["html"]
    assert sum(bool(CONTROL.search(d)) for d in documents) == stats["control"]
    assert sum(symbol_fraction(d) > 0.5 for d in documents) == stats["garbage"]
    assert len(documents) - len(set(documents)) == stats["duplicate"]
    for index, (document, kind, source) in enumerate(zip(documents, kinds, corpus.sources)):
        if kind in CLEAN_KINDS:
            assert document == source and symbol_fraction(document) < 0.4
            assert not TAG.search(document) and not CONTROL.search(document) and "<" not in document
        elif kind == "html":
            assert TAG.sub("", document) == source
        elif kind == "control":
            assert CONTROL.sub("", document) == source
        elif kind == "duplicate":
            assert document in documents[:index] and kinds[documents.index(document)] in CLEAN_KINDS
    # cleaning (strip tags and control characters, drop garbage, exact dedup) leaves only distinct clean text
    kept = [s for s, k in zip(corpus.sources, kinds) if k not in ("garbage", "duplicate")]
    assert len(kept) == len(set(kept)) == 3800


def test_qa_pairs_match_facts_and_arithmetic(world):
    pairs = world.qa_pairs(seed=0, n_arithmetic=100)
    fact_pairs = [p for p in pairs if p.entity]
    assert {(p.entity, p.attribute) for p in fact_pairs} == {(f.entity, f.attribute) for f in world.facts()}
    for pair in fact_pairs:
        assert pair.short_answer == world.lookup(pair.entity, pair.attribute)
        assert pair.short_answer in pair.answer and pair.short_answer not in pair.question
        assert pair.entity.lower() in pair.question.lower()
    arithmetic = [p for p in pairs if not p.entity]
    assert len(arithmetic) == 100
    for pair in arithmetic:
        a, operation, b = re.match(r"(?:What is )?(\d+) ?(plus|minus|times|加|减|乘以) ?(\d+)", pair.question).groups()
        assert pair.short_answer == str(OPERATIONS[operation](int(a), int(b))) and pair.short_answer in pair.answer
    assert {p.language for p in fact_pairs} == {p.language for p in arithmetic} == {"en", "zh"}


def test_knowledge_records_cover_every_entity_and_fact(world):
    records = world.knowledge_records()
    assert [r["entity"] for r in records] == world.entities()
    for record in records:
        assert [f["value"] for f in record["facts"]] == list(world.profile(record["entity"]).values())
        assert all(set(f) == {"fact", "value"} and f["fact"] for f in record["facts"])
    assert sum(len(r["facts"]) for r in records) == len(world.facts())


def test_chinese_is_present_everywhere(world, corpus):
    chinese = re.compile(f"[{CJK}]")
    assert 0.1 < sum(bool(chinese.search(d)) for d in corpus.documents) / len(corpus.documents) < 0.4
    assert any(world.language(e) == "zh" and chinese.search(e) for e in world.entities("person"))
    assert any(chinese.search(r["facts"][0]["fact"]) for r in world.knowledge_records())


def test_reviews_have_balanced_sentiment_labels(world):
    reviews = world.reviews(seed=0, n=50)
    assert [label for _, label in reviews].count("正面") == 25
    assert {label for _, label in reviews} == {"正面", "负面"}
    assert all(any(e.lower() in text.lower() for e in world.entities()) for text, _ in reviews)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="n_people"):
        World(n_people=2)
    with pytest.raises(ValueError, match="dirty_fraction"):
        build_corpus(n_documents=10, dirty_fraction=1.0)
    with pytest.raises(ValueError, match="n_documents"):
        build_corpus(n_documents=0)
