"""A seeded synthetic world and the built-in pretraining corpus written about it.

Teaches: where data comes from when there is no internet. A tiny fictional world (people, places, objects, in English
and Chinese) whose every fact is known, so pretraining, SFT, the reward model's gold annotator and PPO can all be
checked against ground truth. Dirty lines (HTML, control characters, symbol soup, exact duplicates) are injected so the
cleaner has the work that the C4 (Raffel et al. 2020) and Gopher/MassiveText (Rae et al. 2021) filters do on the web.
"""
from __future__ import annotations

import hashlib
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple


class Fact(NamedTuple):
    entity: str
    attribute: str
    value: str  # always a string, so it can be matched inside generated text


class QAPair(NamedTuple):
    question: str
    answer: str        # a full sentence
    short_answer: str  # the exact value (the fact, or the arithmetic result)
    entity: str        # "" for arithmetic
    attribute: str     # the fact's attribute, or "plus" / "minus" / "times"
    language: str      # "en" or "zh"


# Every question belongs to one of three disjoint prompt sets, fixed by WHAT it asks (the fact, or the two numbers and
# the operation), never by its wording or by any stage's seed: a reward model and a policy trained with any seeds
# never see a validation or test question. train: reward-model and PPO training; validation: choosing settings (and
# the reward model's held-out prompts); test: the reported result, looked at last.
PROMPT_SPLITS = {"test": 0.17, "validation": 0.17, "train": 0.66}  # shares of the ~1,100 distinct questions


def question_split(pair: QAPair) -> str:
    """'train' | 'validation' | 'test' for one question: a hash of what it asks, cut at the shares of PROMPT_SPLITS."""
    if pair.entity:
        key = f"{pair.entity}|{pair.attribute}"
    else:  # arithmetic: the same sum in English or Chinese is one question
        a, b = re.findall(r"\d+", pair.question)[:2]
        key = f"{a} {pair.attribute} {b}"
    position = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 16 ** 8  # uniform in [0, 1)
    for split, share in PROMPT_SPLITS.items():
        if position < share:
            return split
        position -= share
    return "train"


# Value tables: (English, Chinese). An entity's facts are all in its own language.
JOBS = [("teacher", "老师"), ("doctor", "医生"), ("baker", "面包师"), ("farmer", "农民"), ("painter", "画家"),
        ("fisher", "渔夫"), ("nurse", "护士"), ("carpenter", "木匠"), ("engineer", "工程师"), ("singer", "歌手"),
        ("driver", "司机"), ("gardener", "园丁"), ("tailor", "裁缝"), ("potter", "陶艺师"), ("librarian", "图书管理员")]
PETS = [("cat", "猫"), ("dog", "狗"), ("rabbit", "兔子"), ("parrot", "鹦鹉"), ("turtle", "乌龟"), ("hamster", "仓鼠"),
        ("owl", "猫头鹰"), ("goat", "山羊"), ("hedgehog", "刺猬"), ("duck", "鸭子")]
COLORS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("purple", "紫色"),
          ("white", "白色"), ("black", "黑色"), ("orange", "橙色"), ("grey", "灰色"), ("pink", "粉色")]
FOODS = [("noodles", "面条"), ("rice", "米饭"), ("apples", "苹果"), ("soup", "汤"), ("bread", "面包"), ("fish", "鱼"),
         ("dumplings", "饺子"), ("cake", "蛋糕"), ("pears", "梨"), ("cheese", "奶酪")]
MATERIALS = [("wood", "木头"), ("iron", "铁"), ("copper", "铜"), ("glass", "玻璃"), ("stone", "石头"), ("cloth", "布"),
             ("silver", "银"), ("clay", "陶土")]
OBJECT_KINDS = [("lamp", "灯"), ("clock", "钟"), ("cup", "杯"), ("box", "箱"), ("book", "书"), ("flute", "笛"),
                ("mirror", "镜"), ("key", "钥匙"), ("bell", "铃"), ("kite", "风筝")]
CLIMATES = [("warm", "温暖"), ("cold", "寒冷"), ("rainy", "多雨"), ("dry", "干燥"), ("windy", "多风"), ("mild", "温和"),
            ("snowy", "多雪"), ("humid", "潮湿")]
LANDMARKS = [("Tower", "塔"), ("Bridge", "桥"), ("Gate", "门"), ("Garden", "园"), ("Library", "楼"), ("Fountain", "泉")]

# Name parts: English names are built from syllables; Chinese names from a few characters.
ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "m"]
CITY_SUFFIXES = ["port", "ford", "holm", "vale", "wick", "stead", "mouth", "by", "ton", "mere"]
COUNTRY_SUFFIXES = ["ria", "land", "mar", "dor", "via"]
ZH_SURNAMES = "李王张刘陈杨赵黄周吴林何郭马罗高梁宋郑谢"
ZH_GIVEN = "小明雨晨云海宁婷杰华安佳文心悦涛欣然思远"
ZH_PLACE_FIRST = "青云白金石清长东南北西玉龙凤柳桃"
ZH_PLACE_SUFFIX = "州城阳安山宁原港"
ZH_POETIC = "明月星风雪霞松竹梅兰珠春秋霜露"

