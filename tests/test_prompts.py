"""Prompts from a user's file for the policy-optimization stages: the reader (nanollm/sft.py read_prompts) with its
file:line errors, the split by prompt (nanollm/annotators.py split_prompts), and train_ppo.py --prompts run end to end
on a Chinese prompt file with a reward model trained by train_rm.py on a Chinese preference file."""
import dataclasses
import json
import os

import pytest
import torch

from nanollm.annotators import ppo_prompts, split_prompts
from nanollm.configurator import UserError
from nanollm.model import GPT, GPTConfig
from nanollm.sft import read_prompts
from nanollm.tokenizer import train_tokenizer
from nanollm.world import World
from script_runner import run_script
from test_train_ppo import write_checkpoint

SEED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "seed_examples")
CHAT = [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "你好"}]


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_prompts_takes_text_messages_and_json_lists(tmp_path):
    jsonl = write(tmp_path / "p.jsonl", ['{"prompt": "火星与地球相比有何不同?"}', "",
                                         json.dumps({"messages": CHAT}, ensure_ascii=False),
                                         json.dumps({"prompt": CHAT[1:]}, ensure_ascii=False)])
    assert read_prompts(jsonl) == ["火星与地球相比有何不同?", CHAT, CHAT[1:]]
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps([{"prompt": "a?"}, {"messages": CHAT}], ensure_ascii=False), encoding="utf-8")
    assert read_prompts(listed) == ["a?", CHAT]
    assert read_prompts(os.path.join(SEED, "prompts.jsonl")) == [
        "火星与地球相比有何不同?", "我觉得这次旅行很糟糕,遇到的每件事都令人失望。", "我在寻找一款轻便耐用的旅行背包,有推荐吗?"]


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a"}', '{"prompt": "b"', '{"prompt": "c"}'], ":2: malformed JSON"),
    (['{"prompt": "a"}', '{"question": "b"}'], ":2: expected {\"prompt\""),
    (['{"prompt": ""}'], ":1: expected {\"prompt\""),
    (['{"prompt": "a"}', '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}'],
     ":2: the last message must be the user's"),
    (['{"prompt": "a"}', '', '{"messages": [{"role": "robot", "content": "x"}]}'], ":3: messages[0]: role 'robot'"),
    ([''], "holds no prompts"),
])
def test_bad_prompt_files_name_the_file_and_line(tmp_path, lines, message):
    path = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(UserError) as error:
        read_prompts(path)
    assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_split_by_prompt_holds_out_the_last_distinct_prompts_and_never_both_sides():
    prompts = ["a", "b", [{"role": "user", "content": "b"}], "c", "d", "a", "e"]  # "b" twice (text and messages)
    held_out, train = split_prompts(prompts, 0.4)
    assert held_out == ["d", "e"] and train == ["a", [{"role": "user", "content": "b"}], "c"]  # round(5 * 0.4) = 2
    assert split_prompts(prompts, 0.01)[0] == ["e"]  # at least one
    with pytest.raises(UserError, match="prompts_heldout_fraction=0.5: 1 distinct"):
        split_prompts(["a", "a"], 0.5)


def test_the_gold_judge_only_for_world_questions(tmp_path):
    world_questions = [pair.question for pair in World(0).qa_pairs(0)][:4]
    known = write(tmp_path / "world.jsonl", [json.dumps({"prompt": q}) for q in world_questions])
    held_out, train, judge = ppo_prompts(str(known), 0.25, 0, 1337, 1, 1, 1)
    assert judge is not None and held_out == {"eval_": world_questions[3:]} and train == world_questions[:3]
    mixed = write(tmp_path / "mixed.jsonl", [json.dumps({"prompt": q}) for q in world_questions + ["写一首诗。"]])
    assert ppo_prompts(str(mixed), 0.2, 0, 1337, 1, 1, 1)[2] is None
    with pytest.raises(UserError, match="3 training prompts .* fewer than the 4"):
        ppo_prompts(str(known), 0.25, 0, 1337, 1, 1, 1, per_iteration=4)


