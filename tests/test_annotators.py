"""The gold annotator's rules on hand-written replies, the labelers' noise and length bias, preference records,
and feedback collection from a (tiny) checkpoint."""
import json
import random

import pytest
import torch

from nanollm.annotators import (WEIGHTS, GoldAnnotator, Judgement, Labeler, annotate, bias_statistics,
                                collect_feedback, feedback_prompts, labeler_team, main, preference_records,
                                ranking_string, sample_responses)
from nanollm.checkpoint import save_checkpoint
from nanollm.distributed import Runtime
from nanollm.model import GPT, GPTConfig
from nanollm.reward import parse_record
from nanollm.sft import generate_replies
from nanollm.tokenizer import Tokenizer, train_tokenizer
from nanollm.world import World, question_split


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def gold(world):
    return GoldAnnotator(world)


@pytest.fixture(scope="module")
def person(world):
    """An English-speaking person and a job that is not theirs."""
    name = world.entities("person", "en")[0]
    job = world.lookup(name, "job")
    other_job = next(j for j in ("doctor", "teacher", "baker") if j != job)
    return name, job, other_job


def overall(accuracy, relevance, naturalness, conciseness):
    return round(WEIGHTS["accuracy"] * accuracy + WEIGHTS["relevance"] * relevance
                 + WEIGHTS["naturalness"] * naturalness + WEIGHTS["conciseness"] * conciseness, 4)


# ----------------------------------------------------------------------------- the gold annotator's rules
def test_gold_scores_hand_written_replies_by_its_rules(gold, person):
    name, job, other_job = person
    question = f"What is the job of {name}?"
    article = "an" if job[0] in "aeiou" else "a"
    sentence = f"{name} works as {article} {job}."  # the canonical answer (the reference)
    cases = {  # reply -> (accuracy, relevance, naturalness, conciseness), worked out from the docstrings' rules
        sentence: (5, 5, 5, 5),
        job: (5, 5, 4, 5),  # the bare value: no sentence-final punctuation
        f"{name} works as a {other_job}.": (1, 5, 5, 5),  # a wrong job
        f"{name} works as {article} {job} or a {other_job}.": (3, 5, 5, 5),  # hedging: right and wrong
        "I like the weather today. It is nice.": (2, 1, 5, 5),  # no job, no sentence about the person
        f"{name} works as {article} {job}. I like the weather.": (5, 4, 5, 4),  # half on topic; 10 / 6 words
        " ".join([sentence] * 3): (5, 5, 4, 3),  # repeated 3-grams; 3x the reference length
        " ".join([sentence] * 5): (5, 5, 4, 1),  # 5x the reference length
        f"{name} works as {article} {job}. 很好": (5, 4, 3, 5),  # Chinese in an English reply; no final punctuation
        f"<|user|> {job}.": (5, 5, 4, 5),  # leaked markup
    }
    for reply, dimensions in cases.items():
        judgement = gold.judge(question, reply)
        assert (judgement.accuracy, judgement.relevance, judgement.naturalness, judgement.conciseness) == dimensions, \
            reply
        assert judgement.overall == pytest.approx(overall(*dimensions)), reply
    assert gold.judge(question, "   ") == Judgement(1, 1, 1, 1, 1.0)
    assert gold.judge(question, sentence).overall == 5.0


def test_the_asked_entity_is_never_counted_as_a_wrong_value(gold, world):
    """A 'best friend' question names a person and is answered by a person: only the answer counts."""
    for language in ("en", "zh"):
        name = world.entities("person", language)[1]
        question = world.question(name, "friend")
        assert gold.judge(question, world.statement(name, "friend")).accuracy == 5
        assert gold.judge(question, world.statement(name, "friend") + name).accuracy == 5


