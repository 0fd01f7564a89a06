"""Critic-free policy gradients with groups of samples: GRPO and RLOO, paid by a reward model or a verifiable reward.

Teaches: G responses per prompt, and the group itself as the baseline, so no critic is trained. GRPO (Shao et al.
2024, DeepSeekMath): A_i = (r_i − mean of the group) / (std of the group + ε) on every response token. RLOO (Ahmadian
et al. 2024; Kool et al. 2019): A_i = r_i − mean of the other G − 1. Both step on PPO's clipped ratio (Schulman et al.
2017) with the KL to the frozen reference in the LOSS, estimated by k3 (nanollm/ppo.py: k3_kl_loss). A verifiable
reward (RL with verifiable rewards: Lambert et al. 2024, Tülu 3; DeepSeek-AI 2025, R1): the world's arithmetic
questions, checked exactly; no reward model to hack.
"""
import os
import random
import re

import torch

from nanollm.annotators import ARITHMETIC_EN, ARITHMETIC_ZH, OPERATIONS
from nanollm.configurator import UserError, check_ranges
from nanollm.ppo import (k3_kl_loss, leave_one_out, masked_mean, policy_loss, response_logits, response_logprobs,
                         entropy_from_logits, sequence_sum, kl_estimate)
from nanollm.world import PROMPT_SPLITS, ZH_OPERATIONS, question_split

BASELINES = ("group", "leave_one_out")  # GRPO | RLOO
REWARDS = ("model", "arithmetic")  # the reward model's score | 1 for the right number, else 0
OPERATION_NAMES = ("plus", "minus", "times")  # of the world's arithmetic questions (two numbers 0-99, or 0-12 for times)
ARITHMETIC_POOL = 4000  # arithmetic questions generated before the split (about 680 distinct ones in each held-out set)


# ----------------------------------------------------------------------------- the group baseline
def group_advantages(rewards, group_size, baseline="group", eps=1e-4):
    """(B,) rewards of groups of group_size consecutive responses to one prompt -> (B,) advantages.
    'group' (GRPO, Shao et al. 2024): A_i = (r_i − mean_j r_j) / (std_j r_j + ε), std with Bessel's correction; a
    group whose rewards are all equal teaches nothing and gets A = 0 (0 / ε, never 0 / 0).
    'leave_one_out' (RLOO, Ahmadian et al. 2024): A_i = r_i − (1/(G−1))·Σ_{j≠i} r_j, an unbiased baseline (it does
    not depend on response i), = G/(G−1)·(r_i − mean_j r_j)."""
    if baseline == "leave_one_out":
        return leave_one_out(rewards, group_size)
    if baseline != "group":
        raise ValueError(f"baseline={baseline!r}: expected one of {BASELINES}")
    groups = rewards.view(-1, group_size)  # (prompts, G)
    centred = groups - groups.mean(-1, keepdim=True)
    return (centred / (groups.std(-1, keepdim=True) + eps)).view(-1)


def token_advantages(advantages, response_mask):
    """The response's one advantage on each of its tokens (outcome supervision: Shao et al. 2024, §4.1.2):
    (B,), (B, R) -> (B, R), 0 on padding."""
    return advantages[:, None] * response_mask.to(advantages.dtype)


# ----------------------------------------------------------------------------- the verifiable reward
def arithmetic_question(question):
    """(a, b, the right answer) of one of the world's arithmetic questions ('What is 7 plus 5?', '7加5等于多少？'),
    or None for any other prompt."""
    for pattern, language in ((ARITHMETIC_EN, "en"), (ARITHMETIC_ZH, "zh")):
        match = pattern.match(question.strip())
        if match:
            a, symbol, b = match.groups()
            operation = symbol if language == "en" else {v: k for k, v in ZH_OPERATIONS.items()}[symbol]
            return int(a), int(b), OPERATIONS[operation](int(a), int(b))
    return None


def arithmetic_reward(question, reply):
    """1.0 if the reply answers the arithmetic question right, else 0.0, by an exact rule on the numbers (digits) in
    the reply: the LAST number is the answer, and every number is the answer or one of the question's two operands
    (an echo: '7 plus 5 is 12.'). So '12', 'It is 12.' and '5 plus 7 is 12.' are right; '13', 'It is 12 or 13.',
    '12, not 13.' and a reply with no number are wrong. Numbers written in words are not read."""
    asked = arithmetic_question(question)
    if asked is None:
        raise ValueError(f"not one of the world's arithmetic questions: {question[:80]!r}")
    a, b, answer = asked
    numbers = [int(number) for number in re.findall(r"\d+", reply)]
    return float(bool(numbers) and numbers[-1] == answer and all(n in (a, b, answer) for n in numbers))


def arithmetic_prompt_sets(world, seed, test, validation, train, operations=OPERATION_NAMES):
    """Three disjoint sets of the world's arithmetic questions (of the given operations), split by what they ask
    (world.question_split, as annotators.ppo_prompt_sets splits all questions): ({'eval_': test, 'val_': validation},
    training questions)."""
    by_split = {split: [] for split in PROMPT_SPLITS}
    for pair in world.qa_pairs(seed, n_arithmetic=ARITHMETIC_POOL):
        if not pair.entity and pair.attribute in operations:
            by_split[question_split(pair)].append(pair.question)
    sets = {}
    for setting, split, n in (("eval_prompts", "test", test), ("validation_prompts", "validation", validation),
                              ("train_prompts", "train", train)):
        questions = list(dict.fromkeys(by_split[split]))  # distinct, in generation order
        random.Random(f"arithmetic:{seed}").shuffle(questions)
        if n > len(questions):
            raise UserError(f"{setting}={n}: the {split} split has only {len(questions)} distinct arithmetic questions")
        sets[split] = questions[:n]
    return {"eval_": sets["test"], "val_": sets["validation"]}, sets["train"]