PERSON_ATTRIBUTES = ("age", "city", "job", "pet", "favorite_color", "favorite_food", "friend")
PLACE_ATTRIBUTES = ("country", "river", "landmark", "population", "climate")
OBJECT_ATTRIBUTES = ("owner", "color", "material", "location")
# attribute -> (English label, Chinese label), used by knowledge records
ATTRIBUTE_LABELS = {
    "age": ("age", "年龄"), "city": ("home city", "居住城市"), "job": ("job", "职业"), "pet": ("pet", "宠物"),
    "favorite_color": ("favorite color", "最喜欢的颜色"), "favorite_food": ("favorite food", "最喜欢的食物"),
    "friend": ("best friend", "最好的朋友"), "country": ("country", "所属国家"), "river": ("river", "河流"),
    "landmark": ("landmark", "名胜"), "population": ("population", "人口"), "climate": ("climate", "气候"),
    "owner": ("owner", "主人"), "color": ("color", "颜色"), "material": ("material", "材料"),
    "location": ("location", "所在城市"),
}

# attribute -> (statements, questions). {e} entity, {v} value, {av} value with "a"/"an". The first statement is the
# canonical answer used by qa_pairs; the others vary the wording across documents.
TEMPLATES = {"en": {
    "age": (["{e} is {v} years old.", "{e} turned {v} this year.", "The age of {e} is {v}."],
            ["How old is {e}?", "What is the age of {e}?"]),
    "city": (["{e} lives in {v}.", "{e} makes a home in the city of {v}.", "The home of {e} is in {v}."],
             ["Where does {e} live?", "In which city does {e} live?"]),
    "job": (["{e} works as {av}.", "By trade, {e} is {av}.", "The job of {e} is {v}."],
            ["What does {e} do for a living?", "What is the job of {e}?"]),
    "pet": (["{e} has a pet {v}.", "{e} keeps {av} as a pet.", "The pet of {e} is {av}."],
            ["What pet does {e} have?", "Which animal does {e} keep as a pet?"]),
    "favorite_color": (["The favorite color of {e} is {v}.", "{e} likes the color {v} best.",
                        "Of all colors, {e} loves {v} the most."],
                       ["What is the favorite color of {e}?", "Which color does {e} like best?"]),
    "favorite_food": (["The favorite food of {e} is {v}.", "{e} loves to eat {v}.",
                       "Nothing tastes better to {e} than {v}."],
                      ["What is the favorite food of {e}?", "What does {e} love to eat?"]),
    "friend": (["The best friend of {e} is {v}.", "{e} calls {v} a best friend.", "{v} is the best friend of {e}."],
               ["Who is the best friend of {e}?", "Who is {e}'s best friend?"]),
    "country": (["{e} is a city in {v}.", "{e} belongs to the country of {v}.", "The city of {e} lies in {v}."],
                ["In which country is {e}?", "Which country is {e} part of?"]),
    "river": (["The {v} flows through {e}.", "{e} lies on the banks of the {v}.", "The river of {e} is the {v}."],
              ["Which river flows through {e}?", "What is the river of {e}?"]),
    "landmark": (["The most famous sight in {e} is the {v}.", "Visitors to {e} go to see the {v}.",
                  "{e} is known for the {v}."],
                 ["What is {e} known for?", "What is the famous landmark of {e}?"]),
    "population": (["About {v} people live in {e}.", "{e} has a population of about {v}.",
                    "The population of {e} is about {v}."],
                   ["How many people live in {e}?", "What is the population of {e}?"]),
    "climate": (["The weather in {e} is usually {v}.", "{e} has a {v} climate.", "Most days in {e} are {v}."],
                ["What is the weather like in {e}?", "What is the climate of {e}?"]),
    "owner": (["{e} belongs to {v}.", "The owner of {e} is {v}.", "{v} owns {e}."],
              ["Who owns {e}?", "Whom does {e} belong to?"]),
    "color": (["{e} is {v}.", "The color of {e} is {v}.", "{e} is painted {v}."],
              ["What color is {e}?", "What is the color of {e}?"]),
    "material": (["{e} is made of {v}.", "Someone made {e} out of {v}.", "The material of {e} is {v}."],
                 ["What is {e} made of?", "What material is {e} made of?"]),
    "location": (["{e} is kept in {v}.", "You can find {e} in {v}.", "The place where {e} is kept is {v}."],
                 ["Where is {e} kept?", "In which city is {e} kept?"]),
}, "zh": {
    "age": (["{e}今年{v}岁。", "{e}的年龄是{v}岁。"], ["{e}今年多大？", "{e}几岁了？"]),
    "city": (["{e}住在{v}。", "{e}的家在{v}。"], ["{e}住在哪里？", "{e}的家在哪个城市？"]),
    "job": (["{e}是一名{v}。", "{e}的职业是{v}。"], ["{e}是做什么工作的？", "{e}的职业是什么？"]),
    "pet": (["{e}养了一只{v}。", "{e}的宠物是{v}。"], ["{e}养了什么宠物？", "{e}的宠物是什么？"]),
    "favorite_color": (["{e}最喜欢的颜色是{v}。", "{e}最喜欢{v}。"], ["{e}最喜欢什么颜色？", "{e}最喜欢的颜色是什么？"]),
    "favorite_food": (["{e}最喜欢吃{v}。", "{e}最喜欢的食物是{v}。"], ["{e}最喜欢吃什么？", "{e}最喜欢的食物是什么？"]),
    "friend": (["{e}最好的朋友是{v}。", "{v}是{e}最好的朋友。"], ["{e}最好的朋友是谁？", "谁是{e}最好的朋友？"]),
    "country": (["{e}是{v}的一座城市。", "{e}位于{v}。"], ["{e}在哪个国家？", "{e}属于哪个国家？"]),
    "river": (["{v}流过{e}。", "{e}坐落在{v}边。"], ["哪条河流过{e}？", "{e}的河叫什么名字？"]),
    "landmark": (["{e}最有名的地方是{v}。", "来{e}的人都会去看{v}。"], ["{e}最有名的地方是什么？", "{e}以什么闻名？"]),
    "population": (["{e}大约有{v}人。", "{e}的人口大约是{v}。"], ["{e}有多少人？", "{e}的人口是多少？"]),
    "climate": (["{e}的气候{v}。", "{e}一年中大多是{v}的天气。"], ["{e}的气候怎么样？", "{e}的天气通常怎么样？"]),
    "owner": (["{e}的主人是{v}。", "{e}属于{v}。"], ["{e}是谁的？", "{e}的主人是谁？"]),
    "color": (["{e}是{v}的。", "{e}的颜色是{v}。"], ["{e}是什么颜色的？", "{e}的颜色是什么？"]),
    "material": (["{e}是用{v}做的。", "{e}的材料是{v}。"], ["{e}是用什么做的？", "{e}是什么材料做的？"]),
    "location": (["{e}放在{v}。", "{e}被放在{v}。"], ["{e}放在哪里？", "{e}在哪个城市？"]),
}}