def test_chinese_and_arithmetic_questions(gold, world):
    name = world.entities("person", "zh")[0]
    age = world.lookup(name, "age")
    question = world.question(name, "age")
    assert gold.judge(question, f"{name}今年{age}岁。") == Judgement(5, 5, 5, 5, 5.0)
    assert gold.judge(question, f"{name}今年{int(age) + 1}岁。").accuracy == 1
    assert gold.judge(question, f"{name} is {age} years old.").naturalness == 4  # English letters in a Chinese reply
    assert gold.judge("What is 5 times 1?", "5 times 1 is 5.") == Judgement(5, 5, 5, 5, 5.0)  # the echo is no claim
    assert gold.judge("What is 5 times 1?", "It is 5.").accuracy == 5
    assert gold.judge("What is 5 times 1?", "5 times 1 is 6.").accuracy == 1
    assert gold.judge("What is 5 times 1?", "Five.").accuracy == 2
    assert gold.judge("12减5等于多少？", "12减5等于7。") == Judgement(5, 5, 5, 5, 5.0)
    with pytest.raises(ValueError, match="only knows the world's questions"):
        gold.judge("What is the meaning of life?", "42.")


def test_ranking_string_puts_the_best_first_and_joins_ties():
    assert ranking_string([3.1, 4.0, 3.1, 2.0]) == "2 > 1 = 3 > 4"
    assert ranking_string([1.0, 2.0, 3.0]) == "3 > 2 > 1"


# ----------------------------------------------------------------------------- the labelers
def test_a_labeler_without_noise_or_bias_gives_the_gold_score_and_clips_to_the_scale():
    rng = random.Random(0)
    honest = Labeler("honest", noise=0.0, length_bias=0.0)
    assert honest.rate(Judgement(5, 5, 4, 5, 4.85), "one two three", rng) == pytest.approx(4.8, abs=0.051)
    biased = Labeler("biased", noise=0.0, length_bias=0.5)
    assert biased.rate(Judgement(3, 3, 3, 3, 3.0), " ".join(["word"] * 20), rng) == 4.0  # 3 + 0.5 · 20 / 10
    assert biased.rate(Judgement(5, 5, 5, 5, 5.0), " ".join(["word"] * 20), rng) == 5.0  # clipped
    team = labeler_team(3, noise=0.4, length_bias=0.3)
    assert [labeler.noise for labeler in team] == pytest.approx([0.2, 0.4, 0.6])


@pytest.mark.parametrize("length_bias, low, high", [(0.3, 0.65, 1.0), (0.0, 0.45, 0.55), (-0.3, 0.0, 0.35)])
def test_length_bias_shifts_preferences_in_its_direction(length_bias, low, high):
    """Two replies the gold annotator rates equal, 3 and 13 words: how often the longer one is rated higher."""
    labeler, rng = Labeler("l", noise=0.4, length_bias=length_bias), random.Random(0)
    judgement = Judgement(4, 4, 4, 4, 4.0)
    short, long = "a b c", " ".join(["word"] * 13)
    wins = ties = 0
    for _ in range(2000):
        short_rating, long_rating = labeler.rate(judgement, short, rng), labeler.rate(judgement, long, rng)
        wins += long_rating > short_rating
        ties += long_rating == short_rating
    assert low <= (wins + ties / 2) / 2000 <= high


def synthetic_replies(world, questions):
    """Replies of every quality and length, without a model: right, wrong, bare, rambling, off-topic."""
    gold, replies = GoldAnnotator(world), []
    for question in questions:
        parsed = gold.question(question)
        wrong = str(int(parsed.answer) + 1) if not parsed.candidates else \
            next(v for v in parsed.candidates if v != parsed.answer)
        replies.append([parsed.reference, parsed.answer, parsed.reference.replace(parsed.answer, wrong),
                        " ".join([parsed.reference] * 3), "I like the weather today. It is nice and warm outside."])
    return replies


