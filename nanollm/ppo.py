"""PPO for language models (RLHF's third step), every piece written out as a plain function.

Teaches: rollouts by pure sampling with the KV cache; one scoring pass (policy, frozen reference, critic, reward
model); the reward r_t = −β·kl_t plus the score at eos, with the adaptive β of Ziegler et al. 2019; GAE (Schulman et
al. 2016); PPO's clipped surrogate and clipped value loss (Schulman et al. 2017), as in Stiennon et al. 2020 and
InstructGPT (Ouyang et al. 2022). KL estimators k1/k3: Schulman 2020, "Approximating KL divergence"; only k1 may go
in the reward (its score-function gradient is ∇KL), k3 goes in the loss (as GRPO does: Shao et al. 2024).
"""
import contextlib
import filecmp
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollm.checkpoint import load_checkpoint, restore_training_state, save_checkpoint, unwrap
from nanollm.configurator import UserError, check_ranges
from nanollm.data import batch_seed, last_token_index, pad_sequences
from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig, architecture_args
from nanollm.reward import freeze_unused_lm_head, prompt_key, response_logprob_running_mean
from nanollm.sft import language
from nanollm.tokenizer import NUM_RESERVED, Tokenizer, prompt_ids

KL_ESTIMATORS = ("k1", "k3")  # estimates of the VALUE of KL(π‖π_ref), both unbiased
REWARD_KL_ESTIMATORS = ("k1",)  # the only one whose value, paid as a reward, has ∇KL as its policy gradient


# ----------------------------------------------------------------------------- helpers
def masked_mean(values, mask):
    """Σ mask·x / Σ mask over the valid tokens (0 when there are none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values, mask, shift_mean=True, eps=1e-8):
    """(x − mean) / std over the valid tokens only (std with Bessel's correction); masked positions become 0.
    Unchanged when fewer than 2 tokens are valid (the std of one value is 0/0). shift_mean=False adds the mean
    back (whitening rewards changes their scale, not their sign on average)."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    if count < 2:
        return values
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / (count - 1)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


@contextlib.contextmanager
def evaluating(*models):
    """Dropout off inside the block (scoring and rollouts must not be noisy), each model's mode restored after."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


# ----------------------------------------------------------------------------- rollout
def encode_prompts(tokenizer, questions, max_prompt_tokens):
    """Questions (text, or chat messages ending on a user turn) -> chat-template ids ending with <|assistant|>."""
    encoded = []
    for question in questions:
        messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
        ids = prompt_ids(tokenizer, messages)
        if len(ids) > max_prompt_tokens:
            raise UserError(f"prompt of {len(ids)} tokens leaves no room for the response (at most "
                             f"{max_prompt_tokens}): {str(question)[:60]!r}")
        encoded.append(ids)
    return encoded


def prompts_in(questions, trained_prompts):
    """The questions (text, or chat messages) that are among trained_prompts (chat-message lists, as train_rm.py saves
    the prompts its reward model trained on): a held-out prompt the reward model has seen is not held out."""
    trained = {prompt_key(prompt) for prompt in trained_prompts}
    return [question for question in questions if prompt_key(question) in trained]


@dataclass
class Rollout:
    """Prompts (left-padded to prompt_length P) followed by the sampled responses (R tokens, padded after eos)."""
    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R) 1 on real prompt and response tokens
    response_mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first eos
    ended: torch.Tensor  # (B,) bool: the response emitted eos (False: cut at max_new_tokens)
    prompt_length: int  # P
    banned_ids: tuple = ()  # ids the sampler could not emit: every log-prob is of the same restricted distribution

    @property
    def responses(self):
        return self.input_ids[:, self.prompt_length:]  # (B, R)


def cut_after_eos(responses, eos_id, pad_id):
    """Sampled tokens (B, R) -> (responses with pad after the first eos, response_mask (B, R), ended (B,)).
    The mask keeps every token up to and including the first eos; eos_id None keeps every token."""
    if eos_id is None:
        return responses, torch.ones_like(responses), torch.zeros(responses.size(0), dtype=torch.bool,
                                                                  device=responses.device)
    is_eos = (responses == eos_id).long()  # (B, R)
    eos_before = is_eos.cumsum(-1) - is_eos  # how many eos come strictly before position t
    response_mask = (eos_before == 0).long()  # (B, R)
    return responses.masked_fill(response_mask == 0, pad_id), response_mask, is_eos.bool().any(-1)


def reserved_ids_except_eos(eos_id):
    """The tokenizer's reserved ids (pad, bos, unk, chat roles, mask) other than eos: a response must never contain
    one (a sampled <|assistant|> would start a new turn inside the response)."""
    return tuple(index for index in range(NUM_RESERVED) if index != eos_id)


@torch.no_grad()
def rollout(model, prompts, max_new_tokens, temperature, eos_id, pad_id, generator=None, banned_ids=None):
    """Sample one response per prompt (lists of ids), batched: prompts left-padded, decoded with the KV cache, by
    PURE sampling from softmax(logits / temperature) — no top-k/top-p, which would sample from a different
    distribution than the one whose log-probs and KL we compute. banned_ids (default: the reserved ids other than
    eos) get probability 0; the Rollout remembers them so that scoring uses the same distribution. Dropout is off."""
    banned_ids = reserved_ids_except_eos(eos_id) if banned_ids is None else tuple(banned_ids)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: PPO needs sampling (> 0); greedy decoding has no log-probs")
    device = next(model.parameters()).device
    prompt_tokens, prompt_mask = pad_sequences(prompts, pad_id, side="left")  # (B, P) each
    prompt_tokens, prompt_mask = prompt_tokens.to(device), prompt_mask.to(device)
    with evaluating(model):
        out = model.generate(prompt_tokens, max_new_tokens, temperature=temperature, top_k=None, top_p=None,
                             eos_id=eos_id, attention_mask=prompt_mask, use_cache=True, generator=generator,
                             banned_ids=banned_ids)
    responses, response_mask, ended = cut_after_eos(out[:, prompt_tokens.size(1):], eos_id, pad_id)  # (B, R)
    return Rollout(torch.cat([prompt_tokens, responses], 1), torch.cat([prompt_mask, response_mask], 1),
                   response_mask, ended, prompt_tokens.size(1), banned_ids)


def decode_responses(tokenizer, rollout):
    """The response texts (eos and padding dropped)."""
    texts = []
    for row, mask in zip(rollout.responses.tolist(), rollout.response_mask.tolist()):
        ids = [token for token, keep in zip(row, mask) if keep and token != tokenizer.eos_id]
        texts.append(tokenizer.decode(ids, skip_special=True).strip())
    return texts


# ----------------------------------------------------------------------------- the networks and the scoring pass
class Critic(nn.Module):
    """V(s_t) at every position: a GPT trunk + Linear(n_embd, 1). A network separate from the policy, so the value
    loss cannot disturb the language model; initialized from the reward model (it already reads quality). With
    likelihood=True it adds w · (mean log p of the response tokens so far), the reward model's likelihood feature
    read at every position, so that at eos the critic starts out equal to the reward model's score."""

    def __init__(self, backbone, likelihood=False):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.n_embd, 1)
        self.likelihood_weight = nn.Parameter(torch.zeros(())) if likelihood else None
        freeze_unused_lm_head(backbone, used=likelihood)  # read only by the likelihood feature

    @classmethod
    def from_reward_model(cls, reward_model, config=None):
        """A critic with the reward model's trunk and head weights (its fitted bias goes into the head's bias) and
        its likelihood weight (train_rm.py --likelihood_weight); config may change runtime settings such as
        attn_impl (default: the reward model's)."""
        critic = cls(GPT(config or reward_model.backbone.config), reward_model.likelihood)
        critic = critic.to(reward_model.head.weight.device)
        critic.backbone.load_state_dict(reward_model.backbone.state_dict())
        critic.head.load_state_dict(reward_model.head.state_dict())
        with torch.no_grad():
            critic.head.bias += reward_model.reward_bias
            if reward_model.likelihood:
                critic.likelihood_weight.copy_(reward_model.likelihood_weight)
        return critic

    def forward(self, idx, attention_mask):
        """(B, T) ids and mask -> (B, T) values, one per position (positions from the mask)."""
        hidden = self.backbone.hidden_states(idx, attention_mask)  # (B, T, C)
        values = self.head(hidden).squeeze(-1).float()  # (B, T)
        if self.likelihood_weight is not None:  # V_t = w·h_t + b + w_lik · mean log p(response tokens ≤ t)
            values = values + self.likelihood_weight * response_logprob_running_mean(self.backbone, hidden, idx,
                                                                                     attention_mask)
        return values