ZH_OPERATIONS = {"plus": "加", "minus": "减", "times": "乘以"}
# sentiment examples for SFT classification: language -> label -> what is reviewed -> templates
REVIEWS = {
    "en": {"正面": {"object": ["I love {e}, it is the best thing I own.", "{e} works perfectly and looks lovely.",
                               "Great quality, {e} was worth every coin."],
                    "place": ["What a wonderful trip to {e}, I would go again!",
                              "The food in {e} was delicious and the people were kind."]},
           "负面": {"object": ["{e} broke after one day, what a waste of money.",
                               "I am unhappy with {e}, it is ugly and badly made.", "Do not buy {e}, it is useless."],
                    "place": ["The trip to {e} was awful and the hotel was dirty.",
                              "I will never visit {e} again, it was boring."]}},
    "zh": {"正面": {"object": ["{e}非常好用，我很喜欢。", "{e}做工精致，物超所值。"],
                    "place": ["这次去{e}旅行很开心，下次还想去。", "{e}的饭菜很好吃，人也很热情。"]},
           "负面": {"object": ["{e}用了一天就坏了，太失望了。", "{e}质量很差，不推荐。"],
                    "place": ["{e}的酒店又脏又贵，再也不去了。", "去{e}玩真没意思，浪费时间。"]}},
}


def _with_article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fill(template: str, **fields: str) -> str:
    return _capitalize(template.format(**fields))


def _pick(rng: random.Random, table: list, language: str) -> str:
    return rng.choice(table)[0 if language == "en" else 1]


def _split(total: int, fraction: float, minimum: int) -> tuple[int, int]:
    """(English, Chinese) entity counts, with at least `minimum` of each language when fraction > 0."""
    chinese = 0 if fraction == 0 else min(max(round(total * fraction), minimum), total - minimum)
    return total - chinese, chinese