@pytest.mark.parametrize("length_bias", [0.3, 0.0])
def test_the_bias_shows_in_the_data_statistics_only_when_switched_on(world, length_bias):
    questions = feedback_prompts(world, 150, seed=0)
    out = annotate(questions, synthetic_replies(world, questions), GoldAnnotator(world),
                   labeler_team(3, noise=0.4, length_bias=length_bias), heldout_fraction=0.2)
    stats = bias_statistics(out["gold"])
    if length_bias > 0:
        assert stats["rating_excess_length_corr"] > 0.3
    else:
        assert abs(stats["rating_excess_length_corr"]) < 0.1
    assert 0.7 < stats["labeler_gold_agreement"] < 1.0  # noisy, yet mostly right
    assert len(out["heldout"]) == 30 and len(out["train"]) == 120  # split by prompt
    record = out["gold"][0]
    assert {"prompt", "split", "labeler", "gold_ranking", "labeler_ranking", "replies"} <= set(record)
    assert {"response", "rating", "accuracy", "relevance", "naturalness", "conciseness", "overall"} <= \
        set(record["replies"][0])


def test_noise_free_unbiased_labelers_agree_with_gold(world):
    questions = feedback_prompts(world, 40, seed=1)
    out = annotate(questions, synthetic_replies(world, questions), GoldAnnotator(world),
                   labeler_team(1, noise=0.0, length_bias=0.0))
    assert bias_statistics(out["gold"])["labeler_gold_agreement"] >= 0.97  # only rounding to one decimal can tie


# ----------------------------------------------------------------------------- preference records
def test_preference_records_in_every_format_make_no_pair_from_a_tie():
    replies, ratings = ["a", "b", "c"], [3.0, 4.0, 3.0]
    (scores,) = preference_records("Q?", replies, ratings, "scores")
    assert scores == {"input": "Q?", "outputs": [{"response": "a", "score": 3.0}, {"response": "b", "score": 4.0},
                                                 {"response": "c", "score": 3.0}]}
    pairs = preference_records("Q?", replies, ratings, "pairwise")
    assert pairs == [{"prompt": "Q?", "chosen": "b", "rejected": "a"}, {"prompt": "Q?", "chosen": "b", "rejected": "c"}]
    (ranked,) = preference_records("Q?", replies, ratings, "ranked")
    assert ranked == {"prompt": "Q?", "ranking": ["b", ["a", "c"]]}
    for record in (scores, ranked):  # the reward model's reader finds the same two pairs and one tie
        group = parse_record(record, "x:1")
        assert sorted((group.responses[i], group.responses[j]) for i, j in group.pairs) == [("b", "a"), ("b", "c")]
        assert group.ties == 1
    with pytest.raises(ValueError, match="data_format"):
        preference_records("Q?", replies, ratings, "csv")