# ----------------------------------------------------------------------------- the loss
def grpo_losses(policy, batch, rollout, temperature, clip_range=0.2, kl_coef=0.04):
    """One minibatch (forward with gradients) -> (loss to minimize, stats):
        L = mean_t max(−A·ρ_t, −A·clip(ρ_t, 1 ± ε)) + β·mean_t k3_t,   ρ_t = π(y_t)/π_old(y_t)
    the clipped surrogate (ppo.policy_loss) plus the KL to the reference in the loss (ppo.k3_kl_loss; Shao et al.
    2024, eq. 3), both averaged over the minibatch's valid tokens (GRPO's paper averages per response first)."""
    mask = batch["response_mask"]
    logits = response_logits(policy, rollout, temperature)  # (b, R, V)
    logprobs = response_logprobs(logits, rollout)  # (b, R)
    surrogate, stats = policy_loss(logprobs, batch["logprobs"], batch["advantages"], mask, clip_range)
    kl_loss = k3_kl_loss(logprobs, batch["ref_logprobs"], mask)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits), mask)
    stats.update(policy_loss=surrogate.item(), kl_loss=kl_loss.item(), entropy=entropy.item())
    return surrogate + kl_coef * kl_loss, stats


def make_group_experience(rollout, scored, rewards, group_size, baseline):
    """A scored rollout and its (B,) rewards -> the dict minibatches are cut from (ppo.select): the rollout's tensors,
    the old and reference log-probs and the (B, R) advantages."""
    advantages = group_advantages(rewards, group_size, baseline)  # (B,)
    return {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
            "response_mask": rollout.response_mask, "ended": rollout.ended, "logprobs": scored["logprobs"],
            "ref_logprobs": scored["ref_logprobs"], "advantages": token_advantages(advantages, rollout.response_mask),
            "banned_ids": rollout.banned_ids}


def group_record(rollout, scored, rewards, group_size):
    """A batch's numbers for the log: mean reward, the share of groups whose rewards are all equal (no signal), KL to
    the reference (k1, summed over each response), entropy, length, eos rate."""
    mask = rollout.response_mask
    groups = rewards.view(-1, group_size)  # (prompts, G)
    kl = kl_estimate(scored["logprobs"], scored["ref_logprobs"], "k1") * mask
    return {"reward": rewards.mean().item(), "kl": sequence_sum(kl, mask).mean().item(),
            "flat_groups": (groups.max(-1).values == groups.min(-1).values).float().mean().item(),
            "entropy": masked_mean(scored["entropy"], mask).item(),
            "response_length": mask.sum(-1).float().mean().item(), "eos_rate": rollout.ended.float().mean().item()}


# ----------------------------------------------------------------------------- train_grpo.py's settings
def check_settings(settings):
    """train_grpo.py's settings, before any work: one line naming the first wrong one."""
    s = settings
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun
        raise UserError("train_grpo.py runs in one process (for several, see train_ppo.py's DDP loop)")
    check_ranges(s, positive=("batch_size", "minibatch_size", "epochs", "eval_interval", "log_interval",
                              "max_new_tokens", "eval_batch_size", "eval_samples", "train_prompts", "eval_prompts",
                              "validation_prompts", "group_size", "temperature"),
                 non_negative=("max_iters", "learning_rate", "weight_decay", "grad_clip", "kl_coef", "clip_range"))
    if s["baseline"] not in BASELINES:
        raise UserError(f"baseline={s['baseline']!r}: expected 'group' (GRPO) or 'leave_one_out' (RLOO)")
    if s["reward"] not in REWARDS:
        raise UserError(f"reward={s['reward']!r}: expected 'model' (the reward model) or 'arithmetic' (verifiable)")
    if s["reward"] == "model" and not s["reward_model"]:
        raise UserError("reward='model' needs reward_model (train_rm.py's out_dir)")
    if s["group_size"] < 2:
        raise UserError(f"group_size={s['group_size']}: a group baseline needs at least 2 responses per prompt")
    if s["batch_size"] % s["group_size"]:
        raise UserError(f"batch_size={s['batch_size']} must be a multiple of group_size={s['group_size']}")
    if s["minibatch_size"] > s["batch_size"]:
        raise UserError(f"minibatch_size={s['minibatch_size']} must be between 1 and batch_size={s['batch_size']}")
    unknown = set(s["operations"].split(",")) - set(OPERATION_NAMES)
    if unknown or not s["operations"]:
        raise UserError(f"operations={s['operations']!r}: expected a comma-separated subset of {OPERATION_NAMES}")
    if s["reward"] == "arithmetic" and s["prompts"]:
        raise UserError(f"prompts={s['prompts']!r}: reward='arithmetic' trains on the world's arithmetic questions; a "
                        f"prompts file goes with reward='model'")
    if not s["prompts"] and s["batch_size"] // s["group_size"] > s["train_prompts"]:
        raise UserError(f"batch_size={s['batch_size']} / group_size={s['group_size']} prompts per iteration exceed "
                        f"train_prompts={s['train_prompts']}")
