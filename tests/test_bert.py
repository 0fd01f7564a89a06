import pytest
import torch
import torch.nn.functional as F

from nanollm.bert import BERT, MASK_ID, BertConfig, fill_mask, mask_tokens, mlm_accuracy
from nanollm.tokenizer import NUM_RESERVED

V = 97


def tiny(**overrides):
    args = dict(vocab_size=V, block_size=40, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    args.update(overrides)
    torch.manual_seed(0)
    return BERT(BertConfig(**args))


def words(*shape, seed=0):
    """Random non-special token ids."""
    return torch.randint(NUM_RESERVED, V, shape, generator=torch.Generator().manual_seed(seed))


def test_mlm_masking_statistics_are_15_percent_then_80_10_10():
    idx = torch.randint(NUM_RESERVED, 1000, (64, 512), generator=torch.Generator().manual_seed(0))  # 32,768 tokens
    idx[:, ::16] = 3  # </s> and <s> are special: never selected
    idx[:, 1::16] = 2
    inputs, targets = mask_tokens(idx, 1000, torch.Generator().manual_seed(1))
    selected = targets != -100
    special = idx < NUM_RESERVED
    assert not (selected & special).any()
    assert selected.float().sum() / (~special).sum() == pytest.approx(0.15, abs=0.006)  # ~5 sigma
    assert torch.equal(targets[selected], idx[selected])  # targets are the original tokens
    assert torch.equal(inputs[~selected], idx[~selected])  # unselected tokens are untouched
    n = selected.sum()
    masked = (inputs == MASK_ID) & selected
    replaced = (inputs != MASK_ID) & (inputs != idx) & selected
    kept = (inputs == idx) & selected
    assert masked.sum() / n == pytest.approx(0.8, abs=0.03)
    assert replaced.sum() / n == pytest.approx(0.1 * (1 - 1 / 992), abs=0.025)  # a random draw may hit the original
    assert kept.sum() / n == pytest.approx(0.1 + 0.1 / 992, abs=0.025)
    assert (inputs[replaced] >= NUM_RESERVED).all()  # random replacements are ordinary tokens


def test_masking_is_a_pure_function_of_the_generator():
    idx = words(4, 30)
    first = mask_tokens(idx, V, torch.Generator().manual_seed(5))
    second = mask_tokens(idx, V, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_loss_is_taken_only_at_selected_positions():
    model = tiny().eval()
    inputs, targets = mask_tokens(words(3, 30), V, torch.Generator().manual_seed(2))
    logits, loss = model(inputs, targets)
    selected = targets != -100
    expected = F.cross_entropy(logits[selected], targets[selected])
    torch.testing.assert_close(loss, expected)
    logits.retain_grad()
    loss.backward()
    assert logits.grad[~selected].abs().max() == 0 and logits.grad[selected].abs().max() > 0
    _, no_loss = model(inputs, torch.full_like(targets, -100))  # nothing selected: 0, not NaN
    assert no_loss.item() == 0.0


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
def test_changing_a_later_token_changes_earlier_outputs(attn_impl):
    model = tiny(attn_impl=attn_impl).eval()
    idx = words(2, 20)
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1 - NUM_RESERVED) % (V - NUM_RESERVED) + NUM_RESERVED
    before = model.encode(idx)
    after = model.encode(changed)
    assert (before[:, :15] - after[:, :15]).abs().amax(dim=-1).min() > 1e-5  # every earlier position sees it


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_extra_padding_leaves_real_token_outputs_unchanged(attn_impl, side):
    model = tiny(attn_impl=attn_impl, n_classes=3).eval()
    idx = words(2, 12)
    garbage = words(2, 5, seed=9)  # padding positions hold arbitrary ids: only the mask may hide them
    padded = torch.cat([idx, garbage], 1) if side == "right" else torch.cat([garbage, idx], 1)
    real = slice(0, 12) if side == "right" else slice(5, 17)
    mask = torch.zeros_like(padded)
    mask[:, real] = 1
    plain, _ = model(idx)
    with_padding, _ = model(padded, attention_mask=mask)
    torch.testing.assert_close(with_padding[:, real], plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.classify(padded, attention_mask=mask)[0], model.classify(idx)[0],
                               rtol=1e-4, atol=1e-5)


def test_manual_and_sdpa_agree_with_padding_and_segments():
    manual, sdpa = tiny(attn_impl="manual"), tiny(attn_impl="sdpa")
    sdpa.load_state_dict(manual.state_dict())
    idx, mask = words(3, 16), torch.ones(3, 16, dtype=torch.long)
    mask[0, 10:] = 0
    segments = (torch.arange(16) >= 8).long().expand(3, 16)
    torch.testing.assert_close(manual(idx, attention_mask=mask, segment_ids=segments)[0],
                               sdpa(idx, attention_mask=mask, segment_ids=segments)[0], rtol=1e-4, atol=1e-5)


def test_segment_embeddings_change_the_output():
    model = tiny().eval()
    idx = words(1, 10)
    segments = torch.tensor([[0] * 5 + [1] * 5])
    assert (model.encode(idx) - model.encode(idx, segment_ids=segments))[:, 5:].abs().max() > 1e-4


def test_pooled_output_reads_the_first_real_token():
    model = tiny(n_classes=2).eval()
    idx = words(2, 8)
    hidden = model.encode(idx)
    mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    expected = torch.tanh(model.pooler(torch.stack([hidden[0, 0], hidden[1, 3]])))
    torch.testing.assert_close(model.pooled_output(hidden, mask), expected)


def test_mlm_overfits_one_batch_and_fill_mask_recovers_the_tokens():
    model = tiny(n_layer=1)
    idx = words(4, 16)
    inputs, targets = mask_tokens(idx, V, torch.Generator().manual_seed(3), mlm_probability=0.3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        logits, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    model.eval()
    assert mlm_accuracy(model(inputs)[0], targets) == 1.0
    filled = fill_mask(model, inputs)
    masked = inputs == MASK_ID
    assert masked.any() and torch.equal(filled[masked], idx[masked])


def test_classifier_overfits_a_small_batch():
    model = tiny(n_layer=1, n_classes=3)
    idx = words(6, 10)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(30):
        _, loss = model.classify(idx, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_mlm_accuracy_counts_selected_positions_only():
    logits = torch.zeros(1, 4, 5)
    logits[0, torch.arange(4), torch.tensor([1, 2, 3, 4])] = 1.0  # predictions 1, 2, 3, 4
    targets = torch.tensor([[1, -100, 0, 4]])  # right, ignored, wrong, right
    assert mlm_accuracy(logits, targets) == pytest.approx(2 / 3)


def test_pretrained_encoder_loads_into_a_classifier():
    pretrained = tiny()
    classifier = tiny(n_classes=2)
    classifier.load_pretrained_encoder(pretrained.state_dict())
    idx = words(2, 9)
    torch.testing.assert_close(classifier.encode(idx), pretrained.encode(idx))
    state = pretrained.state_dict()
    state.pop("mlm_dense.weight")
    with pytest.raises(ValueError, match="mlm_dense.weight"):
        classifier.load_pretrained_encoder(state)


def test_post_ln_bert_normalizes_embeddings_and_has_no_final_norm():
    model = tiny(norm_position="post")
    assert isinstance(model.embeddings.ln, torch.nn.LayerNorm) and isinstance(model.ln_f, torch.nn.Identity)
    hidden = model.eval().encode(words(2, 7))
    torch.testing.assert_close(hidden.mean(-1), torch.zeros(2, 7), atol=1e-5, rtol=0)  # ends in a LayerNorm