def response_logits(policy, rollout, temperature):
    """Full forward -> (B, R, V) logits / temperature, the ones that predicted each response token (position t−1
    predicts token t), with −inf at the ids the sampler banned. The same temperature and the same banned ids as
    sampling, or the log-probs are of another distribution."""
    logits, _ = policy(rollout.input_ids, attention_mask=rollout.attention_mask)  # (B, P+R, V)
    logits = logits[:, rollout.prompt_length - 1:-1].float() / temperature  # (B, R, V)
    if rollout.banned_ids:
        logits = logits.index_fill(-1, torch.tensor(rollout.banned_ids, device=logits.device), float("-inf"))
    return logits


def token_logprobs(logits, tokens):
    """log softmax(logits) at the given tokens: (B, R, V), (B, R) -> (B, R)."""
    return torch.gather(F.log_softmax(logits, dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logprobs(logits, rollout):
    """(B, R) log-probs of the sampled response tokens; 0 on the padding after eos (never sampled: a banned pad id
    would give −inf there, and −inf − (−inf) = nan in the ratio even under a 0 mask)."""
    return token_logprobs(logits, rollout.responses).masked_fill(rollout.response_mask == 0, 0.0)


def entropy_from_logits(logits):
    """H = −Σ p·log p = logsumexp(z) − Σ softmax(z)·z per position: (B, R, V) -> (B, R). A banned id (z = −inf,
    p = 0) adds 0, not 0·(−inf) = nan (in the value and in the gradient)."""
    finite_logits = logits.masked_fill(torch.isinf(logits), 0.0)
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * finite_logits).sum(-1)


def response_values(critic, rollout):
    """(B, R) values of the state before each response token (read where the policy reads its logits)."""
    return critic(rollout.input_ids, rollout.attention_mask)[:, rollout.prompt_length - 1:-1]


@torch.no_grad()
def score_rollout(policy, reference, critic, rollout, temperature, ctx=contextlib.nullcontext()):
    """The scoring pass, dropout off: log-probs of the sampled tokens under the policy (the 'old' ones of the PPO
    ratio) and the frozen reference, entropy, and critic values (critic may be None). Each (B, R)."""
    models = [m for m in (policy, reference, critic) if m is not None]
    with evaluating(*models), ctx:
        logits = response_logits(policy, rollout, temperature)  # (B, R, V)
        logprobs = response_logprobs(logits, rollout)
        ref_logprobs = response_logprobs(response_logits(reference, rollout, temperature), rollout)
        values = response_values(critic, rollout) if critic is not None else None
    return {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "entropy": entropy_from_logits(logits),
            "values": values}


@torch.no_grad()
def reward_scores(reward_model, rollout, ctx=contextlib.nullcontext()):
    """(B,) reward-model scores of prompt + response, read at the last real token (the response's eos)."""
    with evaluating(reward_model), ctx:
        return reward_model(rollout.input_ids, rollout.attention_mask).float()


# ----------------------------------------------------------------------------- rewards
def kl_estimate(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimate of the VALUE of KL(π‖π_ref) from tokens sampled from π (Schulman 2020), for measuring:
    k1 = log π − log π_ref (unbiased, any sign);  k3 = (r − 1) − log r with r = π_ref/π (unbiased, never < 0).
    As a reward only k1 is right: the policy gradient of a reward k(x) is E_π[k(x)·∇log π(x)], which for k1 is
    Σ π·(log π − log π_ref)·∇log π = ∇KL(π‖π_ref), but for k3 is another vector (an unbiased value does not make an
    unbiased gradient). k3 belongs in the loss: k3_kl_loss."""
    log_ratio = ref_logprobs - logprobs  # log r
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio  # (r − 1) − log r ≥ 0 since log r ≤ r − 1
    raise ValueError(f"kl_estimator={estimator!r}: expected one of {KL_ESTIMATORS}")


def shape_scores(scores, ended, missing_eos_penalty=0.0, score_clip=0.0, others_mean_of=0):
    """Reward-model scores (B,) -> what the policy is paid: minus missing_eos_penalty for a response that never
    ended, then clipped to [−score_clip, score_clip] (0 = no clipping); others_mean_of=k > 1: each minus the mean of
    the other k − 1 responses to its prompt (leave_one_out)."""
    scores = scores - missing_eos_penalty * (~ended).to(scores.dtype)
    scores = scores.clamp(-score_clip, score_clip) if score_clip > 0 else scores
    return leave_one_out(scores, others_mean_of) if others_mean_of > 1 else scores


def leave_one_out(scores, group_size):
    """(B,) scores of groups of group_size consecutive responses to one prompt -> score − the mean of the other
    responses' scores (the RLOO baseline: Kool et al. 2019; Ahmadian et al. 2024). What the prompt itself is worth
    cancels, only how a response compares with its siblings is left."""
    groups = scores.view(-1, group_size)  # (prompts, k)
    others_mean = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)  # mean of the k − 1 others
    return (groups - others_mean).view(-1)


def k3_kl_loss(logprobs, ref_logprobs, mask):
    """The KL penalty as a LOSS term, as GRPO uses it (Shao et al. 2024): mean over valid tokens of
    k3 = (r − 1) − log r, r = π_ref/π, differentiated through log π (logprobs carry the gradient).
    On tokens sampled from π its gradient is E_π[(1 − π_ref/π)·∇log π] = −Σ π_ref·∇log π = ∇KL(π_ref‖π): the
    other direction of KL, also 0 at π = π_ref and equal to ∇KL(π‖π_ref) to first order near it."""
    log_ratio = ref_logprobs.detach() - logprobs  # log r
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


def compute_rewards(scores, kl, response_mask, beta):
    """Per-token rewards (B, R): r_t = −β·kl_t on every response token, plus the score on the last real token
    (the eos, or the last token of a response cut at max length) (Ziegler et al. 2019; Stiennon et al. 2020)."""
    rewards = -beta * kl * response_mask  # (B, R)
    last = last_token_index(response_mask)  # (B,)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    return rewards.index_put((rows, last), rewards[rows, last] + scores)


def kl_controller(init_kl_coef, target_kl=0.0, horizon=1000):
    """β: adaptive towards target_kl when it is > 0 (Ziegler et al. 2019), else fixed."""
    return AdaptiveKLController(init_kl_coef, target_kl, horizon) if target_kl > 0 else FixedKLController(init_kl_coef)


class AdaptiveKLController:
    """Ziegler et al. 2019: β follows the KL towards a target.
    e = clip(KL / target − 1, −0.2, 0.2);  β ← β·(1 + e·n / horizon), n = responses in the step."""

    def __init__(self, beta, target, horizon):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n_responses):
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_responses / self.horizon


class FixedKLController:
    """A constant β (β = 0: no KL penalty at all)."""

    def __init__(self, beta):
        self.beta = beta

    def update(self, kl, n_responses):
        pass


# ----------------------------------------------------------------------------- advantages
def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al. 2016), backwards over the valid tokens of each row:
        δ_t = r_t + γ·V_{t+1} − V_t ;  A_t = δ_t + γλ·A_{t+1} ;  returns R_t = A_t + V_t
    V_{t+1} and A_{t+1} come from the next VALID token (masked positions are skipped and get A = R = 0); after the
    last valid token both are 0 (it is terminal). Inputs and outputs (B, T)."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V of the next valid token
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD error
        advantage = delta + gamma * lam * next_advantage
        valid = mask[:, t] > 0
        advantages[:, t] = torch.where(valid, advantage, torch.zeros_like(advantage))
        next_value = torch.where(valid, values[:, t], next_value)  # a masked position passes the next one through
        next_advantage = torch.where(valid, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def compute_gae_vectorized(rewards, values, mask, gamma=1.0, lam=0.95):
    """The same as compute_gae for masks that are a prefix of each row (response masks are), as one matmul:
    A_t = Σ_{s ≥ t} (γλ)^(s−t)·δ_s, the discounted sum of TD errors."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    next_values = F.pad(values[:, 1:], (0, 1))  # (B, T) V_{t+1}; 0 after the last valid token
    deltas = (rewards + gamma * next_values - values) * mask  # (B, T)
    steps = torch.arange(values.size(1), device=values.device)
    distance = steps[None, :] - steps[:, None]  # (T, T) s − t
    discount = torch.where(distance >= 0, (gamma * lam) ** distance.clamp(min=0).to(values.dtype),
                           torch.zeros((), dtype=values.dtype, device=values.device))  # (T, T) [t, s]
    advantages = (deltas @ discount.T) * mask  # A[b, t] = Σ_s δ[b, s]·discount[t, s]
    return advantages, (advantages + values) * mask


def explained_variance(values, returns, mask):
    """1 − Var[R − V] / Var[R] over the valid tokens: 1 = the critic predicts the returns, ≤ 0 = no better than
    their mean (nan if the returns are constant)."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    mean_returns = (returns * mask).sum() / count
    variance_returns = (((returns - mean_returns) * mask) ** 2).sum() / count
    residual = returns - values
    mean_residual = (residual * mask).sum() / count
    variance_residual = (((residual - mean_residual) * mask) ** 2).sum() / count
    return (1 - variance_residual / variance_returns).item() if variance_returns > 0 else float("nan")


def make_experience(rollout, logprobs, ref_logprobs, values, scores, beta, kl_estimator="k1", gamma=1.0, lam=0.95,
                    whiten_rewards=False, whiten_advantages=True):
    """Rewards, advantages and returns of a scored rollout; returns a dict of (B, ...) tensors that minibatches
    are cut from: the rollout's tensors, the old log-probs and values, advantages, returns, rewards, kl.
    The per-token KL in the reward is k1 (see kl_estimate: k3 there biases the policy gradient)."""
    if kl_estimator not in REWARD_KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r} in the reward: only 'k1' gives the policy gradient of KL "
                         f"(k3's value is unbiased, its gradient through the reward is not); k3 belongs in the loss "
                         f"(nanollm.ppo.k3_kl_loss, as GRPO)")
    mask = rollout.response_mask
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator) * mask  # (B, R)
    rewards = compute_rewards(scores, kl, mask, beta)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    if whiten_advantages:  # over this batch's valid tokens (skipped below 2)
        advantages = masked_whiten(advantages, mask)
    return {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask, "response_mask": mask,
            "ended": rollout.ended, "logprobs": logprobs, "values": values * mask, "advantages": advantages,
            "returns": returns, "rewards": rewards, "kl": kl, "banned_ids": rollout.banned_ids}


def minibatches(batch_size, minibatch_size, generator=None):
    """A shuffled split of range(batch_size) into index tensors of minibatch_size (the last may be smaller)."""
    order = torch.randperm(batch_size, generator=generator)
    return [order[start:start + minibatch_size] for start in range(0, batch_size, minibatch_size)]


def epochs_of_minibatches(batch_size, minibatch_size, epochs, seed):
    """The rows of every minibatch of every epoch, in order: epochs passes over one batch, each freshly shuffled."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        yield from minibatches(batch_size, minibatch_size, generator)


def select(experience, rows, prompt_length):
    """(minibatch dict, its Rollout) for some rows of an experience dict; the width is kept, so the minibatch's
    forwards compute exactly what the scoring pass computed for those rows."""
    part = {key: value[rows] for key, value in experience.items() if key != "banned_ids"}
    return part, Rollout(part["input_ids"], part["attention_mask"], part["response_mask"], part["ended"],
                         prompt_length, experience.get("banned_ids", ()))


# ----------------------------------------------------------------------------- losses
def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    """PPO's clipped surrogate (Schulman et al. 2017), averaged over the valid tokens:
        ratio = exp(log π_new − log π_old);  L = mean_t max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε))
    Returns (loss, stats): clip_frac = share of tokens where the clipped term is the larger (no gradient there),
    approx_kl = mean((ratio − 1) − log ratio) (k3 of KL(π_old‖π_new)), ratio_mean."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item(),
                 "ratio_mean": masked_mean(ratio, mask).item()}
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_range=0.2):
    """Clipped value loss (OpenAI baselines' PPO2, used by Ziegler et al. 2019), over the valid tokens:
        V_clip = V_old + clip(V − V_old, −ε, ε);  L = ½·mean_t max((V − R)², (V_clip − R)²)
    clip_range 0 = unclipped. Returns (loss, stats): value_clip_frac = share of tokens where the clipped error wins."""
    unclipped = (values - returns) ** 2
    if clip_range <= 0:
        return 0.5 * masked_mean(unclipped, mask), {"value_clip_frac": 0.0}
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((clipped > unclipped).float(), mask).item()}
    return loss, stats


def entropy_bonus(logits, mask):
    """Mean entropy of the policy over the valid tokens, H = mean_t (logsumexp(z_t) − Σ softmax(z_t)·z_t); the
    loss subtracts entropy_coef·H, which keeps the policy from collapsing too early."""
    return masked_mean(entropy_from_logits(logits), mask)


def ppo_losses(policy, critic, batch, rollout, temperature, clip_range=0.2, value_clip_range=0.2, entropy_coef=0.0):
    """One minibatch: forward both networks (with gradients) and return (policy objective to minimize, value loss,
    stats). The policy's objective is policy_loss − entropy_coef·entropy."""
    mask = batch["response_mask"]
    logits = response_logits(policy, rollout, temperature)  # (b, R, V)
    logprobs = response_logprobs(logits, rollout)
    pg_loss, stats = policy_loss(logprobs, batch["logprobs"], batch["advantages"], mask, clip_range)
    entropy = entropy_bonus(logits, mask)
    values = response_values(critic, rollout)  # (b, R)
    v_loss, value_stats = value_loss(values, batch["values"], batch["returns"], mask, value_clip_range)
    stats.update(value_stats, policy_loss=pg_loss.item(), value_loss=v_loss.item(), entropy=entropy.item())
    return pg_loss - entropy_coef * entropy, v_loss, stats


def sequence_sum(values, mask):
    """(B, R) per-token values -> (B,) their sum over each response (e.g. the sequence KL Σ_t kl_t)."""
    return (values * mask).sum(-1)


def mean(values):
    """The mean of a list of numbers (nan if empty)."""
    return sum(values) / len(values) if values else math.nan


def pick_prompts(n_available, n_prompts, samples_per_prompt, seed, iteration, rank, device="cpu"):
    """This rank's prompts of one iteration and the generator it samples their responses with: one seeded shuffle of
    all prompts per iteration, each rank its own slice, each prompt samples_per_prompt times in a row. A pure function
    of its arguments, so resume is exact."""
    picker = torch.Generator().manual_seed(batch_seed(seed, "ppo-prompts", iteration, 0))
    picked = torch.randperm(n_available, generator=picker)[rank * n_prompts:][:n_prompts]
    sampler = torch.Generator(device=device).manual_seed(batch_seed(seed, "ppo-samples", iteration, rank))
    return picked.repeat_interleave(samples_per_prompt).tolist(), sampler


def batch_record(rollout, scored, experience, raw_scores, scores, sequence_kl, beta):
    """A rollout batch's numbers for the log (means over this rank's batch); sequence_kl (B,): Σ_t kl_t."""
    mask = rollout.response_mask
    return {"score": raw_scores.mean().item(),
            "objective": (scores - beta * sequence_kl).mean().item(),  # what PPO maximizes: score − β·KL
            "entropy": (scored["entropy"] * mask).sum().item() / mask.sum().item(),
            "explained_variance": explained_variance(experience["values"], experience["returns"], mask),
            "response_length": mask.sum(-1).float().mean().item(), "eos_rate": rollout.ended.float().mean().item()}


# ----------------------------------------------------------------------------- train_ppo.py's set-up and evaluation
def check_settings(settings):
    """train_ppo.py's settings, before any work: one line naming the first wrong one."""
    s, world_size = settings, int(os.environ.get("WORLD_SIZE", 1))  # the number of processes torchrun starts
    check_ranges(s, positive=("batch_size", "minibatch_size", "ppo_epochs", "eval_interval", "log_interval",
                              "max_new_tokens", "eval_batch_size", "eval_samples", "train_prompts", "eval_prompts",
                              "validation_prompts", "samples_per_prompt"),
                 non_negative=("max_iters", "learning_rate", "critic_learning_rate", "weight_decay", "grad_clip",
                               "init_kl_coef"))
    if s["kl_estimator"] not in REWARD_KL_ESTIMATORS:
        raise UserError(f"kl_estimator={s['kl_estimator']!r}: the reward's KL must be one of {REWARD_KL_ESTIMATORS}" +
                        (" (k3's value is unbiased, its policy gradient is not; k3 belongs in a loss: k3_kl_loss)"
                         if s["kl_estimator"] == "k3" else ""))
    if s["temperature"] <= 0:
        raise UserError(f"temperature={s['temperature']}: PPO samples, so it must be > 0")
    if s["batch_size"] % s["samples_per_prompt"]:
        raise UserError(f"batch_size={s['batch_size']} must be a multiple of samples_per_prompt="
                        f"{s['samples_per_prompt']}")
    if s["score_baseline"] == "leave_one_out":
        raise UserError("score_baseline='leave_one_out' is now 'others_mean': it centres scores on the prompt's other "
                        "responses while the critic stays, which is not RLOO")
    if s["score_baseline"] not in ("none", "others_mean") or (s["score_baseline"] != "none" and
                                                               s["samples_per_prompt"] < 2):
        raise UserError(f"score_baseline={s['score_baseline']!r}: expected 'none', or 'others_mean' with "
                        f"samples_per_prompt >= 2 (got {s['samples_per_prompt']})")
    if s["minibatch_size"] > s["batch_size"]:
        raise UserError(f"minibatch_size={s['minibatch_size']} must be between 1 and batch_size={s['batch_size']}")
    if not s.get("prompts") and s["batch_size"] // s["samples_per_prompt"] * world_size > s["train_prompts"]:
        raise UserError(f"batch_size={s['batch_size']} / samples_per_prompt={s['samples_per_prompt']} x {world_size} "
                        f"rank(s) prompts per iteration exceed train_prompts={s['train_prompts']}")


SET_NAMES = {"eval_": "test", "val_": "validation"}  # the held-out prompt sets by metrics prefix


def check_held_out(held_out, reward_dir, reward_checkpoint):
    """Held out means held out: the reward model must not have trained on any held-out prompt (test 'eval_',
    validation 'val_')."""
    if "trained_prompts" not in reward_checkpoint:
        raise UserError(f"{reward_dir}/ckpt.pt does not record the prompts the reward model trained on, so the held-out "
                        f"prompts cannot be checked; retrain it with train_rm.py")
    every = [prompt for prompts in held_out.values() for prompt in prompts]
    seen = prompts_in(every, reward_checkpoint["trained_prompts"])
    if seen:
        sets = " + ".join(f"{len(prompts)} {SET_NAMES[prefix]}" for prefix, prompts in held_out.items())
        raise UserError(f"{reward_dir}: the reward model trained on {len(seen)} of the {sets} prompts (e.g. "
                        f"{seen[0]!r}), so they are not held out; train it on the world's train questions "
                        f"(train_rm.py's demo does) or drop these prompts from its data")


class HeldOutEvaluation:
    """A policy on fixed held-out prompt sets ({metrics prefix: questions}; 'eval_' = test prompts, the reported
    result; 'val_' = validation prompts, for choosing settings): `samples` responses per prompt, pure sampling with a
    fixed seed, so every evaluation (and the SFT model's) sees the same random numbers. Reports the reward model's
    score, the judge's gold score (evaluation only, never in a loss) with its standard error over prompts, KL to the
    reference, length, eos rate, and the paired gold gain over the reference: the mean and std/√n of per-prompt
    differences on the same seeded samples (common random numbers). reward_model None: no reward-model score;
    verifier (question, reply) -> 0 or 1: also its accuracy ± standard error over prompts (a verifiable reward).
    judge None (prompts no judge knows): no gold numbers. Scores also per language of the prompt (_zh, _en)."""

    def __init__(self, sets, tokenizer, max_prompt_tokens, samples, reference, reward_model, judge, max_new_tokens,
                 temperature, batch_size, seed, ctx, verifier=None):
        self.sets = sets
        self.encoded = {prefix: encode_prompts(tokenizer, questions, max_prompt_tokens) * samples  # each k times
                        for prefix, questions in sets.items()}
        self.tokenizer, self.samples, self.reference, self.reward_model, self.judge = \
            tokenizer, samples, reference, reward_model, judge
        self.max_new_tokens, self.temperature, self.batch_size, self.seed, self.ctx, self.verifier = \
            max_new_tokens, temperature, batch_size, seed, ctx, verifier
        self.baseline = {}  # prefix -> the reference's per-prompt gold (the paired gain's baseline)

    @torch.no_grad()
    def evaluate(self, model, prefix):
        """(scores, samples as (question, reply, score, gold), (prompts,) mean gold per prompt)."""
        questions, encoded = self.sets[prefix], self.encoded[prefix]
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        scores, golds, kls, lengths, ended, samples = [], [], [], [], [], []
        languages = [language(q if isinstance(q, str) else q[-1]["content"]) for q in questions]
        for start in range(0, len(encoded), self.batch_size):
            generated = rollout(model, encoded[start:start + self.batch_size], self.max_new_tokens, self.temperature,
                                self.tokenizer.eos_id, self.tokenizer.pad_id, generator)
            scored = score_rollout(model, self.reference, None, generated, self.temperature, self.ctx)
            kl = kl_estimate(scored["logprobs"], scored["ref_logprobs"], "k1")
            replies = decode_responses(self.tokenizer, generated)
            batch_scores = reward_scores(self.reward_model, generated, self.ctx).tolist() \
                if self.reward_model is not None else [math.nan] * len(replies)
            asked = [questions[i % len(questions)] for i in range(start, start + len(replies))]
            batch_golds = [self.judge.judge(question, reply).overall if self.judge else None
                           for question, reply in zip(asked, replies)]
            scores, golds = scores + batch_scores, golds + batch_golds
            kls += sequence_sum(kl, generated.response_mask).tolist()
            lengths += generated.response_mask.sum(-1).tolist()
            ended += generated.ended.float().tolist()
            samples += list(zip(asked, replies, batch_scores, batch_golds))
        by_language = {}  # "zh" | "en" -> its samples' indices (sample i asks questions[i % len(questions)])
        for i in range(len(samples)):
            by_language.setdefault(languages[i % len(questions)], []).append(i)
        per_language = lambda name, values: {f"{prefix}{name}_{language}": mean([values[i] for i in rows])  # noqa
                                             for language, rows in sorted(by_language.items())}
        results = {f"{prefix}score": mean(scores), **per_language("score", scores)} \
            if self.reward_model is not None else {}
        per_prompt = None
        if self.judge is not None:
            per_prompt = torch.tensor(golds).view(self.samples, len(questions)).mean(0)  # (prompts,) mean gold
            results.update({f"{prefix}gold": mean(golds), **per_language("gold", golds),
                            f"{prefix}gold_se": (per_prompt.std() / len(questions) ** 0.5).item()})  # std error
        results.update({f"{prefix}kl": mean(kls), f"{prefix}response_length": mean(lengths),
                        f"{prefix}eos_rate": mean(ended)})
        if self.verifier is not None:  # accuracy per prompt (over its samples), then its mean ± std/√prompts
            correct = torch.tensor([float(self.verifier(question, reply)) for question, reply, _, _ in samples])
            per_prompt_correct = correct.view(self.samples, len(questions)).mean(0)  # (prompts,)
            results.update({f"{prefix}accuracy": per_prompt_correct.mean().item(),
                            f"{prefix}accuracy_se": (per_prompt_correct.std() / len(questions) ** 0.5).item()})
        return results, samples, per_prompt

    @staticmethod
    def describe(scores):
        score = f"reward-model score {scores['eval_score']:+.3f}, " if "eval_score" in scores else ""
        accuracy = f"accuracy {scores['eval_accuracy']:.3f}, " if "eval_accuracy" in scores else ""
        gold = (f"gold {scores['eval_gold']:.3f} (gain {scores['eval_gold_gain']:+.3f} ± "
                f"{scores['eval_gold_gain_se']:.3f}), " if "eval_gold" in scores else "")
        text = (f"test {score}{accuracy}{gold}KL {scores['eval_kl']:.3f}, length "
                f"{scores['eval_response_length']:.1f}, eos rate {scores['eval_eos_rate']:.2f}")
        return text + (f"; validation gold gain {scores['val_gold_gain']:+.3f} ± {scores['val_gold_gain_se']:.3f}"
                       if "val_gold_gain" in scores else "")

    def __call__(self, model, is_reference=False):
        """Every set's scores and gains, and the first set's samples. is_reference: the model is the reference itself
        (iteration 0), so its golds are the baseline."""
        results, first_samples = {}, None
        for prefix in self.sets:
            scores, samples, per_prompt = self.evaluate(model, prefix)
            results.update(scores)
            first_samples = samples if first_samples is None else first_samples
            if per_prompt is None:  # no judge: no gold, no gain
                continue
            if prefix not in self.baseline:
                self.baseline[prefix] = per_prompt if is_reference else self.evaluate(self.reference, prefix)[2]
            difference = per_prompt - self.baseline[prefix]  # (prompts,)
            results.update({f"{prefix}gold_gain": difference.mean().item(),
                            f"{prefix}gold_gain_se": (difference.std() / len(difference) ** 0.5).item()})
        return results, first_samples


def append_samples(path, iter_num, samples, count=6):
    """A few held-out replies with their scores, appended to samples.txt at each evaluation. Blocks from iteration
    iter_num on that are already there (a resumed run's evaluations after its checkpoint) are dropped first, as
    metrics.jsonl drops those records, so that no evaluation appears twice."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        stale = [i for i, line in enumerate(lines) if line.startswith("=== iteration ")
                 and int(line.split()[2].rstrip(":")) >= iter_num]
        if stale:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(lines[:stale[0]])
            os.replace(path + ".tmp", path)  # atomic: a crash leaves the old file or the new one
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== iteration {iter_num}: held-out prompts ===\n")
        for question, reply, score, gold_score in samples[:count]:
            gold = f", gold {gold_score:.2f}" if gold_score is not None else ""
            f.write(f"Q: {question}\nA: {reply}\n   reward model {score:+.3f}{gold}\n")


@dataclass
class PPOStart:
    """What train_ppo.py (and train_grpo.py) starts from: the SFT model (the policy's start and the frozen reference),
    the reward model (frozen; the critic's start), their shapes, the tokenizer, and the run's own checkpoint when
    resuming. Without a critic (GRPO, RLOO) critic is None, and without a reward model (a verifiable reward) so are
    reward_model and critic_args."""
    sft_dir: str
    reward_dir: str
    tokenizer_path: str
    tokenizer: Tokenizer
    checkpoint: dict  # the checkpoint the policy starts from (the SFT model's, or ours when resuming)
    policy: nn.Module  # the SFT weights (a resumed run loads its own with the optimizer state)
    reference: nn.Module  # the SFT model, frozen: the KL is measured against it
    critic: nn.Module  # the reward model's trunk and head, trained as the value function (None: no critic)
    reward_model: nn.Module  # frozen (None: no reward model)
    model_args: dict
    critic_args: dict  # the reward model's architecture, which the critic shares (None: no reward model)


def ppo_start(init_from, out_dir, reward_model, held_out, attn_impl, device, critic=True):
    """Load and check everything PPO starts from (checkpoints to the CPU: RNG states must stay CPU tensors; the models
    on `device`): the reward model must be causal (it initializes the critic), read the policy's tokens, and never
    have trained on a held-out prompt. critic=False (GRPO, RLOO) builds no critic, and then reward_model '' loads no
    reward model (a verifiable reward needs none)."""
    resume = init_from == "resume"
    checkpoint = load_checkpoint(os.path.join(out_dir if resume else init_from, "ckpt.pt"), "cpu")
    if resume:
        sft_dir, reward_dir = checkpoint["config"]["init_from"], checkpoint["config"]["reward_model"]
        sft, tokenizer_path = load_checkpoint(os.path.join(sft_dir, "ckpt.pt"), "cpu"), out_dir
    elif checkpoint.get("stage") == "reward":
        raise UserError(f"init_from={init_from!r} holds a reward model; start from an SFT out_dir or use 'resume'")
    else:
        sft_dir, reward_dir, sft, tokenizer_path = init_from, reward_model, checkpoint, init_from
    tokenizer_path = os.path.join(tokenizer_path, "tokenizer.model")
    model_args = dict(checkpoint["model_args"], dropout=0.0, attn_impl=attn_impl)  # dropout 0: ratio = 1 at first
    reward_net = critic_net = critic_args = None
    if reward_dir or critic:
        reward_net, _, _, reward_checkpoint = load_model(os.path.join(reward_dir, "ckpt.pt"), kinds=("reward",))
        check_held_out(held_out, reward_dir, reward_checkpoint)
        if critic and reward_checkpoint.get("backbone", "gpt") != "gpt":
            raise UserError(f"{reward_dir}: a {reward_checkpoint['backbone']!r} reward model cannot initialize the "
                            f"critic, which must be causal (one value per prefix); train the reward model with "
                            f"backbone='sft'")
        if not filecmp.cmp(tokenizer_path, os.path.join(reward_dir, "tokenizer.model"), shallow=False):
            raise UserError(f"{reward_dir}/tokenizer.model differs from {tokenizer_path}: the reward model must read "
                            f"the policy's tokens")
        critic_args = dict(reward_checkpoint["model_args"], dropout=0.0, attn_impl=attn_impl)
        if critic_args["vocab_size"] != model_args["vocab_size"]:
            raise UserError(f"reward model vocab_size={critic_args['vocab_size']} != policy vocab_size="
                            f"{model_args['vocab_size']}")
        reward_net = reward_net.requires_grad_(False).to(device)
        critic_net = Critic.from_reward_model(reward_net, GPTConfig(**critic_args)).to(device) if critic else None
    policy, reference = GPT(GPTConfig(**model_args)), GPT(GPTConfig(**model_args))
    policy.load_state_dict(sft["model"])
    reference.load_state_dict(sft["model"])
    return PPOStart(sft_dir, reward_dir, tokenizer_path, Tokenizer(tokenizer_path), checkpoint, policy.to(device),
                    reference.requires_grad_(False).eval().to(device), critic_net, reward_net, model_args,
                    critic_args)


def save_ppo(path, runtime, policy, critic, optimizer, critic_optimizer, scaler, critic_scaler, controller, iter_num,
             config, model_args, critic_args):
    """A PPO checkpoint: the policy in the SFT format (chat.py, evaluate.py read it as such) plus the critic, both
    optimizers and scalers and β, so that resume is exact."""
    save_checkpoint(path, runtime, policy, optimizer, scaler, iter_num, None, config, model_args, stage="ppo",
                    critic=unwrap(critic).state_dict(), critic_args=architecture_args(critic_args),
                    critic_optimizer=critic_optimizer.state_dict(), critic_scaler=critic_scaler.state_dict(),
                    beta=controller.beta)


def restore_ppo(checkpoint, runtime, policy, critic, optimizer, critic_optimizer, scaler, critic_scaler, controller):
    """Resume what save_ppo wrote; returns the iteration to continue from."""
    iter_num, _ = restore_training_state(checkpoint, policy, optimizer, scaler, runtime)
    critic.load_state_dict(checkpoint["critic"])
    critic_optimizer.load_state_dict(checkpoint["critic_optimizer"])
    critic_scaler.load_state_dict(checkpoint["critic_scaler"])
    controller.beta = checkpoint["beta"]
    return iter_num


def before_after_table(records, keys=("eval_score", "eval_gold", "eval_gold_gain", "eval_kl", "eval_response_length",
                                      "eval_eos_rate", "val_gold", "val_gold_gain")):
    """The first and last held-out evaluations of a run (metrics.jsonl's 'eval' lines), as a markdown table: the keys
    the run has (no gold without a judge), then the test prompts' scores per language."""
    evals = [record for record in records if record.get("phase") == "eval"]
    before, after = evals[0], evals[-1]
    languages = [key for key in before if key.startswith(("eval_score_", "eval_gold_")) and key[-3:] in ("_zh", "_en")]
    rows = [f"| {key} | {before[key]:.4f} | {after[key]:.4f} |" for key in list(keys) + languages if key in before]
    return "\n".join([f"| held-out (eval_: test, val_: validation) | iteration {before['iter']} | iteration "
                      f"{after['iter']} |", "|---|---|---|"] + rows)
