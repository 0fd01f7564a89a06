"""Reward model: the reward lands on the last real token whatever the padding, dropout is off when scoring, each loss
against hand-computed values, the data formats and their errors, ranking metrics, and a separable toy set."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanollm.data import last_token_index, pad_sequences
from nanollm.loader import load_model
from nanollm.metrics import kendall_tau, pair_accuracy, pearson, ranking_metrics, spearman
from nanollm.model import GPT, GPTConfig
from nanollm.reward import (RewardModel, batch_loss, bradley_terry_loss, build_backbone, check_groups, dataset_loss,
                            encode_groups, encode_response, fit_reward_bias, get_reward_batch, load_groups,
                            make_batch, mse_loss, parse_record, ranking_loss,
                            response_logprob_mean, response_logprob_running_mean, score_encoded, split_by_prompt,
                            training_items)
from nanollm.tokenizer import Tokenizer, train_tokenizer
from nanollm.world import World

EOS, PAD = 3, 1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"{p.question} {p.answer}" for p in World(0).qa_pairs(0) if p.language == "en"]
    return Tokenizer(train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "rm"), vocab_size=400))


def tiny_reward_model(vocab_size=64, dropout=0.0, attn_impl="manual", seed=0, backbone="gpt", likelihood_weight=0.0):
    torch.manual_seed(seed)
    return RewardModel(build_backbone(backbone, dict(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2,
                                                     n_embd=32, dropout=dropout, attn_impl=attn_impl)),
                       likelihood_weight)


# ----------------------------------------------------------------------------- where the reward is read
def test_last_token_index_for_right_left_and_no_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


@pytest.mark.parametrize("backbone", ["gpt", "bert"])
@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
def test_reward_lands_on_eos_and_ignores_extra_left_or_right_padding(attn_impl, backbone):
    model = tiny_reward_model(attn_impl=attn_impl, backbone=backbone).eval()
    sequence = [2, 9, 17, 33, 12, 40, EOS]  # <s> ... </s>
    other = [2, 21, EOS]
    alone = model(torch.tensor([sequence]), torch.ones(1, len(sequence), dtype=torch.long))
    # the reference: the head on the hidden state at the eos position of an unpadded forward pass
    hidden = model.hidden_states(torch.tensor([sequence]), torch.ones(1, len(sequence), dtype=torch.long))
    assert torch.allclose(alone, model.head(hidden[:, -1]).squeeze(-1), atol=1e-6)
    other_alone = model(torch.tensor([other]), torch.ones(1, len(other), dtype=torch.long))
    for side in ("right", "left"):
        for extra in (0, 5):
            input_ids, mask = pad_sequences([sequence, other], PAD, side)
            input_ids = F.pad(input_ids, (extra, 0) if side == "left" else (0, extra), value=PAD)
            mask = F.pad(mask, (extra, 0) if side == "left" else (0, extra), value=0)
            rewards = model(input_ids, mask)
            assert torch.allclose(rewards, torch.cat([alone, other_alone]), atol=1e-5), (side, extra)
    one_past_eos = model(torch.tensor([sequence + [PAD]]), torch.ones(1, len(sequence) + 1, dtype=torch.long))
    assert not torch.allclose(one_past_eos, alone, atol=1e-4)  # a pad counted as real moves the reward


def test_hidden_states_are_the_gpt_forward_before_its_lm_head():
    model = tiny_reward_model().eval()
    idx = torch.tensor([[1, 1, 2, 30, 31, EOS], [2, 30, 31, EOS, 1, 1]])
    mask = (idx != PAD).long()
    logits, _ = model.backbone(idx, attention_mask=mask)
    hidden = model.hidden_states(idx, mask)
    assert torch.allclose(hidden @ model.backbone.wte.weight.T, logits, atol=1e-5)


ASSISTANT = 6  # the <|assistant|> role token: the response starts after its last occurrence


def test_likelihood_feature_is_the_mean_log_prob_of_the_response_tokens_whatever_the_padding():
    model = tiny_reward_model(likelihood_weight=1.5).eval()
    # <s> <|user|> 9 17 <|assistant|> 33 12 </s>: the response is 33 12 </s>; a second turn's ASSISTANT moves it
    sequence = [2, 5, 9, 17, ASSISTANT, 33, 12, EOS]
    two_turns = [2, 5, 9, ASSISTANT, 30, EOS, 5, 17, ASSISTANT, 40, EOS]
    rows = []
    for ids, start in ((sequence, 5), (two_turns, 9)):
        logits, _ = model.backbone(torch.tensor([ids]))  # (1, T, V) unpadded reference
        logprobs = F.log_softmax(logits[0, :-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]  # (T-1,)
        expected = logprobs[start - 1:].mean()  # the tokens at positions start .. T-1, each predicted from before it
        hidden = model.hidden_states(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        feature = response_logprob_mean(model.backbone, hidden, torch.tensor([ids]), torch.ones(1, len(ids)))
        assert feature.item() == pytest.approx(expected.item(), abs=1e-5)
        head = model.head(hidden[:, -1]).squeeze(-1)
        rows.append(model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)))
        assert rows[-1].item() == pytest.approx((head + 1.5 * expected).item(), abs=1e-5)  # r = w·h + b + w_lik·f
    for side in ("right", "left"):
        input_ids, mask = pad_sequences([sequence, two_turns], PAD, side)
        input_ids = F.pad(input_ids, (2, 0) if side == "left" else (0, 2), value=PAD)
        mask = F.pad(mask, (2, 0) if side == "left" else (0, 2), value=0)
        assert torch.allclose(model(input_ids, mask), torch.cat(rows), atol=1e-5), side


def test_likelihood_weight_is_learned_saved_and_refused_on_an_encoder(tmp_path):
    model = tiny_reward_model(likelihood_weight=1.0)
    idx = torch.tensor([[2, 5, 9, ASSISTANT, 33, 12, EOS]])
    model(idx, torch.ones_like(idx)).sum().backward()
    assert model.likelihood_weight.grad is not None and model.likelihood_weight.grad.item() != 0
    assert not hasattr(tiny_reward_model(), "likelihood_weight")  # off by default: the plain head
    torch.save({"model": model.state_dict(), "model_args": dict(model.backbone.config.__dict__), "stage": "reward",
                "likelihood_weight": 1.0, "config": {}}, tmp_path / "ckpt.pt")
    loaded = load_model(str(tmp_path / "ckpt.pt"), kinds=("reward",)).model
    assert torch.allclose(loaded(idx, torch.ones_like(idx)), model.eval()(idx, torch.ones_like(idx)), atol=1e-6)
    with pytest.raises(ValueError, match="causal trunk"):
        tiny_reward_model(backbone="bert", likelihood_weight=1.0)


def test_dropout_is_off_when_scoring_and_the_mode_is_restored():
    model = tiny_reward_model(dropout=0.5).train()
    idx = torch.tensor([[2, 9, 17, 33, EOS]])
    mask = torch.ones_like(idx)
    assert not torch.allclose(model(idx, mask), model(idx, mask))  # training mode: dropout on
    first, second = model.score(idx, mask), model.score(idx, mask)
    assert torch.equal(first, second) and model.training
    assert torch.equal(first, model.eval()(idx, mask))


# ----------------------------------------------------------------------------- losses, by hand
def test_bradley_terry_loss_hand_values():
    zero = torch.zeros(3)
    assert bradley_terry_loss(zero, zero).item() == pytest.approx(math.log(2))  # equal rewards: ln 2
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2  # −log σ(d) = log(1 + e^−d)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected)
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0).item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(torch.tensor([3.0]), torch.tensor([0.0]), margin=1.0).item() == \
        pytest.approx(math.log(1 + math.exp(-2)))


def test_mse_loss_hand_value():
    assert mse_loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 5.0])).item() == pytest.approx((1 + 4) / 2)


def test_ranking_loss_is_the_mean_of_the_pairwise_losses_over_all_pairs():
    rewards = torch.tensor([0.3, -1.2, 2.0, 0.7])
    pairs = [(i, j) for i in range(4) for j in range(4) if i < j]  # all 6 pairs; response i ranked above j
    better, worse = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    one_group = ranking_loss(rewards, better, worse, torch.zeros(6, dtype=torch.long))
    assert one_group.item() == pytest.approx(bradley_terry_loss(rewards[better], rewards[worse]).item())
    by_hand = sum(math.log(1 + math.exp(-(rewards[i] - rewards[j]).item())) for i, j in pairs) / 6
    assert one_group.item() == pytest.approx(by_hand)
    # two prompts with 3 and 1 pairs: the mean of the two prompt means, not the mean of the 4 pairs
    rewards = torch.tensor([2.0, 1.0, 0.0, 5.0, 5.0])
    loss = ranking_loss(rewards, torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4]), torch.tensor([0, 0, 0, 1]))
    first = (2 * math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 3
    assert loss.item() == pytest.approx((first + math.log(2)) / 2)


def test_the_ranking_loss_is_exactly_zero_gradient_free_on_no_response_outside_its_pairs():
    rewards = torch.tensor([1.0, 0.0, 4.0], requires_grad=True)
    ranking_loss(rewards, torch.tensor([0]), torch.tensor([1]), torch.tensor([0])).backward()
    assert rewards.grad[2].item() == 0.0 and rewards.grad[0].item() < 0 < rewards.grad[1].item()


# ----------------------------------------------------------------------------- data formats
def test_every_format_becomes_a_prompt_group_and_ties_make_no_pair():
    scores = parse_record({"input": "Q?", "outputs": [{"response": "a", "score": 2}, {"response": "b", "score": 4},
                                                      {"response": "c", "score": 2}]}, "f:1")
    assert scores.pairs == [(1, 0), (1, 2)] and scores.ties == 1 and scores.has_scores
    assert scores.prompt == [{"role": "user", "content": "Q?"}]
    pair = parse_record({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, "f:2")
    assert pair.responses == ["yes", "no"] and pair.pairs == [(0, 1)] and not pair.has_scores
    ranked = parse_record({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
                           "ranking": ["best", ["mid1", "mid2"], "worst"]}, "f:3")
    assert ranked.responses == ["best", "mid1", "mid2", "worst"]
    assert sorted(ranked.pairs) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)] and ranked.ties == 1
    assert ranked.prompt[0]["role"] == "system"


BAD_RECORDS = [
    ('{"prompt": "p", "response": "r"}', "matches no reward-data format; keys seen: \\['prompt', 'response'\\]"),
    ('{"input": "p", "outputs": [{"response": "a", "score": "high"}]}', "outputs\\[0\\].score must be a finite number"),
    ('{"input": "p", "outputs": [{"response": "a"}]}', "outputs\\[0\\] must have 'response' and 'score'"),
    ('{"input": "p", "outputs": []}', "'outputs' must be a non-empty list"),
    ('{"prompt": "p", "chosen": "same", "rejected": "same"}', "same text: a tie is not a preference"),
    ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "field 'chosen' must be a string"),
    ('{"prompt": "p", "ranking": ["only one"]}', "at least 2 places"),
    ('{"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}', "last message must be"),
    ('{"prompt": "p", "chosen": "a"', "malformed JSON"),
    ('["a", "b"]', "expected a JSON object"),
]


@pytest.mark.parametrize("line, message", BAD_RECORDS)
def test_a_malformed_record_names_its_file_and_line(tmp_path, line, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"prefs.jsonl:3: .*{message}"):
        load_groups(str(path))


def test_a_loss_the_data_cannot_train_is_refused_before_training(tmp_path):
    pairwise = [parse_record({"prompt": "p", "chosen": "a", "rejected": "b"}, "pairs.jsonl:1")]
    with pytest.raises(ValueError, match="pairs.jsonl:1: loss='mse' needs the scores format"):
        check_groups(pairwise, "mse")
    all_ties = [parse_record({"input": "p", "outputs": [{"response": "a", "score": 3}, {"response": "b", "score": 3}]},
                             "ties.jsonl:1")]
    with pytest.raises(ValueError, match="no pair with different scores"):
        check_groups(all_ties, "ranking")
    check_groups(all_ties, "mse")  # scores without pairs still train a regression
    with pytest.raises(ValueError, match="loss='hinge'"):
        check_groups(pairwise, "hinge")


def test_a_json_array_file_names_each_record_by_its_line(tmp_path):
    path = tmp_path / "ranked.json"
    path.write_text('[\n {"prompt": "q1", "ranking": ["a", "b"]},\n\n'
                    ' {"prompt": "q2", "ranking": [["a", "b"], "c"]}\n]\n')
    groups = load_groups(str(path))
    assert [g.source for g in groups] == [f"{path}:2", f"{path}:4"]
    assert groups[1].pairs == [(0, 2), (1, 2)] and groups[1].ties == 1


def test_encoding_ends_on_eos_and_truncation_keeps_it(tokenizer):
    prompt = [{"role": "user", "content": "What is 2 plus 3?"}]
    ids, cut = encode_response(tokenizer, prompt, "2 plus 3 is 5.", block_size=64)
    assert ids[-1] == tokenizer.eos_id and ids[0] == tokenizer.bos_id and tokenizer.assistant_id in ids and not cut
    short, cut = encode_response(tokenizer, prompt, "2 plus 3 is 5.", block_size=8)
    assert cut and len(short) == 8 and short == ids[-8:] and short[-1] == tokenizer.eos_id


def test_a_ranking_batch_forwards_each_response_once():
    scored = [{"response": r, "score": s} for r, s in zip("abcd", [4, 3, 3, 1])]
    groups = [parse_record({"input": "p", "outputs": scored}, "f:1"),
              parse_record({"prompt": "q", "chosen": "x", "rejected": "y"}, "f:2")]
    encoded = [[[2, 10 + i, EOS] for i in range(len(g.responses))] for g in groups]
    batch = make_batch(groups, encoded, [0, 1], "ranking", PAD)
    assert batch.input_ids.shape[0] == 6  # 4 + 2 responses, each once
    assert len(batch.better) == 5 + 1 and batch.group.tolist() == [0] * 5 + [1]
    pairwise = make_batch(groups, encoded, [(0, 0), (1, 0)], "pairwise", PAD)
    assert pairwise.input_ids.shape[0] == 4 and pairwise.better.tolist() == [0, 2] and pairwise.worse.tolist() == [1, 3]
    assert training_items(groups, "mse")[:2] == [(0, 0), (0, 1)] and len(training_items(groups, "pairwise")) == 6


# ----------------------------------------------------------------------------- metrics
def test_rank_correlations_hand_values():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 − 6·Σd² / (n(n²−1)) = 1 − 12/60
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    assert kendall_tau([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(5 * 6))  # tau-b with one tie
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))  # average ranks
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_pair_accuracy_counts_equal_rewards_half_and_skips_tied_preferences():
    accuracy, pairs = pair_accuracy([[3.0, 1.0, 1.0], [0.0, 0.0]], [[2.0, 1.0, 1.0], [5.0, 1.0]])
    assert pairs == 3 and accuracy == pytest.approx((1 + 1 + 0.5) / 3)
    kept = pair_accuracy([[3.0, 1.0, 1.0]], [[2.0, 1.0, 0.0]], keep=lambda g, i, j: j == 2)  # pairs (0, 2), (1, 2)
    assert kept == (0.75, 2)
    metrics = ranking_metrics([[3.0, 2.0, 1.0]], [[1.0, 2.0, 3.0]], "val_")
    assert metrics["val_pair_acc"] == 0.0 and metrics["val_kendall"] == -1.0 and metrics["val_spearman"] == -1.0


def test_dataset_loss_matches_the_batch_loss(tokenizer):
    groups = [parse_record({"input": "p", "outputs": [{"response": "a", "score": 3}, {"response": "b", "score": 1},
                                                      {"response": "c", "score": 2}]}, "f:1"),
              parse_record({"input": "q", "outputs": [{"response": "d", "score": 1}, {"response": "e", "score": 5}]},
                           "f:2")]
    rewards = [[0.5, -0.5, 1.0], [2.0, 0.0]]
    flat = torch.tensor([0.5, -0.5, 1.0, 2.0, 0.0])
    encoded = [[[2, EOS]] * 3, [[2, EOS]] * 2]
    for loss in ("ranking", "pairwise", "mse"):
        items = training_items(groups, loss)
        batch = make_batch(groups, encoded, items, loss, PAD)
        batch_rewards = flat if loss != "pairwise" else flat[torch.tensor([0, 1, 0, 2, 2, 1, 4, 3])]  # chosen, rejected
        assert dataset_loss(rewards, groups, loss) == pytest.approx(batch_loss(batch_rewards, batch, loss).item())


# ----------------------------------------------------------------------------- training end to end
def toy_groups(count, start):
    """A separable set: the right sum is always preferred to 'I do not know.'"""
    return [parse_record({"prompt": f"What is {a} plus {a + 1}?", "chosen": f"{a} plus {a + 1} is {2 * a + 1}.",
                          "rejected": "I do not know."}, f"toy:{a}") for a in range(start, start + count)]


def test_a_separable_toy_set_reaches_full_pairwise_accuracy(tokenizer):
    train, held_out = toy_groups(30, 0), toy_groups(20, 50)
    train_encoded, _ = encode_groups(tokenizer, train, 64)
    held_encoded, _ = encode_groups(tokenizer, held_out, 64)
    torch.manual_seed(0)
    model = RewardModel(GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    items = training_items(train, "pairwise")
    for step in range(40):
        batch = get_reward_batch(train, train_encoded, items, "pairwise", 8, tokenizer.pad_id, seed=0, step=step,
                                 micro_step=0)
        loss = batch_loss(model(batch.input_ids, batch.attention_mask), batch, "pairwise")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rewards = score_encoded(model, held_encoded, tokenizer.pad_id, 16, "cpu", torch.no_grad())
    assert pair_accuracy(rewards, [g.preference for g in held_out]) == (1.0, 20)


def test_the_fitted_bias_centres_the_rewards_and_is_saved(tokenizer):
    groups = toy_groups(6, 0)
    encoded, _ = encode_groups(tokenizer, groups, 64)
    torch.manual_seed(0)
    model = RewardModel(GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)))
    before = score_encoded(model, encoded, tokenizer.pad_id, 4, "cpu", torch.no_grad())
    bias = fit_reward_bias(model, encoded, tokenizer.pad_id, 4, "cpu", torch.no_grad())
    after = score_encoded(model, encoded, tokenizer.pad_id, 4, "cpu", torch.no_grad())
    flat_before, flat_after = sum(before, []), sum(after, [])
    assert bias == pytest.approx(-sum(flat_before) / len(flat_before), abs=1e-5)
    assert sum(flat_after) / len(flat_after) == pytest.approx(0.0, abs=1e-5)
    assert [a - b for a, b in zip(flat_after, flat_before)] == pytest.approx([bias] * len(flat_after), abs=1e-5)
    assert model.state_dict()["reward_bias"].item() == pytest.approx(bias)


def test_running_mean_of_response_logprobs_is_the_prefix_mean_and_ends_at_the_whole_mean():
    model = tiny_reward_model(likelihood_weight=1.0).eval()
    idx = torch.tensor([[2, 5, 9, ASSISTANT, 33, 12, 40, EOS]])
    mask = torch.ones_like(idx)
    with torch.no_grad():
        hidden = model.hidden_states(idx, mask)
        running = response_logprob_running_mean(model.backbone, hidden, idx, mask)[0]  # (T,)
        logits, _ = model.backbone(idx)  # a plain forward: position t predicts token t + 1
    logprobs = F.log_softmax(logits[0].float(), -1)
    response = [logprobs[t - 1, idx[0, t]].item() for t in range(4, 8)]  # tokens after <|assistant|>, eos included
    assert running[:4].tolist() == [0.0] * 4  # before the response: nothing to average
    for t in range(4, 8):
        assert running[t].item() == pytest.approx(sum(response[:t - 3]) / (t - 3), abs=1e-5)
    assert response_logprob_mean(model.backbone, hidden, idx, mask).item() == pytest.approx(running[-1].item())


def test_a_custom_dataset_is_split_by_prompt_so_no_prompt_is_on_both_sides():
    records = [{"prompt": p, "chosen": "yes", "rejected": r} for p in ("a?", "b?", "c?", "d?") for r in ("no", "nah")]
    records.insert(1, {"prompt": "d?", "chosen": "sure", "rejected": "no"})  # a prompt may come back later in a file
    groups = [parse_record(record, f"f.jsonl:{line}") for line, record in enumerate(records, 1)]
    # prompts in order of first appearance: a?, d?, b?, c?; a quarter of them is c? (the last 25% of the records
    # would be d?'s last two pairs, while its first pair trains)
    train, held_out = split_by_prompt(groups, 0.25)
    assert [g.source for g in held_out] == ["f.jsonl:6", "f.jsonl:7"]
    assert [g.source for g in train if g.prompt[0]["content"] == "d?"] == ["f.jsonl:2", "f.jsonl:8", "f.jsonl:9"]
    train, held_out = split_by_prompt(groups, 0.5)
    assert {g.prompt[0]["content"] for g in held_out} == {"b?", "c?"} and len(train) == 5


@pytest.mark.parametrize("tied", [True, False])
def test_an_untied_lm_head_no_loss_reads_is_frozen_in_the_reward_model_and_the_critic(tied):
    from nanollm.ppo import Critic

    def trunk():
        return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, tie_embeddings=tied))

    for model in (RewardModel(trunk()), Critic(trunk())):
        assert model.backbone.lm_head.weight.requires_grad == tied  # tied: it is the token embedding, trained
        assert model.backbone.wte.weight.requires_grad
    for model in (RewardModel(trunk(), likelihood_weight=1.0), Critic(trunk(), likelihood=True)):
        assert model.backbone.lm_head.weight.requires_grad  # the likelihood feature reads the head
    idx = torch.randint(4, 50, (3, 8))
    reward_model = RewardModel(trunk())
    reward_model(idx, torch.ones_like(idx)).sum().backward()  # every trainable parameter gets a gradient (DDP's need)
    assert all(p.grad is not None for p in reward_model.parameters() if p.requires_grad)