PROMPTS = ["火星与地球相比有何不同?", "我在寻找一款轻便耐用的旅行背包,有推荐吗?", "请写一封申请信用卡的邮件",
           "解释一下什么是机器学习。", "今天有什么优惠活动?", "你们的退款政策是什么?", "如何重置我的密码?",
           "给出3个关于如何提高生产力的建议。"]  # the last 2 are held out (prompts_heldout_fraction=0.25)


@pytest.mark.slow
def test_train_ppo_on_a_chinese_prompt_file_with_a_reward_model_of_the_users_own(tmp_path):
    """train_rm.py --dataset=<the user's preference file> -> train_ppo.py --prompts=<a Chinese prompt file>: it runs,
    reports the reward model's score (per language too) and no gold score, and says the gold judge is not available;
    a bad prompt file stops it before any work with one line naming file:line, and writes nothing."""
    seed_texts = [line for name in ("sft.jsonl", "reward_scores.jsonl") for line in
                  open(os.path.join(SEED, name), encoding="utf-8")]
    texts = [f"{p.question} {p.answer}" for p in World(0).qa_pairs(0)][:400] + seed_texts + PROMPTS
    tokenizer_path = train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=1000)
    model_args = dataclasses.asdict(GPTConfig(vocab_size=1000, block_size=96, n_layer=1, n_head=2, n_embd=32))
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "sft", GPT(GPTConfig(**model_args)), model_args, tokenizer_path, stage="sft",
                     config={"init_from": "out"})
    replies = ["好的,这是一个清楚的回答。", "不知道。", "嗯"]
    preferences = write(tmp_path / "prefs.jsonl", [json.dumps(
        {"input": prompt, "outputs": [{"response": r, "score": s} for r, s in zip(replies, (5, 2, 1))]},
        ensure_ascii=False) for prompt in PROMPTS[:6]])  # the reward model trains on PPO's training prompts only
    run_script("train_rm.py", [f"--init_from={tmp_path / 'sft'}", f"--dataset={preferences}", "--val_fraction=0.2",
                               f"--out_dir={tmp_path / 'rm'}", "--max_iters=2", "--eval_interval=2",
                               "--batch_size=2", "--warmup_iters=1", "--dtype=float32", "--device=cpu"])
    prompts = write(tmp_path / "prompts.jsonl", [json.dumps({"prompt": p}, ensure_ascii=False) for p in PROMPTS])
    common = [f"--init_from={tmp_path / 'sft'}", f"--reward_model={tmp_path / 'rm'}", "--batch_size=4",
              "--minibatch_size=2", "--max_new_tokens=6", "--eval_samples=2", "--eval_batch_size=4", "--max_iters=1",
              "--eval_interval=1", "--prompts_heldout_fraction=0.25", "--dtype=float32", "--device=cpu"]
    result = run_script("train_ppo.py", common + [f"--prompts={prompts}", f"--out_dir={tmp_path / 'ppo'}"])
    assert "gold judge: not available for user prompts" in result.stdout
    assert "| eval_score |" in result.stdout and "| eval_score_zh |" in result.stdout and "gold" not in \
        result.stdout.split("gold judge")[1]
    records = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl", encoding="utf-8")]
    evals = [r for r in records if r.get("phase") == "eval"]
    assert [r["iter"] for r in evals] == [0, 1] and evals[0]["eval_kl"] == 0.0
    assert evals[0]["eval_score_zh"] == evals[0]["eval_score"] and not any("gold" in key for r in records for key in r)

    bad = write(tmp_path / "bad.jsonl", [json.dumps({"prompt": PROMPTS[0]}, ensure_ascii=False), '{"prompt": 3}'])
    failed = run_script("train_ppo.py", common + [f"--prompts={bad}", f"--out_dir={tmp_path / 'never'}"], check=False)
    assert failed.returncode != 0 and f"{bad}:2: expected" in failed.stderr and "Traceback" not in failed.stderr
    assert not os.path.exists(tmp_path / "never")
