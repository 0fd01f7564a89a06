"""The design document's Chinese examples (tests/data/seed_examples/) through every stage's reader, and the
per-language (zh / en) columns of the SFT evaluation, the reward model's held-out scores and the report."""
import os

import pytest

from nanollm.reward import HeldOutScores, load_groups, parse_record
from conftest import require
from nanollm.report import plot_ppo, ppo_section, rm_section
from nanollm.sft import Conversation, load_conversations, read_prompts, score_replies

SEED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "seed_examples")


def seed(name):
    return os.path.join(SEED, name)


def test_every_seed_file_passes_through_its_stages_reader():
    conversations = load_conversations(seed("sft.jsonl"))  # train_sft.py --dataset=
    assert len(conversations) == 12 and {c.format for c in conversations} == {
        "question_answer", "chat", "classification", "prompt_completion", "instruction", "knowledge"}
    scores = load_groups(seed("reward_scores.jsonl"))  # train_rm.py --dataset=
    feedback = load_groups(seed("feedback_dimensions.json"))  # the same reader: outputs as texts + dimensions
    assert [g.prompt[0]["content"] for g in scores] == [g.prompt[0]["content"] for g in feedback] == \
        read_prompts(seed("prompts.jsonl"))  # train_ppo.py --prompts=
    assert scores[0].preference == [5.0, 3.0, 4.0] and scores[0].pairs == [(0, 1), (0, 2), (2, 1)]
    # 火星: 准确性 [5, 3, 4] and 相关性 [5, 2, 4] -> means [5, 2.5, 4]; ranking 1 > 3 > 2 gives the pairs
    assert feedback[0].preference == [5.0, 2.5, 4.0] and feedback[0].pairs == [(0, 2), (0, 1), (2, 1)]


def test_feedback_records_with_a_bad_ranking_or_scores_name_the_record():
    record = {"input": "问?", "outputs": ["甲", "乙"], "scores": {"准确性": [5, 1]}, "ranking": [1, 1]}
    with pytest.raises(ValueError, match="f.json:3: field 'ranking' must list the output numbers 1..2"):
        parse_record(record, "f.json:3")
    with pytest.raises(ValueError, match=r"f.json:3: scores\['准确性'\] must list 2 scores"):
        parse_record(dict(record, scores={"准确性": [5]}, ranking=[1, 2]), "f.json:3")


def chat(user, assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def test_sft_scores_per_language_of_the_prompt():
    conversations = [Conversation(chat("这个产品很好", "正面"), "classification", "1"),
                     Conversation(chat("Classify: bad", "负面"), "classification", "2"),  # an English prompt
                     Conversation(chat("How old is Tom?", "Tom is 34."), "question_answer", "3"),
                     Conversation(chat("汤姆几岁?", "汤姆三十四岁。"), "question_answer", "4")]
    scores = score_replies(conversations, ["正面", "正面", "tom is 34", "汤姆三十岁。"])
    assert scores["accuracy_zh"] == 1.0 and scores["accuracy_en"] == 0.0
    # one token per Chinese character: 5 of the 6 reference tokens said, none extra: P = 1, R = 5/6, F1 = 10/11
    assert scores["token_f1_en"] == 1.0 and scores["token_f1_zh"] == pytest.approx(10 / 11)


def test_reward_model_pair_accuracy_per_language(monkeypatch):
    import nanollm.reward as reward

    monkeypatch.setattr(reward, "encode_content", lambda tokenizer, text: list(text))  # lengths: no tokenizer needed
    groups = [parse_record({"input": "火星?", "outputs": [{"response": "a", "score": 3}, {"response": "b", "score": 1},
                                                          {"response": "c", "score": 2}]}),
              parse_record({"prompt": "Mars?", "chosen": "x", "rejected": "y"})]
    held_out = HeldOutScores(groups, tokenizer=None)
    scores = held_out([[0.5, 0.1, 0.9], [0.0, 1.0]], "ranking")
    # zh: pairs a>b right, a>c wrong, c>b right: 2/3; en: chosen scored below rejected: 0
    assert scores["val_pair_acc_zh"] == pytest.approx(2 / 3) and scores["val_pair_acc_en"] == 0.0
    assert scores["val_pair_acc"] == pytest.approx(2 / 4)
    text = rm_section([{"iter": 0, **scores}])
    assert "| ... on Chinese prompts | 66.7%" in text and "| ... on English prompts | 0.0%" in text


def test_the_ppo_report_has_language_rows_only_for_the_languages_run_and_no_gold_without_a_judge(tmp_path):
    evals = [{"iter": i, "phase": "eval", "eval_score": s, "eval_score_zh": s, "eval_kl": 0.1 * i,
              "eval_response_length": 5.0, "eval_eos_rate": 1.0} for i, s in ((0, 0.25), (2, 0.5))]
    training = [{"iter": i, "score": 0.1, "kl": 0.0} for i in (0, 1)]  # no gold either
    text = ppo_section([("PPO", evals + training, "out-ppo", False)])
    assert "reward-model score, Chinese prompts | +0.250 | +0.500" in text and "English prompts" not in text
    assert "no gold judge" in text
    require("matplotlib")
    assert plot_ppo([("PPO", evals + training)], str(tmp_path / "curves.png")) and (tmp_path / "curves.png").exists()
