"""GRPO and RLOO pieces: group advantages and leave-one-out baselines on hand-worked groups, the arithmetic check on
hand-written replies, the k3 KL in the loss, ratio = 1 before any update, a tiny run that learns a reward, and
train_grpo.py run as a user runs it with each kind of reward."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from nanollm.grpo import (arithmetic_prompt_sets, arithmetic_question, arithmetic_reward, group_advantages,
                          grpo_losses, make_group_experience, token_advantages)
from nanollm.loader import load_model
from nanollm.ppo import epochs_of_minibatches, reserved_ids_except_eos, rollout, score_rollout, select
from nanollm.world import World, question_split
from script_runner import run_script
from test_ppo import EOS, PAD, PROMPTS, tiny_gpt
from test_train_ppo import checkpoints  # noqa: F401 (a tiny SFT checkpoint and reward model, as pytest fixture)


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_are_centred_and_scaled_by_the_group_std():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 1.0, 0.0])  # two groups of 3
    # group 1: mean 3, deviations (−2, −1, 3), std = √((4 + 1 + 9) / 2) = √7 = 2.6457513
    # group 2: mean 1/3, deviations (−1/3, 2/3, −1/3), std = √((1/9 + 4/9 + 1/9) / 2) = √(1/3) = 0.5773503
    expected = [-2 / (7 ** 0.5 + 1e-4), -1 / (7 ** 0.5 + 1e-4), 3 / (7 ** 0.5 + 1e-4),
                -1 / 3 / (0.5773503 + 1e-4), 2 / 3 / (0.5773503 + 1e-4), -1 / 3 / (0.5773503 + 1e-4)]
    assert group_advantages(rewards, 3, "group").tolist() == pytest.approx(expected, abs=1e-5)
    assert group_advantages(rewards, 3, "group")[:3].tolist() == pytest.approx([-0.75593, -0.37796, 1.13389], abs=1e-4)


def test_a_group_with_equal_rewards_gets_zero_advantage_not_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # groups of 4
    for baseline in ("group", "leave_one_out"):
        advantages = group_advantages(rewards, 4, baseline)
        assert torch.isfinite(advantages).all()
        assert advantages[:8].tolist() == [0.0] * 8  # all right, all wrong: no signal
    # one right of four: mean 1/4, std √((9/16 + 3/16) / 3) = 1/2 -> (3/4) / (1/2) = 1.5 and (−1/4) / (1/2) = −0.5
    assert group_advantages(rewards, 4, "group")[8:].tolist() == pytest.approx([-0.5, 1.5, -0.5, -0.5], abs=1e-3)


def test_rloo_baseline_is_the_mean_of_the_other_responses():
    rewards = torch.tensor([1.0, 2.0, 6.0, 4.0, 0.0, 2.0])  # two groups of 3
    # 1 − (2 + 6)/2 = −3;  2 − (1 + 6)/2 = −1.5;  6 − (1 + 2)/2 = 4.5;  4 − 1 = 3;  0 − 3 = −3;  2 − 2 = 0
    assert group_advantages(rewards, 3, "leave_one_out").tolist() == pytest.approx([-3, -1.5, 4.5, 3, -3, 0])
    # = G/(G−1)·(r − group mean): an unbiased baseline, the GRPO centring scaled by 3/2
    groups = rewards.view(2, 3)
    assert group_advantages(rewards, 3, "leave_one_out").tolist() == pytest.approx(
        (1.5 * (groups - groups.mean(-1, keepdim=True))).view(-1).tolist())


def test_each_response_token_carries_its_response_advantage_and_padding_none():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert token_advantages(torch.tensor([0.5, -2.0]), mask).tolist() == [[0.5, 0.5, 0.5, 0.0], [-2.0, 0, 0, 0]]


# ----------------------------------------------------------------------------- the verifiable reward
@pytest.mark.parametrize("reply, right", [
    ("12", 1.0), ("12.", 1.0), ("It is 12.", 1.0), ("7 plus 5 is 12.", 1.0), ("5 plus 7 is 12.", 1.0),  # echo allowed
    ("13", 0.0), ("7 plus 5 is 13.", 0.0),  # wrong
    ("It is twelve.", 0.0), ("", 0.0), ("I do not know.", 0.0),  # no number (words are not read)
    ("It is 12 or 13.", 0.0), ("12, not 13.", 0.0), ("7 plus 5 is 12. 7", 0.0), ("12 12 13", 0.0),  # extra numbers
    ("12 12", 1.0), ("The answer: 7 plus 5 = 12", 1.0)])
def test_arithmetic_reward_on_hand_written_replies(reply, right):
    assert arithmetic_reward("What is 7 plus 5?", reply) == right


def test_arithmetic_reward_reads_every_operation_and_chinese():
    assert arithmetic_reward("What is 9 minus 4?", "9 minus 4 is 5.") == 1.0
    assert arithmetic_reward("What is 9 minus 4?", "9 minus 4 is 13.") == 0.0
    assert arithmetic_reward("What is 3 times 4?", "3 times 4 is 12.") == 1.0
    assert arithmetic_reward("7加5等于多少？", "7加5等于12。") == 1.0
    assert arithmetic_reward("3乘以4等于多少？", "3乘以4等于7。") == 0.0
    assert arithmetic_question("What is 3 times 0?") == (3, 0, 0)
    with pytest.raises(ValueError, match="not one of the world's arithmetic"):
        arithmetic_reward("How old is Videl Guvar?", "40")


def test_arithmetic_prompt_sets_are_disjoint_arithmetic_questions():
    held_out, train = arithmetic_prompt_sets(World(0), 1337, 50, 40, 200)
    sets = {"test": held_out["eval_"], "validation": held_out["val_"], "train": train}
    assert [len(questions) for questions in sets.values()] == [50, 40, 200]
    assert all(arithmetic_question(q) is not None for questions in sets.values() for q in questions)
    what = {split: {arithmetic_question(q) for q in questions} for split, questions in sets.items()}  # (a, b, answer)
    assert not what["test"] & what["train"] and not what["validation"] & what["train"]
    pairs = {p.question: p for p in World(0).qa_pairs(1337, n_arithmetic=4000)}
    assert all(question_split(pairs[q]) == split for split, questions in sets.items() for q in questions)
    held_out, train = arithmetic_prompt_sets(World(0), 1337, 20, 20, 100, ("times",))
    assert all(pairs[q].attribute == "times" for q in held_out["eval_"] + held_out["val_"] + train)


# ----------------------------------------------------------------------------- the loss
def group_experience(policy, reference, rewards, group_size=2, seed=0):
    generated = rollout(policy, [p for p in PROMPTS for _ in range(group_size)], 6, 1.0, EOS, PAD,
                        torch.Generator().manual_seed(seed))
    scored = score_rollout(policy, reference, None, generated, 1.0)
    return generated, make_group_experience(generated, scored, rewards, group_size, "group")


def test_first_minibatch_of_first_epoch_has_ratio_one_no_clipping_and_no_kl():
    policy, reference = tiny_gpt(3), tiny_gpt(3)
    generated, experience = group_experience(policy, reference, torch.tensor([1.0, 0.0, 0.0, 2.0, 1.0, 1.0]))
    rows = next(epochs_of_minibatches(6, 4, 2, seed=0))
    batch, part = select(experience, rows, generated.prompt_length)
    policy.train()
    loss, stats = grpo_losses(policy, batch, part, 1.0, clip_range=0.2, kl_coef=0.5)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["clip_frac"] == 0.0 and abs(stats["approx_kl"]) < 1e-6 and abs(stats["kl_loss"]) < 1e-6


def test_the_k3_kl_term_of_the_loss_against_a_plain_computation():
    """Zero advantages: the loss is β · mean over valid tokens of k3 = (π_ref/π − 1) − log(π_ref/π), computed here
    from the two models' logits directly; its gradient pulls the policy back to the reference."""
    policy, reference = tiny_gpt(4), tiny_gpt(5)  # a policy that differs from its reference
    generated, experience = group_experience(policy, reference, torch.ones(6))  # equal rewards: advantages 0
    assert experience["advantages"].abs().max() == 0
    batch, part = select(experience, torch.arange(6), generated.prompt_length)
    loss, stats = grpo_losses(policy, batch, part, 1.0, clip_range=0.2, kl_coef=0.3)
    with torch.no_grad():
        def logprobs_of(model):
            logits = model(generated.input_ids, attention_mask=generated.attention_mask)[0]
            logits = logits[:, generated.prompt_length - 1:-1].float()
            logits[..., list(reserved_ids_except_eos(EOS))] = float("-inf")  # what the sampler banned
            return F.log_softmax(logits, -1).gather(-1, generated.responses[..., None])[..., 0]
        log_ratio = logprobs_of(reference) - logprobs_of(policy)
        k3 = log_ratio.exp() - 1 - log_ratio
        mask = generated.response_mask.bool()
        expected = k3[mask].mean().item()
    assert expected > 0.01
    assert stats["kl_loss"] == pytest.approx(expected, rel=1e-4) and loss.item() == pytest.approx(0.3 * expected,
                                                                                                   rel=1e-4)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    loss.backward()
    optimizer.step()
    _, after = grpo_losses(policy, batch, part, 1.0, clip_range=0.2, kl_coef=0.3)
    assert after["kl_loss"] < stats["kl_loss"]


