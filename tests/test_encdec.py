import pytest
import torch

from nanollm.encdec import MASK_ID, EncoderDecoder, infill, infilling_batch
from nanollm.model import GPTConfig
from nanollm.tokenizer import BOS_ID, NUM_RESERVED, PAD_ID

V = 89


def tiny(**overrides):
    args = dict(vocab_size=V, block_size=40, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    args.update(overrides)
    torch.manual_seed(0)
    return EncoderDecoder(GPTConfig(**args))


def varied(model):
    """Larger random weights, so greedy decoding does not repeat one token (a stronger cache test)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def words(*shape, seed=0):
    return torch.randint(NUM_RESERVED, V, shape, generator=torch.Generator().manual_seed(seed))


def source_batch():
    """Two sources, the second right-padded (with arbitrary ids under the padding)."""
    src = words(2, 11)
    mask = torch.ones_like(src)
    mask[1, 7:] = 0
    return src, mask


def test_infilling_replaces_each_span_by_one_mask_and_covers_30_percent():
    generator = torch.Generator().manual_seed(0)
    run_lengths = []
    for _ in range(200):
        tokens = torch.arange(100, 200)  # distinct ids: the missing ones are exactly the covered ones
        corrupted = infill(tokens, generator)
        kept = set(corrupted.tolist()) - {MASK_ID}
        covered = [t not in kept for t in tokens.tolist()]
        assert sum(covered) == 30  # round(0.3 · 100)
        expected = []  # rebuild: every maximal run of covered tokens becomes one mask
        for i, token in enumerate(tokens.tolist()):
            if not covered[i]:
                expected.append(token)
            elif i == 0 or not covered[i - 1]:
                expected.append(MASK_ID)
                run_lengths.append(0)
            if covered[i]:
                run_lengths[-1] += 1
        assert corrupted.tolist() == expected
    mean_run = sum(run_lengths) / len(run_lengths)
    assert 2.7 < mean_run < 4.5  # Poisson(3) spans, at least 1 long, some merged, the last one cut to the budget


def test_infilling_batch_pads_sources_and_shifts_the_decoder_input():
    x = words(5, 20)
    batch = infilling_batch(x, torch.Generator().manual_seed(1))
    assert torch.equal(batch["targets"], x)
    assert torch.equal(batch["tgt"][:, 0], torch.full((5,), BOS_ID)) and torch.equal(batch["tgt"][:, 1:], x[:, :-1])
    src, mask = batch["src"], batch["src_attention_mask"]
    lengths = mask.sum(1)
    assert int(lengths.max()) == src.size(1) and (lengths <= 20).all()
    for row in range(5):
        assert (src[row, lengths[row]:] == PAD_ID).all() and (src[row, :lengths[row]] != PAD_ID).all()
        assert (mask[row, :lengths[row]] == 1).all()
        assert (src[row] == MASK_ID).any()


def test_decoder_is_causal_and_sees_the_whole_source():
    model = tiny().eval()
    src, tgt = words(2, 10), words(2, 12, seed=1)
    logits, _ = model(src, tgt)
    later_target = tgt.clone()
    later_target[:, 8] = (later_target[:, 8] + 1 - NUM_RESERVED) % (V - NUM_RESERVED) + NUM_RESERVED
    changed, _ = model(src, later_target)
    torch.testing.assert_close(changed[:, :8], logits[:, :8], rtol=0, atol=1e-6)  # decoder: no future
    assert (changed[:, 8:] - logits[:, 8:]).abs().max() > 1e-4
    last_source = src.clone()
    last_source[:, -1] = (last_source[:, -1] + 1 - NUM_RESERVED) % (V - NUM_RESERVED) + NUM_RESERVED
    changed, _ = model(last_source, tgt)
    assert (changed - logits).abs().amax(dim=-1).min() > 1e-5  # every decoder position sees all of the source
    memory, memory_changed = model.encode(src), model.encode(last_source)
    assert (memory - memory_changed)[:, :-1].abs().amax(dim=-1).min() > 1e-5  # encoder: sees the future


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
def test_cross_attention_ignores_padded_source_positions(attn_impl):
    model = tiny(attn_impl=attn_impl).eval()
    src, tgt = words(2, 9), words(2, 6, seed=1)
    padded = torch.cat([src, words(2, 4, seed=2)], dim=1)  # arbitrary ids under the padding
    mask = torch.cat([torch.ones(2, 9), torch.zeros(2, 4)], dim=1).long()
    torch.testing.assert_close(model(padded, tgt, src_attention_mask=mask)[0], model(src, tgt)[0],
                               rtol=1e-4, atol=1e-5)


def test_manual_and_sdpa_agree_forward_and_backward():
    manual, sdpa = tiny(attn_impl="manual"), tiny(attn_impl="sdpa")
    sdpa.load_state_dict(manual.state_dict())
    src, mask = source_batch()
    tgt = words(2, 8, seed=3)
    losses = [model(src, tgt, tgt, src_attention_mask=mask)[1] for model in (manual, sdpa)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, p_manual), p_sdpa in zip(manual.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(p_manual.grad, p_sdpa.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cached_decoding_per_step_logits_match_the_full_forward():
    model = varied(tiny())
    src, mask = source_batch()
    tgt = words(2, 12, seed=4)
    full, _ = model(src, tgt, src_attention_mask=mask)
    memory_kv = model.cross_keys_values(model.encode(src, mask))
    cache = model.new_kv_cache(2, 12)
    steps = [model.decode(tgt[:, :4], memory_kv, mask, kv_cache=cache)]  # 4 tokens, then one at a time
    steps += [model.decode(tgt[:, t:t + 1], memory_kv, mask, kv_cache=cache) for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
def test_cached_greedy_generation_equals_uncached(attn_impl):
    model = varied(tiny(attn_impl=attn_impl))
    src, mask = source_batch()
    cached = model.generate(src, 14, src_attention_mask=mask)
    uncached = model.generate(src, 14, src_attention_mask=mask, use_cache=False)
    assert cached.shape == (2, 15) and (cached[:, 0] == BOS_ID).all()
    assert len(set(cached[0, 1:].tolist())) > 3  # a varied sequence, not one repeated token
    assert torch.equal(cached, uncached)
    alone = model.generate(src[1:, :7], 14)  # padding changes nothing
    assert torch.equal(cached[1], alone[0])


def test_cross_attention_keys_values_are_computed_once_per_source():
    model = varied(tiny())
    calls = []
    for block in model.decoder_blocks:
        block.cross_attn.c_kv.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    src, mask = source_batch()
    model.generate(src, 15, src_attention_mask=mask)
    assert len(calls) == model.config.n_layer  # once per decoder layer, not once per step
    assert all(shape == (2, 11, 32) for shape in calls)
    calls.clear()
    model.generate(src, 15, src_attention_mask=mask, use_cache=False)
    assert len(calls) == 15 * model.config.n_layer  # the uncached reference recomputes them every step


def test_generation_stops_when_every_row_emitted_eos():
    model = varied(tiny())
    src, mask = source_batch()

    def sample(eos_id):  # the same random draws with and without eos: every step samples both rows
        return model.generate(src, 12, src_attention_mask=mask, temperature=1.0, eos_id=eos_id,
                              generator=torch.Generator().manual_seed(1))

    def first(row, token):  # step at which `row` of `free` first emits `token`
        return int((free[row, 1:] == token).nonzero()[0]) + 1

    free = sample(None)
    shared = set(free[0, 1:].tolist()) & set(free[1, 1:].tolist())
    eos = min(token for token in shared if first(0, token) < first(1, token))  # both rows emit it, row 0 first
    firsts = [first(0, eos), first(1, eos)]
    assert max(firsts) < 12  # the rows finish at different steps, both before the budget
    out = sample(eos)
    assert out.shape == (2, max(firsts) + 1)  # generation stops at the step where the last row finished
    for row in range(2):  # each row: unchanged up to its eos, then eos only
        assert torch.equal(out[row, :firsts[row] + 1], free[row, :firsts[row] + 1])
        assert (out[row, firsts[row]:] == eos).all()
    only_second = next(token for token in free[1, 1:].tolist() if token not in free[0, 1:].tolist())
    out = sample(only_second)  # one row never emits it: the budget is used, and that row is untouched
    assert out.shape == free.shape and torch.equal(out[0], free[0])
    assert (out[1, first(1, only_second):] == only_second).all()


def test_tiny_model_overfits_an_infilling_batch():
    model = tiny(n_layer=1)
    batch = infilling_batch(words(4, 16), torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        _, loss = model(**batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    model.eval()
    generated = model.generate(batch["src"], 16, src_attention_mask=batch["src_attention_mask"])
    assert torch.equal(generated[:, 1:], batch["targets"])  # the spans are filled back in


def test_target_longer_than_block_size_is_a_clear_error():
    model = tiny(block_size=8).eval()
    with pytest.raises(ValueError, match="block_size"):
        model.generate(words(1, 5), 8)
    with pytest.raises(ValueError, match="block_size"):
        model(words(1, 9), words(1, 4))