class World:
    """People, places and objects with facts about them; deterministic for a seed."""

    def __init__(self, seed: int = 0, n_people: int = 80, n_places: int = 24, n_objects: int = 60,
                 chinese_fraction: float = 0.2):
        if n_people < 4 or n_places < 2 or n_objects < 2:
            raise ValueError(f"World: need n_people >= 4, n_places >= 2, n_objects >= 2, "
                             f"got {n_people}, {n_places}, {n_objects}")
        if not 0 <= chinese_fraction < 1:
            raise ValueError(f"World: chinese_fraction must be in [0, 1), got {chinese_fraction}")
        self.seed = seed
        self._profiles: dict[str, dict[str, str]] = {}  # entity -> {attribute: value}
        self._kind: dict[str, str] = {}                 # entity -> "person" | "place" | "object"
        self._language: dict[str, str] = {}             # entity -> "en" | "zh"
        self._used_names: set[str] = set()
        self._groups: dict[tuple, list[str]] = {}
        rng = random.Random(f"world:{seed}")
        counts = zip(_split(n_people, chinese_fraction, 2), _split(n_places, chinese_fraction, 1),
                     _split(n_objects, chinese_fraction, 1))
        for language, (people, places, objects) in zip(("en", "zh"), counts):
            self._build_region(rng, language, people, places, objects)
        # reverse indexes for sentences such as "X owns the Y lamp." and "People who live in Z include ..."
        self.owned = {e: [o for o in self.entities("object") if self.lookup(o, "owner") == e]
                      for e in self.entities("person")}
        self.residents = {e: [p for p in self.entities("person") if self.lookup(p, "city") == e]
                          for e in self.entities("place")}

    # ---- construction ----
    def _unique(self, make) -> str:
        for _ in range(1000):
            name = make()
            if name not in self._used_names:
                self._used_names.add(name)
                return name
        raise ValueError("World: ran out of distinct names; use fewer entities")

    def _name(self, rng: random.Random, what: str, language: str) -> str:
        def syllables(count: int) -> str:
            return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(count)) + rng.choice(CODAS)
        chars = lambda pool, count: "".join(rng.choice(pool) for _ in range(count))  # noqa: E731
        english = {
            "person": lambda: f"{syllables(2).capitalize()} {syllables(rng.randint(2, 3)).capitalize()}",
            "place": lambda: syllables(1).capitalize() + rng.choice(CITY_SUFFIXES),
            "country": lambda: syllables(2).capitalize() + rng.choice(COUNTRY_SUFFIXES),
            "river": lambda: syllables(2).capitalize() + " River",
            "landmark": lambda: f"{syllables(2).capitalize()} {_pick(rng, LANDMARKS, 'en')}",
        }
        chinese = {
            "person": lambda: chars(ZH_SURNAMES, 1) + chars(ZH_GIVEN, rng.randint(1, 2)),
            "place": lambda: chars(ZH_PLACE_FIRST, 1) + chars(ZH_PLACE_SUFFIX, 1),
            "country": lambda: chars(ZH_POETIC, 2) + "国",
            "river": lambda: chars(ZH_PLACE_FIRST, 1) + chars(ZH_POETIC, 1) + "河",
            "landmark": lambda: chars(ZH_POETIC, 2) + _pick(rng, LANDMARKS, "zh"),
        }
        return self._unique((english if language == "en" else chinese)[what])

    def _add(self, entity: str, kind: str, language: str, profile: dict[str, str]) -> None:
        self._profiles[entity], self._kind[entity], self._language[entity] = profile, kind, language

    def _build_region(self, rng: random.Random, language: str, n_people: int, n_places: int, n_objects: int) -> None:
        pick = lambda table: _pick(rng, table, language)  # noqa: E731
        countries = [self._name(rng, "country", language) for _ in range(max(1, n_places // 4))]
        places = [self._name(rng, "place", language) for _ in range(n_places)]
        for place in places:
            self._add(place, "place", language, {
                "country": rng.choice(countries), "river": self._name(rng, "river", language),
                "landmark": self._name(rng, "landmark", language),
                "population": str(rng.randrange(5, 900) * 1000), "climate": pick(CLIMATES)})
        people = [self._name(rng, "person", language) for _ in range(n_people)]
        for person in people:
            self._add(person, "person", language, {
                "age": str(rng.randint(18, 80)), "city": rng.choice(places), "job": pick(JOBS), "pet": pick(PETS),
                "favorite_color": pick(COLORS), "favorite_food": pick(FOODS),
                "friend": rng.choice([other for other in people if other != person])})
        for _ in range(n_objects):
            kind = pick(OBJECT_KINDS)
            if language == "en":
                name = self._unique(lambda: f"the {rng.choice(ONSETS).capitalize()}{rng.choice(VOWELS)}"
                                            f"{rng.choice(ONSETS)}{rng.choice(VOWELS)}{rng.choice(CODAS)} {kind}")
            else:
                name = self._unique(lambda: "".join(rng.choice(ZH_POETIC) for _ in range(2)) + kind)
            self._add(name, "object", language, {"owner": rng.choice(people), "color": pick(COLORS),
                                                 "material": pick(MATERIALS), "location": rng.choice(places)})

    # ---- queries ----
    def entities(self, kind: str | None = None, language: str | None = None) -> list[str]:
        """All entity names (people, places, objects), or only those of one kind and/or language."""
        return list(self._group(kind, language))

    def _group(self, kind: str | None, language: str | None) -> list[str]:
        """Cached entities(kind, language); the corpus generators call this thousands of times."""
        if (kind, language) not in self._groups:
            self._groups[kind, language] = [e for e in self._profiles if kind in (None, self._kind[e])
                                            and language in (None, self._language[e])]
        return self._groups[kind, language]

    def __contains__(self, name: str) -> bool:
        return name in self._profiles

    def kind(self, entity: str) -> str:
        return self._kind[self._check(entity)]

    def language(self, entity: str) -> str:
        return self._language[self._check(entity)]

    def profile(self, entity: str) -> dict[str, str]:
        """A copy of {attribute: value} for one entity."""
        return dict(self._profiles[self._check(entity)])

    def lookup(self, entity: str, attribute: str) -> str:
        """The true value of `attribute` of `entity` (raises KeyError naming what is unknown)."""
        profile = self._profiles[self._check(entity)]
        if attribute not in profile:
            raise KeyError(f"{self._kind[entity]} {entity!r} has no attribute {attribute!r}; it has {list(profile)}")
        return profile[attribute]

    def facts(self) -> list[Fact]:
        return [Fact(e, a, v) for e, profile in self._profiles.items() for a, v in profile.items()]

    def _check(self, entity: str) -> str:
        if entity not in self._profiles:
            raise KeyError(f"unknown entity {entity!r}")
        return entity

    # ---- text about facts ----
    def statement(self, entity: str, attribute: str, rng: random.Random | None = None) -> str:
        """One sentence stating a fact; the canonical wording, or a random one when rng is given."""
        statements = TEMPLATES[self.language(entity)][attribute][0]
        template = statements[0] if rng is None else rng.choice(statements)
        value = self.lookup(entity, attribute)
        return _fill(template, e=entity, v=value, av=_with_article(value))

    def question(self, entity: str, attribute: str, rng: random.Random | None = None) -> str:
        questions = TEMPLATES[self.language(entity)][attribute][1]
        return _fill(questions[0] if rng is None else rng.choice(questions), e=entity)

    def qa_pairs(self, seed: int = 0, n_arithmetic: int = 200) -> list[QAPair]:
        """One question per fact (random wording, canonical answer), then n_arithmetic arithmetic questions."""
        rng = random.Random(f"qa:{seed}")
        pairs = [QAPair(self.question(f.entity, f.attribute, rng), self.statement(f.entity, f.attribute), f.value,
                        f.entity, f.attribute, self.language(f.entity)) for f in self.facts()]
        for _ in range(n_arithmetic):
            language = "zh" if rng.random() < 0.2 else "en"
            a, operation, b, result = _arithmetic(rng)
            if language == "en":
                question, answer = f"What is {a} {operation} {b}?", f"{a} {operation} {b} is {result}."
            else:
                symbol = ZH_OPERATIONS[operation]
                question, answer = f"{a}{symbol}{b}等于多少？", f"{a}{symbol}{b}等于{result}。"
            pairs.append(QAPair(question, answer, str(result), "", operation, language))
        return pairs

    def knowledge_records(self) -> list[dict]:
        """[{"entity": ..., "facts": [{"fact": label, "value": ...}]}], one record per entity."""
        column = lambda e: 0 if self.language(e) == "en" else 1  # noqa: E731
        return [{"entity": e, "facts": [{"fact": ATTRIBUTE_LABELS[a][column(e)], "value": v}
                                        for a, v in profile.items()]} for e, profile in self._profiles.items()]

    def reviews(self, seed: int = 0, n: int = 200) -> list[tuple[str, str]]:
        """Sentiment examples (text, label) about the world's objects and places; label is "正面" or "负面"."""
        rng = random.Random(f"reviews:{seed}")
        examples = []
        for index in range(n):
            label = "正面" if index % 2 == 0 else "负面"
            language = "zh" if rng.random() < 0.3 else "en"
            thing = rng.choice(self._group("object", language) + self._group("place", language))
            templates = REVIEWS[language][label]["object" if self.kind(thing) == "object" else "place"]
            examples.append((_fill(rng.choice(templates), e=thing), label))
        return examples


# ---------------------------------------------------------------- corpus documents (each one line, no newlines)

def _arithmetic(rng: random.Random) -> tuple[int, str, int, int]:
    """(a, operation, b, result) with small non-negative numbers."""
    operation = rng.choice(["plus", "minus", "times"])
    if operation == "times":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return a, operation, b, a * b
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if operation == "minus":
        a, b = max(a, b), min(a, b)
        return a, operation, b, a - b
    return a, operation, b, a + b


ARITHMETIC = {
    "en": {"intro": ["", "Math practice.", "Let us count.", "Sums for today:", "A page from a school notebook."],
           "equation": ["{a} {op} {b} is {c}.", "{a} {op} {b} equals {c}.", "What is {a} {op} {b}? It is {c}."],
           "gain": "{p} has {a} {item} and gets {b} more, so {p} has {c} {item}.",
           "loss": "{p} had {a} {item} and gave away {b}, so {p} has {c} left.",
           "items": ["apples", "pears", "coins", "stamps", "shells", "books", "eggs", "marbles"]},
    "zh": {"intro": ["", "数学练习：", "今天的算术：", "一页作业本："],
           "equation": ["{a}{op}{b}等于{c}。", "{a}{op}{b}的结果是{c}。"],
           "gain": "{p}有{a}个{item}，又买了{b}个，现在有{c}个。",
           "loss": "{p}有{a}个{item}，送给朋友{b}个，还剩{c}个。",
           "items": ["苹果", "橘子", "梨", "鸡蛋", "桃子", "包子"]},
}


def _arithmetic_document(world: World, rng: random.Random) -> str:
    language = "zh" if rng.random() < 0.2 else "en"
    table = ARITHMETIC[language]
    parts = [rng.choice(table["intro"])]
    for _ in range(rng.randint(3, 7)):
        if rng.random() < 0.25:  # a word problem about someone in the world
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            gain = rng.random() < 0.5
            a = a if gain else a + b
            parts.append(table["gain" if gain else "loss"].format(
                p=rng.choice(world._group("person", language)),
                a=a, b=b, c=a + b if gain else a - b, item=rng.choice(table["items"])))
        else:
            a, operation, b, result = _arithmetic(rng)
            op = operation if language == "en" else ZH_OPERATIONS[operation]
            parts.append(_fill(rng.choice(table["equation"]), a=a, op=op, b=b, c=result))
    return (" " if language == "en" else "").join(p for p in parts if p)


INTROS = {"en": {"person": ["", "About {e}.", "Here is what people say about {e}.", "A note on {e}:"],
                 "place": ["", "Travel notes on {e}.", "A short guide to {e}."],
                 "object": ["", "A few words about {e}.", "Notes on {e}."]},
          "zh": {"person": ["", "关于{e}：", "{e}简介："], "place": ["", "{e}旅行笔记：", "关于{e}："],
                 "object": ["", "关于{e}：", "物品说明："]}}


def _encyclopedia_document(world: World, rng: random.Random) -> str:
    entity = rng.choice(world._group(None, None))
    language, kind = world.language(entity), world.kind(entity)
    attributes = list(world.profile(entity))
    rng.shuffle(attributes)
    sentences = [world.statement(entity, a, rng) for a in attributes[:rng.randint(2, len(attributes))]]
    if kind == "person" and world.owned[entity] and rng.random() < 0.5:
        thing = rng.choice(world.owned[entity])
        sentences.append(f"{entity} owns {thing}." if language == "en" else f"{entity}拥有{thing}。")
    if kind == "place" and world.residents[entity] and rng.random() < 0.5:
        names = rng.sample(world.residents[entity], min(3, len(world.residents[entity])))
        sentences.append(f"People who live in {entity} include {', '.join(names)}." if language == "en"
                         else f"住在{entity}的人有{'、'.join(names)}。")
    rng.shuffle(sentences)
    intro = rng.choice(INTROS[language][kind]).format(e=entity)
    return (" " if language == "en" else "").join(_capitalize(s) for s in [intro] + sentences if s)


STORY = {
    "en": {"time": ["One morning", "Last spring", "On a quiet evening", "Early one day", "Last winter", "Yesterday"],
           "intro": ["{p} is {age} years old and lives in {city}.",
                     "There is {job_av} named {p} who lives in {city}, a city in {country}.",
                     "{time}, {p} was at home in {city}."],
           "later": ["Later", "After lunch", "In the afternoon", "Then", "Soon after"],
           "middle": ["{later}, {p} walked the {pet} along the {river}.",
                      "{p} went to see {friend}, who lives in {friend_city}.",
                      "{friend} works as {friend_job_av}, and {p} works as {job_av}.",
                      "They met near the {landmark}, the most famous sight in {city}.",
                      "For dinner they ate {food}, the favorite food of {p}.",
                      "{p} wore {color_av} scarf, because {color} is the favorite color of {p}.",
                      "The weather in {city} was {climate}, as it usually is.",
                      "On the table was {object}, which belongs to {owner}.",
                      "{object} is made of {material} and it is {object_color}.",
                      "One week, {p} traveled to {object_location} to look at {object}.",
                      "The {pet} of {p} slept all afternoon."],
           "end": ["At night {p} went home to {city}, happy and tired.", "It was a good day for {p} and {friend}.",
                   "{p} smiled and thought about the next trip to {friend_city}."]},
    "zh": {"time": ["有一天", "去年春天", "一个安静的晚上", "一大早", "去年冬天", "昨天"],
           "intro": ["{p}今年{age}岁，住在{city}。", "在{country}的{city}，住着一位{job}，名叫{p}。", "{time}，{p}在{city}的家里。"],
           "later": ["后来", "午饭后", "下午", "接着"],
           "middle": ["{later}，{p}带着{pet}沿着{river}散步。", "{p}去看望住在{friend_city}的{friend}。",
                      "{friend}是一名{friend_job}，{p}是一名{job}。", "他们在{city}的{landmark}附近见面。",
                      "晚饭他们吃了{food}，那是{p}最喜欢的食物。", "{p}围着一条{color}的围巾，因为{p}最喜欢{color}。",
                      "{city}的天气和往常一样{climate}。", "桌上放着{object}，它的主人是{owner}。",
                      "{object}是用{material}做的，颜色是{object_color}。", "有一周，{p}去{object_location}看{object}。"],
           "end": ["晚上{p}回到{city}，又累又开心。", "这是{p}和{friend}快乐的一天。", "{p}笑着想起下一次去{friend_city}的旅行。"]},
}


def _story_document(world: World, rng: random.Random) -> str:
    """A short story whose every stated fact is true in the world; events are invented, facts are not."""
    person = rng.choice(world._group("person", None))
    language = world.language(person)
    p, friend = world.profile(person), world.lookup(person, "friend")
    city = world.profile(p["city"])
    thing = rng.choice(world.owned[person] or world._group("object", language))
    t = world.profile(thing)
    context = dict(p=person, age=p["age"], city=p["city"], job=p["job"], job_av=_with_article(p["job"]), pet=p["pet"],
                   food=p["favorite_food"], color=p["favorite_color"], color_av=_with_article(p["favorite_color"]),
                   friend=friend,
                   friend_city=world.lookup(friend, "city"), friend_job=world.lookup(friend, "job"),
                   friend_job_av=_with_article(world.lookup(friend, "job")), country=city["country"],
                   river=city["river"], landmark=city["landmark"], climate=city["climate"], object=thing,
                   owner=t["owner"], material=t["material"], object_color=t["color"], object_location=t["location"],
                   time=rng.choice(STORY[language]["time"]), later=rng.choice(STORY[language]["later"]))
    beats = STORY[language]
    chosen = [rng.choice(beats["intro"])] + rng.sample(beats["middle"], rng.randint(2, 5)) + [rng.choice(beats["end"])]
    return (" " if language == "en" else "").join(_fill(b, **context) for b in chosen)


DIALOGUE = {"en": {"speakers": ("A: ", "B: "), "greet": ["", "Hi. ", "Hello! ", "Excuse me. ", "Good morning. "],
                   "close": ["Thanks!", "Thank you.", "I see, thanks.", "Good to know."]},
            "zh": {"speakers": ("甲：", "乙："), "greet": ["", "你好，", "请问，", "早上好，"],
                   "close": ["谢谢！", "好的，谢谢。", "明白了。"]}}


def _dialogue_document(world: World, rng: random.Random) -> str:
    """Questions and answers about facts; a follow-up may ask about an entity named in the last answer."""
    entity = rng.choice(world._group(None, None))
    language = world.language(entity)
    table = DIALOGUE[language]
    turns, asked = [], set()
    for _ in range(rng.randint(1, 3)):
        attribute = rng.choice([a for a in world.profile(entity) if (entity, a) not in asked])
        asked.add((entity, attribute))
        value = world.lookup(entity, attribute)
        short = _capitalize(value) + ("." if language == "en" else "。")
        turns += [world.question(entity, attribute, rng),
                  world.statement(entity, attribute, rng) if rng.random() < 0.7 else short]
        if value in world and rng.random() < 0.6:
            entity = value
    turns[0] = rng.choice(table["greet"]) + turns[0]
    turns.append(rng.choice(table["close"]))
    return (" " if language == "en" else "").join(table["speakers"][i % 2] + t for i, t in enumerate(turns))


# ---------------------------------------------------------------- dirty lines for the cleaner

HTML_OUTER = [("<p>", "</p>"), ('<div class="post">', "</div>"), ("<span>", "</span>"), ("<li>", "</li>")]
HTML_INNER = [("<b>", "</b>"), ("<i>", "</i>"), ("<em>", "</em>"), ('<a href="https://example.com/page{n}">', "</a>")]
# \x00-\x1f except tab and the characters str.splitlines() treats as line breaks (\n \r \x0b \x0c \x1c \x1d \x1e)
CONTROL_CHARS = [chr(c) for c in range(32) if chr(c) not in "\t\n\r\x0b\x0c\x1c\x1d\x1e"]
GARBAGE_SYMBOLS = "#$%&*+=~^|@!?/\\_-{}[]();:'\",.`"


def _add_html(text: str, rng: random.Random) -> str:
    """Wrap the text, and one or two words (or a run of characters in Chinese), in tags; removing tags restores it."""
    words = text.split(" ") if " " in text else list(text)
    for _ in range(rng.randint(1, 2)):
        start = rng.randrange(len(words))
        end = min(len(words), start + rng.randint(1, 3)) - 1
        opening, closing = rng.choice(HTML_INNER)
        words[start] = opening.format(n=rng.randint(1, 999)) + words[start]
        words[end] = words[end] + closing
    opening, closing = rng.choice(HTML_OUTER)
    return opening + (" " if " " in text else "").join(words) + closing


def _add_control(text: str, rng: random.Random) -> str:
    """Insert 1-3 control characters at random positions; deleting them restores the text."""
    characters = list(text)
    for _ in range(rng.randint(1, 3)):
        characters.insert(rng.randint(0, len(characters)), rng.choice(CONTROL_CHARS))
    return "".join(characters)


def _garbage(rng: random.Random) -> str:
    """Symbol soup: at least three symbols for every letter or digit, a few spaces, no tags or control chars."""
    n_symbols = rng.randint(15, 80)
    characters = [rng.choice(GARBAGE_SYMBOLS) for _ in range(n_symbols)]
    characters += [rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(0, n_symbols // 3))]
    characters += [" "] * rng.randint(0, 4)
    rng.shuffle(characters)
    return "".join(characters).strip() or "#"


GENERATORS = {"encyclopedia": _encyclopedia_document, "story": _story_document,
              "dialogue": _dialogue_document, "arithmetic": _arithmetic_document}
CLEAN_WEIGHTS = {"encyclopedia": 0.35, "story": 0.25, "dialogue": 0.25, "arithmetic": 0.15}
DIRTY_KINDS = ("html", "control", "garbage", "duplicate")


@dataclass
class Corpus:
    documents: list[str]  # one line each, no newlines
    kinds: list[str]      # per document: a key of GENERATORS or one of DIRTY_KINDS
    sources: list[str]    # per document: the clean text it was made from ("" for garbage)

    def stats(self) -> dict[str, int]:
        """How many documents of each kind (zero included), e.g. {"html": 200, ..., "story": 4000}."""
        counts = Counter(self.kinds)
        return {kind: counts[kind] for kind in (*GENERATORS, *DIRTY_KINDS)}


def build_corpus(seed: int = 0, n_documents: int = 20000, dirty_fraction: float = 0.05,
                 world: World | None = None) -> Corpus:
    """The built-in pretraining corpus about World(seed) (or `world`); deterministic for a seed.

    round(n_documents * dirty_fraction) documents are dirty, split evenly over DIRTY_KINDS. Every non-duplicate
    document is distinct, and so is its clean source, so exact dedup removes exactly the "duplicate" kind.
    """
    if n_documents < 1:
        raise ValueError(f"build_corpus: n_documents must be >= 1, got {n_documents}")
    if not 0 <= dirty_fraction < 1:
        raise ValueError(f"build_corpus: dirty_fraction must be in [0, 1), got {dirty_fraction}")
    world = world if world is not None else World(seed)
    rng = random.Random(f"corpus:{seed}")
    n_dirty = min(round(n_documents * dirty_fraction), n_documents - 1)
    kinds = [DIRTY_KINDS[i % len(DIRTY_KINDS)] for i in range(n_dirty)]
    kinds += rng.choices(list(CLEAN_WEIGHTS), weights=list(CLEAN_WEIGHTS.values()), k=n_documents - n_dirty)
    rng.shuffle(kinds)
    first_clean = next(i for i, kind in enumerate(kinds) if kind in GENERATORS)
    kinds[0], kinds[first_clean] = kinds[first_clean], kinds[0]  # a duplicate needs an earlier clean document

    seen: set[str] = set()

    def fresh(make) -> str:
        for _ in range(100):
            text = make()
            if text not in seen:
                seen.add(text)
                return text
        raise RuntimeError("build_corpus: cannot make more distinct documents; use a bigger World or fewer documents")

    documents, sources, clean = [], [], []
    for kind in kinds:
        if kind == "garbage":
            text, source = fresh(lambda: _garbage(rng)), ""
        elif kind == "duplicate":
            text = source = rng.choice(clean)
        else:
            generator = GENERATORS[kind] if kind in GENERATORS else GENERATORS[rng.choice(list(GENERATORS))]
            source = fresh(lambda: generator(world, rng))
            if kind == "html":
                text = fresh(lambda: _add_html(source, rng))
            elif kind == "control":
                text = fresh(lambda: _add_control(source, rng))
            else:
                text = source
                clean.append(text)
        documents.append(text)
        sources.append(source)
    return Corpus(documents, kinds, sources)


def generate_corpus(seed: int = 0, n_documents: int = 20000, dirty_fraction: float = 0.05,
                    world: World | None = None) -> list[str]:
    """Just the documents of build_corpus (one line of text each)."""
    return build_corpus(seed, n_documents, dirty_fraction, world).documents