def test_a_short_grpo_run_raises_a_hand_written_reward():
    """reward = the share of a target token in the response; groups of 4 per prompt, no critic."""
    target = 9
    policy, reference = tiny_gpt(8, vocab_size=16, n_layer=1), tiny_gpt(8, vocab_size=16, n_layer=1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    prompts = [[2, 4 + i % 5, 5] for i in range(4) for _ in range(4)]  # 4 prompts x G = 4
    shares = []
    for iteration in range(12):
        generated = rollout(policy, prompts, 6, 1.0, None, PAD, torch.Generator().manual_seed(iteration))
        share = (generated.responses == target).float().mean(-1)  # (B,) the reward
        shares.append(share.mean().item())
        scored = score_rollout(policy, reference, None, generated, 1.0)
        experience = make_group_experience(generated, scored, share, 4, "group")
        for rows in epochs_of_minibatches(16, 8, 2, seed=iteration):
            batch, part = select(experience, rows, generated.prompt_length)
            loss, _ = grpo_losses(policy, batch, part, 1.0, kl_coef=0.0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert shares[0] < 0.15  # about 1/16 at the start
    assert sum(shares[-3:]) / 3 > 0.4, shares


# ----------------------------------------------------------------------------- the script
TINY = ["--batch_size=8", "--group_size=4", "--minibatch_size=4", "--epochs=1", "--max_new_tokens=8",
        "--eval_prompts=4", "--validation_prompts=3", "--eval_samples=2", "--train_prompts=12", "--eval_batch_size=8",
        "--max_iters=2", "--eval_interval=2", "--learning_rate=1e-3", "--dtype=float32", "--device=cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["model", "arithmetic"])
def test_train_grpo_runs_with_each_reward_and_saves_a_policy_the_loader_opens(checkpoints, tmp_path, reward):  # noqa: F811
    sft, rm = checkpoints
    out = tmp_path / "out"
    extra = [f"--reward_model={rm}", "--baseline=group"] if reward == "model" else \
        ["--reward=arithmetic", "--reward_model=", "--baseline=leave_one_out"]
    result = run_script("train_grpo.py", TINY + [f"--init_from={sft}", f"--out_dir={out}"] + extra)
    assert "| eval_gold |" in result.stdout and " s CPU" in result.stdout
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if r.get("phase") == "eval"]
    training = [r for r in records if "phase" not in r]
    assert [r["iter"] for r in evals] == [0, 2] and [r["iter"] for r in training] == [0, 1]
    assert evals[0]["eval_kl"] == 0.0 and evals[0]["eval_gold_gain"] == 0.0  # the policy starts as the reference
    assert ("eval_score" in evals[0]) == (reward == "model") and ("eval_accuracy" in evals[0]) == (reward != "model")
    assert {"reward", "kl", "flat_groups", "clip_frac", "kl_loss", "ratio_mean", "grad_norm"} <= set(training[0])
    loaded = load_model(str(out))
    assert loaded.kind == "grpo" and loaded.checkpoint["iter_num"] == 2
    assert loaded.checkpoint["config"]["reward"] == reward


def test_settings_that_cannot_work_are_refused_before_any_work():
    from nanollm.configurator import UserError
    from nanollm.grpo import check_settings
    good = dict(batch_size=16, minibatch_size=8, epochs=1, eval_interval=1, log_interval=1, max_new_tokens=8,
                eval_batch_size=8, eval_samples=2, train_prompts=12, eval_prompts=4, validation_prompts=4, group_size=4,
                temperature=1.0, max_iters=1, learning_rate=1e-3, weight_decay=0.0, grad_clip=1.0, kl_coef=0.1,
                clip_range=0.2, baseline="group", reward="model", reward_model="out-rm", prompts="",
                operations="plus,minus,times")
    check_settings(good)
    for change, message in ((dict(group_size=1), "group_size=1"), (dict(batch_size=18), "multiple of group_size"),
                            (dict(baseline="critic"), "baseline='critic'"), (dict(reward="gold"), "reward='gold'"),
                            (dict(reward_model=""), "needs reward_model"), (dict(train_prompts=3), "train_prompts=3"),
                            (dict(reward="arithmetic", prompts="mine.jsonl"), "prompts file goes with"),
                            (dict(operations="times,divide"), "operations='times,divide'")):
        with pytest.raises(UserError, match=message):
            check_settings({**good, **change})
