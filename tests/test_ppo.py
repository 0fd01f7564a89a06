"""PPO pieces: GAE on hand-worked cases, both loss clips, KL estimators, masked whitening, where the score lands,
padding invariance of the scoring pass, ratio = 1 before any update, and a tiny PPO run that learns a reward."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanollm.model import GPT, GPTConfig
from nanollm.ppo import (AdaptiveKLController, Critic, FixedKLController, Rollout, append_samples, compute_gae,
                         compute_gae_vectorized, compute_rewards, cut_after_eos, entropy_bonus, explained_variance,
                         k3_kl_loss, kl_estimate, leave_one_out, make_experience, masked_whiten, minibatches,
                         policy_loss, ppo_losses, reserved_ids_except_eos, response_logits, reward_scores, rollout,
                         score_rollout, select, shape_scores, value_loss)
from nanollm.reward import RewardModel

PAD, EOS = 1, 3


def tiny_gpt(seed=0, vocab_size=24, n_layer=2, n_embd=32, attn_impl="sdpa"):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=n_layer, n_head=2, n_embd=n_embd,
                         attn_impl=attn_impl))


def tiny_setup(seed=0):
    """policy, reference (a copy), critic (from a reward model), reward model; all tiny and random."""
    policy = tiny_gpt(seed)
    reference = tiny_gpt(seed)
    reward_model = RewardModel(tiny_gpt(seed + 1))
    reward_model.reward_bias.fill_(0.3)
    return policy, reference, Critic.from_reward_model(reward_model), reward_model


PROMPTS = [[2, 5, 9, 6], [2, 7, 6], [2, 11, 12, 13, 14, 6]]


# ----------------------------------------------------------------------------- GAE
def test_gae_golden_case():
    kl = torch.tensor([[0.1, -0.2, 0.3]])
    mask = torch.ones(1, 3)
    rewards = compute_rewards(torch.tensor([1.0]), kl, mask, beta=0.1)  # [-0.01, 0.02, 0.97]
    assert torch.allclose(rewards, torch.tensor([[-0.01, 0.02, 0.97]]))
    values = torch.tensor([[0.5, 0.4, 0.3]])
    for gae in (compute_gae, compute_gae_vectorized):
        advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
        assert torch.allclose(advantages, torch.tensor([[0.418675, 0.5565, 0.67]]), atol=1e-6), gae.__name__
        assert torch.allclose(returns, advantages + values)


def test_gae_lambda_one_is_reward_to_go_minus_value_and_lambda_zero_is_td_error():
    torch.manual_seed(0)
    rewards, values, gamma = torch.randn(2, 5), torch.randn(2, 5), 0.9
    mask = torch.ones(2, 5)
    advantages, _ = compute_gae(rewards, values, mask, gamma, lam=1.0)
    for t in range(5):  # Σ_{s ≥ t} γ^(s−t) r_s − V_t
        to_go = sum(gamma ** (s - t) * rewards[:, s] for s in range(t, 5))
        assert torch.allclose(advantages[:, t], to_go - values[:, t], atol=1e-5)
    advantages, _ = compute_gae(rewards, values, mask, gamma, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(2, 1)], 1)  # terminal after the last token
    assert torch.allclose(advantages, rewards + gamma * next_values - values, atol=1e-6)


def test_gae_masked_tail_contributes_nothing():
    rewards = torch.tensor([[0.2, 1.0, 55.0, -9.0]])  # garbage after the valid part
    values = torch.tensor([[0.5, 0.1, 77.0, 3.0]])
    mask = torch.tensor([[1, 1, 0, 0]])
    short_advantages, short_returns = compute_gae(rewards[:, :2], values[:, :2], torch.ones(1, 2), 0.99, 0.9)
    for gae in (compute_gae, compute_gae_vectorized):
        advantages, returns = gae(rewards, values, mask, 0.99, 0.9)
        assert torch.allclose(advantages[:, :2], short_advantages) and torch.allclose(returns[:, :2], short_returns)
        assert advantages[0, 2:].abs().sum() == 0 and returns[0, 2:].abs().sum() == 0
    # by hand: A_1 = 1.0 − 0.1 = 0.9; A_0 = 0.2 + 0.99·0.1 − 0.5 + 0.99·0.9·0.9
    assert short_advantages[0].tolist() == pytest.approx([0.2 + 0.099 - 0.5 + 0.99 * 0.9 * 0.9, 0.9], abs=1e-6)


def test_gae_loop_and_vectorized_agree_on_prefix_masks():
    torch.manual_seed(1)
    rewards, values = torch.randn(4, 7), torch.randn(4, 7)
    mask = (torch.arange(7)[None, :] < torch.tensor([[7], [3], [1], [5]])).long()
    for gamma, lam in ((1.0, 0.95), (0.9, 0.0), (0.99, 1.0)):
        loop, vectorized = compute_gae(rewards, values, mask, gamma, lam), compute_gae_vectorized(
            rewards, values, mask, gamma, lam)
        assert torch.allclose(loop[0], vectorized[0], atol=1e-5) and torch.allclose(loop[1], vectorized[1], atol=1e-5)


# ----------------------------------------------------------------------------- losses against hand values
def test_policy_loss_clips_outside_the_range_only():
    one = torch.ones(1, 1)
    old = torch.zeros(1, 1)
    # ratio 1.1 inside [0.8, 1.2], A = +1: −1.1, no clipping
    loss, stats = policy_loss(torch.full((1, 1), math.log(1.1)), old, one, one, 0.2)
    assert loss.item() == pytest.approx(-1.1) and stats["clip_frac"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(1.1)
    assert stats["approx_kl"] == pytest.approx(0.1 - math.log(1.1))
    # ratio 1.5, A = +1: the clipped term −1.2 is the larger; no gradient flows
    logprobs = torch.full((1, 1), math.log(1.5), requires_grad=True)
    loss, stats = policy_loss(logprobs, old, one, one, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-1.2) and stats["clip_frac"] == 1.0 and logprobs.grad.item() == 0.0
    # ratio 1.5, A = −1: the pessimistic bound keeps the unclipped 1.5 (and its gradient)
    logprobs = torch.full((1, 1), math.log(1.5), requires_grad=True)
    loss, stats = policy_loss(logprobs, old, -one, one, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(1.5) and stats["clip_frac"] == 0.0
    assert logprobs.grad.item() == pytest.approx(1.5)  # d(−A·e^x)/dx = 1.5
    # ratio 0.5, A = −1: clipped to 0.8 -> 0.8
    loss, stats = policy_loss(torch.full((1, 1), math.log(0.5)), old, -one, one, 0.2)
    assert loss.item() == pytest.approx(0.8) and stats["clip_frac"] == 1.0
    # averaged over valid tokens only: the masked token's huge ratio does not count
    loss, _ = policy_loss(torch.tensor([[math.log(1.1), 5.0]]), torch.zeros(1, 2), torch.ones(1, 2),
                          torch.tensor([[1, 0]]), 0.2)
    assert loss.item() == pytest.approx(-1.1)


def test_value_loss_clips_outside_the_range_only():
    old, returns, mask = torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1)
    loss, stats = value_loss(torch.full((1, 1), 0.1), old, returns, mask, 0.2)  # inside: ½·0.81
    assert loss.item() == pytest.approx(0.405) and stats["value_clip_frac"] == 0.0
    loss, stats = value_loss(torch.full((1, 1), 0.5), old, returns, mask, 0.2)  # V_clip = 0.2: ½·0.64 > ½·0.25
    assert loss.item() == pytest.approx(0.32) and stats["value_clip_frac"] == 1.0
    loss, stats = value_loss(torch.full((1, 1), -0.5), old, returns, mask, 0.2)  # V_clip = −0.2: 1.44 < 2.25
    assert loss.item() == pytest.approx(1.125) and stats["value_clip_frac"] == 0.0
    loss, _ = value_loss(torch.full((1, 1), 0.5), old, returns, mask, 0.0)  # 0 = unclipped: ½·0.25
    assert loss.item() == pytest.approx(0.125)


def test_entropy_bonus_of_uniform_and_one_hot():
    uniform = torch.zeros(1, 2, 8)
    one_hot = torch.full((1, 2, 8), -1e4)
    one_hot[..., 3] = 0
    assert entropy_bonus(uniform, torch.ones(1, 2)).item() == pytest.approx(math.log(8), abs=1e-6)
    assert entropy_bonus(one_hot, torch.ones(1, 2)).item() == pytest.approx(0.0, abs=1e-6)
    assert entropy_bonus(torch.cat([uniform[:, :1], one_hot[:, :1]], 1), torch.tensor([[0, 1]])).item() \
        == pytest.approx(0.0, abs=1e-6)


def test_explained_variance_perfect_and_mean_predictions():
    returns, mask = torch.tensor([[1.0, 2.0, 3.0, 99.0]]), torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.0), returns, mask) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- KL, whitening, controllers
def test_kl_estimators_hand_values_and_k3_never_negative():
    logprobs, ref_logprobs = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logprobs, ref_logprobs, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logprobs, ref_logprobs, "k3").item() == pytest.approx(-0.5 + math.log(2))  # r = 0.5
    assert kl_estimate(ref_logprobs, logprobs, "k1").item() == pytest.approx(-math.log(2))  # k1 can be negative
    assert kl_estimate(ref_logprobs, logprobs, "k3").item() == pytest.approx(1 - math.log(2))  # r = 2
    torch.manual_seed(0)
    assert (kl_estimate(torch.randn(1000) * 3, torch.randn(1000) * 3, "k3") >= 0).all()
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate(logprobs, ref_logprobs, "k2")


def test_both_kl_estimators_are_unbiased_on_samples():
    p, q = torch.tensor([0.5, 0.2, 0.2, 0.1]), torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for estimator in ("k1", "k3"):
        estimate = kl_estimate(p.log()[samples], q.log()[samples], estimator).mean().item()
        assert estimate == pytest.approx(exact, abs=0.01), estimator


def test_k1_in_the_reward_has_the_gradient_of_kl_and_k3_only_in_the_loss_on_an_exact_bandit():
    """One step, four tokens, every expectation summed exactly. A reward k(x) moves the policy along its score-function
    gradient g = Σ_x π(x)·k(x)·∇log π(x); k3 belongs in the loss, where the gradient goes through k3 itself."""
    probs = torch.tensor([0.1, 0.1, 0.1, 0.7], dtype=torch.float64)
    ref_logprobs = torch.full((4,), 0.25, dtype=torch.float64).log()  # the reference: uniform
    theta = probs.log().requires_grad_(True)  # the policy's logits
    tokens = torch.arange(4)

    def grad(objective):
        return torch.autograd.grad(objective, theta)[0]

    # by hand: KL = 0.3·log(0.4) + 0.7·log(2.8) = 0.44580; ∂KL/∂θ_i = π_i·(log(π_i/π_ref,i) − KL)
    kl = 0.3 * math.log(0.4) + 0.7 * math.log(2.8)
    true_kl_grad = probs * ((probs.log() - ref_logprobs) - kl)  # [-0.1362, -0.1362, -0.1362, 0.4086]
    assert true_kl_grad.tolist() == pytest.approx([-0.13622, -0.13622, -0.13622, 0.40866], abs=1e-4)

    def reward_gradient(estimator):  # the KL paid per token as a (negative) reward: E_π[k·∇log π]
        logprobs = F.log_softmax(theta, -1)
        penalty = kl_estimate(logprobs.detach(), ref_logprobs, estimator)[tokens]  # a number per token, no gradient
        return grad((logprobs.exp().detach() * penalty * logprobs).sum())

    k1, k3 = reward_gradient("k1"), reward_gradient("k3")
    assert torch.allclose(k1, true_kl_grad, atol=1e-12)
    # k3 in the reward: its value is unbiased, its gradient points the other way here (the penalty pushes π AWAY
    # from the reference): [0.0138, 0.0138, 0.0138, -0.0414]
    assert k3.tolist() == pytest.approx([0.01378, 0.01378, 0.01378, -0.04134], abs=1e-4)
    assert torch.dot(k3, true_kl_grad) < 0
    reverse_kl_grad = probs - ref_logprobs.exp()  # ∂KL(π_ref‖π)/∂θ = π − π_ref, by hand
    # k3 in the loss, expectation over tokens sampled from π: E_π[∇k3] = ∇KL(π_ref‖π) (0 at π = π_ref as well)
    logprobs = F.log_softmax(theta, -1)
    weights = logprobs.exp().detach()[None, :] * 4  # k3_kl_loss averages 4 tokens; weight each by 4·π(x)
    k3_loss = k3_kl_loss(logprobs[None, :], ref_logprobs[None, :], weights)
    assert torch.allclose(grad(k3_loss * weights.sum() / 4), reverse_kl_grad, atol=1e-12)
    with pytest.raises(ValueError, match="kl_estimator='k3' in the reward: only 'k1'"):
        make_experience(Rollout(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), torch.ones(1, 1),
                                torch.ones(1, dtype=torch.bool), 1), torch.zeros(1, 1), torch.zeros(1, 1),
                        torch.zeros(1, 1), torch.zeros(1), beta=0.1, kl_estimator="k3")


def test_masked_whitening_uses_valid_tokens_only():
    values = torch.tensor([[1.0, 2.0, 1000.0], [3.0, 6.0, -500.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    valid = torch.tensor([1.0, 2.0, 3.0, 6.0])
    whitened = masked_whiten(values, mask)
    expected = (valid - valid.mean()) / valid.std()  # std with Bessel's correction
    assert torch.allclose(whitened[mask.bool()], expected, atol=1e-5)
    assert whitened[~mask.bool()].abs().sum() == 0
    kept = masked_whiten(values, mask, shift_mean=False)
    assert kept[mask.bool()].mean().item() == pytest.approx(valid.mean().item(), abs=1e-5)
    one = torch.tensor([[4.0, 7.0]])
    assert torch.equal(masked_whiten(one, torch.tensor([[1, 0]])), one)  # 1 valid token: unchanged, no NaN


def test_leave_one_out_subtracts_the_mean_of_the_other_responses_to_the_same_prompt():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])  # two prompts, three responses each
    # 1 − (2+3)/2, 2 − (1+3)/2, 3 − (1+2)/2; a prompt whose responses all score alike teaches nothing
    assert leave_one_out(scores, 3).tolist() == [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]
    assert leave_one_out(torch.tensor([5.0, 1.0]), 2).tolist() == [4.0, -4.0]
    shifted = leave_one_out(scores + torch.tensor([10.0, 10.0, 10.0, -7.0, -7.0, -7.0]), 3)
    assert torch.equal(shifted, leave_one_out(scores, 3))  # what a prompt is worth cancels


def test_adaptive_controller_moves_beta_toward_the_target():
    controller = AdaptiveKLController(0.1, target=1.0, horizon=100)
    controller.update(kl=1.1, n_responses=10)  # e = 0.1 -> β·(1 + 0.01)
    assert controller.beta == pytest.approx(0.101)
    controller = AdaptiveKLController(0.1, target=1.0, horizon=100)
    controller.update(kl=5.0, n_responses=10)  # e clipped to +0.2
    assert controller.beta == pytest.approx(0.102)
    controller = AdaptiveKLController(0.1, target=1.0, horizon=100)
    controller.update(kl=0.2, n_responses=10)  # e clipped to −0.2: β falls when the KL is below target
    assert controller.beta == pytest.approx(0.098)
    fixed = FixedKLController(0.05)
    fixed.update(kl=100.0, n_responses=10)
    assert fixed.beta == 0.05


# ----------------------------------------------------------------------------- where the score goes
def test_response_is_cut_after_the_first_eos_and_the_score_lands_on_it():
    responses = torch.tensor([[5, 7, EOS, 9, EOS], [EOS, 4, 4, 4, 4], [5, 5, 5, 5, 5]])
    cut, mask, ended = cut_after_eos(responses, EOS, PAD)
    assert cut.tolist() == [[5, 7, EOS, PAD, PAD], [EOS, PAD, PAD, PAD, PAD], [5, 5, 5, 5, 5]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]
    scores = shape_scores(torch.tensor([2.0, -1.0, 0.5]), ended, missing_eos_penalty=1.0)
    assert scores.tolist() == [2.0, -1.0, -0.5]
    assert shape_scores(torch.tensor([9.0, -9.0]), torch.tensor([True, True]), score_clip=3.0).tolist() == [3.0, -3.0]
    rewards = compute_rewards(scores, torch.zeros(3, 5), mask, beta=0.1)
    assert rewards.tolist() == [[0, 0, 2.0, 0, 0], [-1.0, 0, 0, 0, 0], [0, 0, 0, 0, -0.5]]


def test_rollout_is_left_padded_cut_at_eos_and_samples_purely():
    policy = tiny_gpt(3)
    generated = rollout(policy, PROMPTS, 6, 1.0, EOS, PAD, torch.Generator().manual_seed(0))
    P = generated.prompt_length
    assert P == 6 and generated.input_ids.shape[0] == 3 and policy.training  # the mode is restored
    assert generated.attention_mask[:, :P].tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [1] * 6]
    assert torch.equal(generated.attention_mask[:, P:], generated.response_mask)
    assert torch.equal(generated.responses[generated.response_mask == 0],
                       torch.full_like(generated.responses[generated.response_mask == 0], PAD))
    # pure sampling: the same seed gives the same tokens as plain softmax sampling without the cache
    alone = rollout(policy, PROMPTS[:1], 6, 1.0, EOS, PAD, torch.Generator().manual_seed(0))
    expected = policy.eval().generate(torch.tensor(PROMPTS[:1]), 6, temperature=1.0, use_cache=False,
                                      generator=torch.Generator().manual_seed(0),
                                      banned_ids=reserved_ids_except_eos(EOS))[0, 4:]
    got = alone.responses[0][alone.response_mask[0].bool()]
    assert torch.equal(got, expected[:len(got)])


def pad_more(generated, left, right):
    """The same rollout with `left` more prompt pads and `right` more response pads."""
    input_ids = F.pad(generated.input_ids, (left, right), value=PAD)
    return Rollout(input_ids, F.pad(generated.attention_mask, (left, right)),
                   F.pad(generated.response_mask, (0, right)), generated.ended, generated.prompt_length + left,
                   generated.banned_ids)


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
def test_logprobs_values_and_scores_are_unchanged_by_extra_padding(attn_impl):
    policy, reference, critic, reward_model = tiny_setup(4)
    for model in (policy, reference, critic.backbone, reward_model.backbone):
        for block in model.blocks:
            block.attn.attn_impl = attn_impl
    generated = rollout(policy, PROMPTS, 8, 1.0, EOS, PAD, torch.Generator().manual_seed(1))
    padded = pad_more(generated, 3, 4)
    R = generated.response_mask.size(1)
    a = score_rollout(policy, reference, critic, generated, temperature=0.7)
    b = score_rollout(policy, reference, critic, padded, temperature=0.7)
    mask = generated.response_mask.bool()
    for key in ("logprobs", "ref_logprobs", "values", "entropy"):
        assert torch.allclose(a[key][mask], b[key][:, :R][mask], atol=1e-4), key
    assert torch.allclose(reward_scores(reward_model, generated), reward_scores(reward_model, padded), atol=1e-4)
    # each row alone, no padding at all: the reward is read at its eos (last real token)
    for row in range(3):
        n = int(generated.attention_mask[row].sum())
        alone = generated.input_ids[row][generated.attention_mask[row].bool()][None]  # (1, n)
        score = reward_model(alone, torch.ones(1, n, dtype=torch.long))
        assert score.item() == pytest.approx(reward_scores(reward_model, generated)[row].item(), abs=1e-4)


def test_critic_starts_as_the_reward_model_with_its_bias():
    _, _, critic, reward_model = tiny_setup(5)
    ids = torch.tensor([[2, 5, 6, 9, EOS]])
    mask = torch.ones_like(ids)
    assert critic(ids, mask)[0, -1].item() == pytest.approx(reward_model(ids, mask).item(), abs=1e-5)
    assert critic.backbone.lm_head.weight is critic.backbone.wte.weight  # still tied after the copy
    assert critic.backbone.wte.weight is not reward_model.backbone.wte.weight  # a separate network


def test_critic_of_a_reward_model_with_the_likelihood_feature_starts_equal_to_its_score_at_eos():
    reward_model = RewardModel(tiny_gpt(7), likelihood_weight=0.7)
    reward_model.reward_bias.fill_(0.3)
    critic = Critic.from_reward_model(reward_model)
    ids = torch.tensor([[PAD, 2, 5, 6, 9, 12, EOS], [2, 7, 11, 6, 10, EOS, PAD]])  # left- and right-padded
    mask = (ids != PAD).long()
    last = torch.tensor([6, 5])
    scores = reward_model(ids, mask)
    assert torch.allclose(critic(ids, mask)[torch.arange(2), last], scores, atol=1e-5)
    # the likelihood term matters here (w · mean log p ≈ 0.7 · −3): the same critic without it is far off
    plain = Critic(critic.backbone)
    plain.head.load_state_dict(critic.head.state_dict())
    assert (plain(ids, mask)[torch.arange(2), last] - scores).abs().min() > 1.0


def test_reserved_ids_are_never_sampled_even_when_their_logit_is_the_largest():
    """A GPT whose every position puts the largest logits on <|assistant|>, <|user|>, pad, bos... and less on eos and a
    word: only eos and the word come out, and the log-probs are those of the distribution without the banned ids."""
    policy = tiny_gpt(4, vocab_size=24)
    with torch.no_grad():  # final LayerNorm -> a constant vector of ones, so logits = Σ_c wte[token, c]
        policy.ln_f.weight.zero_()
        policy.ln_f.bias.fill_(1.0 / 32)
        policy.wte.weight.zero_()
        policy.wte.weight[list(reserved_ids_except_eos(EOS))] = 10.0  # logit 10
        policy.wte.weight[EOS] = 1.0  # logit 1
        policy.wte.weight[9] = 1.0  # logit 1; every other word 0
    generated = rollout(policy, PROMPTS * 4, 6, 1.0, EOS, PAD, torch.Generator().manual_seed(0))
    emitted = generated.responses[generated.response_mask.bool()]
    assert not torch.isin(emitted, torch.tensor(reserved_ids_except_eos(EOS))).any()
    assert (emitted == EOS).sum() > 0 and (emitted == 9).sum() > 0
    # scoring uses the same restricted distribution: p(eos) = e / (2e + 15)
    scored = score_rollout(policy, policy, None, generated, 1.0)
    eos_logprobs = scored["logprobs"][generated.responses == EOS]
    assert torch.allclose(eos_logprobs, torch.full_like(eos_logprobs, 1 - math.log(2 * math.e + 15)), atol=1e-5)
    assert torch.isfinite(scored["entropy"]).all()


# ----------------------------------------------------------------------------- the update
def experience_of(policy, reference, critic, reward_model, seed=0):
    generated = rollout(policy, PROMPTS * 2, 6, 1.0, EOS, PAD, torch.Generator().manual_seed(seed))
    scored = score_rollout(policy, reference, critic, generated, 1.0)
    scores = shape_scores(reward_scores(reward_model, generated), generated.ended, 1.0)
    experience = make_experience(generated, scored["logprobs"], scored["ref_logprobs"], scored["values"], scores,
                                 beta=0.05)
    return generated, experience


def test_first_minibatch_of_first_epoch_has_ratio_one_no_kl_and_no_clipping():
    policy, reference, critic, reward_model = tiny_setup(6)
    generated, experience = experience_of(policy, reference, critic, reward_model)
    rows = minibatches(6, 4, torch.Generator().manual_seed(0))[0]
    batch, part = select(experience, rows, generated.prompt_length)
    policy.train(), critic.train()
    _, _, stats = ppo_losses(policy, critic, batch, part, 1.0, 0.2, 0.2, 0.01)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert abs(stats["approx_kl"]) < 1e-6 and stats["clip_frac"] == 0.0 and stats["value_clip_frac"] == 0.0


def test_one_ppo_step_changes_both_policy_and_critic():
    policy, reference, critic, reward_model = tiny_setup(7)
    generated, experience = experience_of(policy, reference, critic, reward_model)
    before = [p.detach().clone() for p in list(policy.parameters()) + list(critic.parameters())]
    policy_optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=1e-3)
    batch, part = select(experience, torch.arange(6), generated.prompt_length)
    policy_objective, critic_loss, _ = ppo_losses(policy, critic, batch, part, 1.0)
    (policy_objective + critic_loss).backward()
    policy_optimizer.step(), critic_optimizer.step()
    n_policy = len(list(policy.parameters()))
    changed = [not torch.equal(b, p) for b, p in zip(before, list(policy.parameters()) + list(critic.parameters()))]
    assert any(changed[:n_policy]) and any(changed[n_policy:])
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), tiny_gpt(7).parameters()))  # frozen


def test_a_short_ppo_run_raises_a_hand_written_reward():
    """reward = the share of a target token in the response; a random tiny GPT learns to say it more."""
    target = 9
    policy, reference = tiny_gpt(8, vocab_size=16, n_layer=1), tiny_gpt(8, vocab_size=16, n_layer=1)
    critic = Critic(tiny_gpt(9, vocab_size=16, n_layer=1))
    policy_optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=3e-3)
    prompts = [[2, 4 + i % 5, 5] for i in range(16)]
    shares = []
    for iteration in range(12):
        generated = rollout(policy, prompts, 6, 1.0, None, PAD, torch.Generator().manual_seed(iteration))
        share = (generated.responses == target).float().mean(-1)  # (B,) the reward
        shares.append(share.mean().item())
        scored = score_rollout(policy, reference, critic, generated, 1.0)
        experience = make_experience(generated, scored["logprobs"], scored["ref_logprobs"], scored["values"],
                                     share, beta=0.0)
        for epoch in range(2):
            for rows in minibatches(16, 8, torch.Generator().manual_seed(100 * iteration + epoch)):
                batch, part = select(experience, rows, generated.prompt_length)
                policy_objective, critic_loss, _ = ppo_losses(policy, critic, batch, part, 1.0)
                (policy_objective + critic_loss).backward()
                for optimizer in (policy_optimizer, critic_optimizer):
                    optimizer.step()
                    optimizer.zero_grad()
    assert shares[0] < 0.15  # about 1/16 at the start
    assert sum(shares[-3:]) / 3 > 0.4, shares  # 0.07 -> 0.79 when written


def test_samples_of_a_resumed_run_replace_those_written_after_its_checkpoint(tmp_path):
    path = str(tmp_path / "samples.txt")
    for iteration in (0, 2, 4):  # a run evaluated at 0, 2 and 4, then crashed; its checkpoint is at iteration 2
        append_samples(path, iteration, [(f"question {iteration}", "old reply", 0.5, None)])
    append_samples(path, 2, [("question 2", "new reply", -0.25, 1.0)])  # the resumed run evaluates 2 again
    assert open(path, encoding="utf-8").read() == (
        "=== iteration 0: held-out prompts ===\nQ: question 0\nA: old reply\n   reward model +0.500\n"
        "=== iteration 2: held-out prompts ===\nQ: question 2\nA: new reply\n   reward model -0.250, gold 1.00\n")
    append_samples(path, 3, [("question 3", "reply", 0.0, None)])  # later evaluations append as usual
    assert open(path, encoding="utf-8").read().count("=== iteration") == 3