# ----------------------------------------------------------------------------- collection
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, world):
    """An out_dir with a tiny random GPT and a small tokenizer (English and Chinese world questions)."""
    folder = tmp_path_factory.mktemp("ckpt")
    texts = [f"{p.question} {p.answer}" for p in world.qa_pairs(0)]
    tokenizer = Tokenizer(train_tokenizer(texts, str(folder / "tokenizer"), vocab_size=600))
    torch.manual_seed(0)
    args = dict(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    model = GPT(GPTConfig(**args))
    save_checkpoint(str(folder / "ckpt.pt"), Runtime("cpu", "cpu"), model, None, None, 7, 0.0, {}, args)
    return folder, tokenizer, model


def test_sampling_at_temperature_zero_equals_greedy_replies_and_is_seeded(tiny_checkpoint, world):
    folder, tokenizer, model = tiny_checkpoint
    questions = feedback_prompts(world, 5, seed=0)
    greedy = sample_responses(model, tokenizer, questions, k=2, temperatures=(0.0,), max_new_tokens=6, batch_size=4)
    reference = generate_replies(model, tokenizer, [[{"role": "user", "content": q}] for q in questions], 6)
    assert greedy == [[reply, reply] for reply in reference]
    first = sample_responses(model, tokenizer, questions, k=3, temperatures=(1.0,), max_new_tokens=6, seed=3)
    again = sample_responses(model, tokenizer, questions, k=3, temperatures=(1.0,), max_new_tokens=6, seed=3)
    assert first == again and len(first) == 5 and all(len(group) == 3 for group in first)
    assert len({reply for group in first for reply in group}) > 5  # pure sampling from a random model varies


def test_collect_feedback_writes_labels_gold_and_meta(tiny_checkpoint, tmp_path, capsys):
    folder, _, _ = tiny_checkpoint
    meta = collect_feedback(str(folder), str(tmp_path / "rm"), n_prompts=10, k=3, max_new_tokens=6,
                            heldout_fraction=0.2)
    lines = {name: (tmp_path / "rm" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
             for name in ("train", "heldout", "gold")}
    assert (len(lines["train"]), len(lines["heldout"]), len(lines["gold"])) == (8, 2, 10)
    record = json.loads(lines["train"][0])
    assert set(record) == {"input", "outputs"} and len(record["outputs"]) == 3
    assert meta["checkpoint_iter"] == 7 and meta["k"] == 3 and 0.0 <= meta["labeler_gold_agreement"] <= 1.0
    assert json.loads((tmp_path / "rm" / "meta.json").read_text()) == meta
    main(["judge", "What is 5 times 1?", "5 times 1 is 5."])
    assert "accuracy=5" in capsys.readouterr().out


# ----------------------------------------------------------------------------- prompt sets
def test_prompt_splits_are_disjoint_and_fixed_whatever_the_seed(world):
    test_questions = {}  # split -> every question of it, over several seeds (wordings differ between seeds)
    for seed in (0, 42, 1337):
        for split in ("train", "validation", "test"):
            questions = feedback_prompts(world, 160, seed, split)
            assert len(set(questions)) == 160
            test_questions.setdefault(split, set()).update(questions)
    assert not test_questions["train"] & test_questions["validation"]
    assert not test_questions["train"] & test_questions["test"]
    assert not test_questions["validation"] & test_questions["test"]
    # what a question asks decides its split, not its wording: one fact asked with each seed's wording
    pairs = {seed: {(p.entity, p.attribute): p for p in world.qa_pairs(seed) if p.entity} for seed in (0, 42)}
    assert all(question_split(pairs[0][key]) == question_split(pairs[42][key]) for key in pairs[0])
    assert {question_split(p) for p in pairs[0].values()} == {"train", "validation", "test"}
    with pytest.raises(ValueError, match="split='dev'"):
        feedback_prompts(world, 5, 0, "dev")


def test_collected_feedback_trains_on_train_questions_and_holds_out_validation_ones(tiny_checkpoint, tmp_path):
    folder, _, _ = tiny_checkpoint
    collect_feedback(str(folder), str(tmp_path / "rm"), n_prompts=10, k=2, max_new_tokens=4, heldout_fraction=0.3,
                     seed=42)
    world = World(0)
    split_of = {p.question: question_split(p) for p in world.qa_pairs(42)}
    for name, split in (("train", "train"), ("heldout", "validation")):
        prompts = [json.loads(line)["input"] for line in (tmp_path / "rm" / f"{name}.jsonl").read_text().splitlines()]
        assert len(prompts) == (7 if name == "train" else 3) and {split_of[p] for p in prompts} == {split}


def test_a_question_longer_than_the_model_context_is_one_line_before_any_sampling(tiny_checkpoint, world):
    from nanollm.configurator import UserError

    _, tokenizer, model = tiny_checkpoint
    long_question = " ".join(feedback_prompts(world, 20, seed=0))  # far beyond block_size=64 tokens
    with pytest.raises(UserError, match=r"a question of \d+ tokens leaves no room for a reply within the model's "
                                        r"block_size=64"):
        sample_responses(model, tokenizer, [feedback_prompts(world, 1, seed=0)[0], long_question], k=2)
