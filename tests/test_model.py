import math

import pytest
import torch
import torch.nn.functional as F

from nanollm.model import GPT, Block, GPTConfig, attend, attention_mask_matrix, sample_next_token


def tiny(**overrides):
    args = dict(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    args.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(attn_impl):
    model = tiny(attn_impl=attn_impl).eval()
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 97
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[:, :12], logits_changed[:, :12], rtol=0, atol=1e-6)
    assert (logits[:, 12:] - logits_changed[:, 12:]).abs().max() > 1e-4  # the change is visible later


def test_manual_and_sdpa_attention_agree_forward_and_backward():
    manual, sdpa = tiny(attn_impl="manual"), tiny(attn_impl="sdpa")
    sdpa.load_state_dict(manual.state_dict())
    idx = torch.randint(0, 97, (3, 17))
    _, loss_manual = manual(idx, idx)
    _, loss_sdpa = sdpa(idx, idx)
    loss_manual.backward()
    loss_sdpa.backward()
    torch.testing.assert_close(loss_manual, loss_sdpa, rtol=1e-5, atol=1e-6)
    for (name, p_manual), p_sdpa in zip(manual.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(p_manual.grad, p_sdpa.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
def test_kv_cache_per_step_logits_match_full_forward(attn_impl):
    model = tiny(attn_impl=attn_impl).eval()
    idx = torch.randint(0, 97, (2, 16))
    full_logits, _ = model(idx)
    cache = model.new_kv_cache(2, 16)
    prefix_logits, _ = model(idx[:, :5], kv_cache=cache)  # a 5-token prompt, then one token at a time
    step_logits = [prefix_logits]
    for t in range(5, 16):
        logits, _ = model(idx[:, t:t + 1], kv_cache=cache)
        step_logits.append(logits)
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full_logits, rtol=1e-4, atol=1e-5)
    assert cache.length == 16


def test_greedy_generation_with_and_without_cache_is_identical():
    model = tiny().eval()
    prompt = torch.randint(0, 97, (3, 6))
    with_cache = model.generate(prompt, 30, temperature=0, use_cache=True)
    without_cache = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert with_cache.shape == (3, 36)
    assert torch.equal(with_cache, without_cache)


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny().eval()
    short, long = torch.randint(0, 97, (1, 3)), torch.randint(0, 97, (1, 7))
    pad = 0
    batch = torch.cat([torch.cat([torch.full((1, 4), pad), short], dim=1), long])  # (2, 7), row 0 left-padded
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    together = model.generate(batch, 12, temperature=0, attention_mask=mask)
    alone_short = model.generate(short, 12, temperature=0)
    alone_long = model.generate(long, 12, temperature=0)
    assert torch.equal(together[0, 7:], alone_short[0, 3:])
    assert torch.equal(together[1, 7:], alone_long[0, 7:])


def test_generation_stops_at_eos_and_pads_finished_rows_with_eos():
    model = tiny().eval()
    prompt = torch.randint(0, 97, (2, 4))
    free = model.generate(prompt, 10, temperature=0)
    eos = int(free[0, 6])  # make row 0's third generated token the eos
    out = model.generate(prompt, 10, temperature=0, eos_id=eos)
    assert torch.equal(out[0, :7], free[0, :7])
    assert (out[0, 7:] == eos).all()
    assert not (free[1, 4:] == eos).any()  # the setup (seeded): row 1 never emits it
    assert out.size(1) == 14 and torch.equal(out[1], free[1])  # so it runs to the budget, untouched


def test_generation_beyond_block_size_is_a_clear_error():
    model = tiny(block_size=8).eval()
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.zeros(1, 5, dtype=torch.long), 4)


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    top_k_draws = {int(sample_next_token(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert top_k_draws == {0, 1}
    # nucleus: 0.5 < 0.7, 0.5+0.3 >= 0.7 -> keep {0, 1}; token 2 starts after 0.8 of mass already
    top_p_draws = {int(sample_next_token(logits, 1.0, top_p=0.7, generator=gen)) for _ in range(200)}
    assert top_p_draws == {0, 1}
    assert int(sample_next_token(logits, 0.0)) == 0  # greedy


@pytest.mark.parametrize("init, expected_var", [
    ("xavier", lambda fan_in, fan_out: 2.0 / (fan_in + fan_out)),  # Glorot & Bengio 2010
    ("he", lambda fan_in, fan_out: 2.0 / fan_in),  # He et al. 2015
    ("normal", lambda fan_in, fan_out: 0.02 ** 2),  # GPT-2 (non-residual layers)
])
def test_init_statistics(init, expected_var):
    model = tiny(init=init, n_embd=128, n_head=4)
    weight = model.blocks[0].mlp.c_fc.weight  # (512, 128): fan_out 512, fan_in 128
    fan_out, fan_in = weight.shape
    assert weight.mean().abs() < 0.01 * math.sqrt(expected_var(fan_in, fan_out)) + 1e-3
    assert weight.var().item() == pytest.approx(expected_var(fan_in, fan_out), rel=0.05)
    assert model.blocks[0].mlp.c_fc.bias.abs().max() == 0
    assert torch.equal(model.blocks[0].ln_1.weight, torch.ones(128))


def test_normal_init_scales_residual_projections():
    model = tiny(init="normal", n_embd=128, n_layer=8)
    std = model.blocks[0].mlp.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)


def test_loss_at_init_is_close_to_ln_vocab():
    model = tiny(vocab_size=500)
    idx = torch.randint(0, 500, (8, 32))
    targets = torch.randint(0, 500, (8, 32))
    _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(500), abs=0.1)


def test_tiny_model_overfits_one_batch():
    model = tiny()
    idx = torch.randint(0, 97, (4, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_weights_are_tied_and_parameters_counted_once():
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    c = model.config
    per_block = (3 * c.n_embd * c.n_embd + 3 * c.n_embd) + (c.n_embd * c.n_embd + c.n_embd) \
        + (4 * c.n_embd * c.n_embd + 4 * c.n_embd) + (4 * c.n_embd * c.n_embd + c.n_embd) + 4 * c.n_embd
    expected = c.vocab_size * c.n_embd + c.block_size * c.n_embd + c.n_layer * per_block + 2 * c.n_embd
    assert model.num_parameters() == expected


def test_ignored_targets_do_not_count_in_the_loss():
    model = tiny().eval()
    idx = torch.randint(0, 97, (2, 10))
    targets = idx.clone()
    targets[:, :5] = -100
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 97), idx[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="attn_impl"):
        GPTConfig(attn_impl="fast")


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
def test_packed_examples_do_not_attend_across_each_other(attn_impl):
    model = tiny(attn_impl=attn_impl).eval()
    first, second = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 9))
    packed = torch.cat([first, second], dim=1)  # (1, 16)
    segment_ids = torch.tensor([[0] * 7 + [1] * 9])
    position_ids = torch.cat([torch.arange(7), torch.arange(9)])[None]  # positions restart per example
    logits, _ = model(packed, segment_ids=segment_ids, position_ids=position_ids)
    alone_first, _ = model(first)
    alone_second, _ = model(second)
    torch.testing.assert_close(logits, torch.cat([alone_first, alone_second], dim=1), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- shared blocks (BERT, encoder-decoder)
def test_mask_matrix_for_bidirectional_and_cross_attention_by_hand():
    padding = torch.tensor([[True, True, False]])
    bidirectional = attention_mask_matrix(padding, 3, 3, "cpu", causal=False)[0, 0]
    # real queries see both real keys; the padding query (row 2) also sees itself so softmax is never 0/0
    assert bidirectional.tolist() == [[True, True, False], [True, True, False], [True, True, True]]
    cross = attention_mask_matrix(padding, 2, 3, "cpu", causal=False, self_attention=False)[0, 0]
    assert cross.tolist() == [[True, True, False], [True, True, False]]  # no diagonal across two sequences
    causal = attention_mask_matrix(None, 2, 4, "cpu")[0, 0]  # decoding: the last 2 of 4 positions
    assert causal.tolist() == [[True, True, True, False], [True, True, True, True]]


def _qkv(t_query, t_key, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, t_query, 8, generator=generator)
    k, v = torch.randn(2, 2, t_key, 8, generator=generator), torch.randn(2, 2, t_key, 8, generator=generator)
    padding = torch.ones(2, t_key, dtype=torch.bool)
    padding[1, t_key - 3:] = False
    return q, k, v, padding


def _plain_attention(q, k, v, allowed):
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa", "triton"])
def test_bidirectional_and_cross_attention_paths_match_a_plain_reference(attn_impl):
    from kernels import kernel_device

    device = kernel_device() if attn_impl == "triton" else "cpu"  # compiled Triton kernels need CUDA tensors
    q, k, v, padding = (t.to(device) for t in _qkv(9, 9))
    allowed = padding[:, None, None, :].expand(2, 1, 9, 9)
    out = attend(q, k, v, attn_impl, causal=False, key_padding_mask=padding)
    real = torch.tensor([[True] * 9, [True] * 6 + [False] * 3], device=device)  # padding queries: ignored
    torch.testing.assert_close(out.transpose(1, 2)[real], _plain_attention(q, k, v, allowed).transpose(1, 2)[real],
                               rtol=1e-4, atol=1e-5)
    q, k, v, padding = (t.to(device) for t in _qkv(5, 11, seed=1))  # cross-attention: 5 queries, 11 keys
    out = attend(q, k, v, attn_impl, causal=False, key_padding_mask=padding, self_attention=False)
    torch.testing.assert_close(out, _plain_attention(q, k, v, padding[:, None, None, :].expand(2, 1, 5, 11)),
                               rtol=1e-4, atol=1e-5)


def test_post_ln_block_computes_layer_norm_after_each_residual():
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16, norm_position="post")
    torch.manual_seed(0)
    block = Block(config, causal=True).eval()
    x = torch.randn(2, 8, 16)
    h = block.ln_1(x + block.attn(x))  # LN(x + Attn(x)) (Vaswani et al. 2017)
    torch.testing.assert_close(block(x), block.ln_2(h + block.mlp(h)))
    pre = Block(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16), causal=True).eval()
    pre.load_state_dict(block.state_dict())
    h = x + pre.attn(pre.ln_1(x))  # x + Attn(LN(x)) (GPT-2)
    torch.testing.assert_close(pre(x), h + pre.mlp(pre.ln_2(h)))
    assert isinstance(GPT(config).ln_f, torch.nn.Identity)  # post-LN stacks end normalized already



@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_stream_yields_the_tokens_of_a_plain_greedy_loop(use_cache):
    """The reference: run the whole sequence through the model for every token, append the argmax, one at a time."""
    model = tiny().eval()
    prompt = torch.randint(0, 97, (2, 5))
    sequence = prompt
    with torch.no_grad():
        for _ in range(9):
            logits, _ = model(sequence)  # (2, T, V)
            sequence = torch.cat([sequence, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    stream = model.generate_stream(prompt, 9, temperature=0, use_cache=use_cache)
    first = next(stream)  # a generator: the first token arrives before the rest are computed
    assert first.shape == (2,) and torch.equal(first, sequence[:, 5])
    streamed = torch.stack([first] + list(stream), dim=1)  # (2, 9)
    assert torch.equal(streamed, sequence[:, 5:])


def test_all_ignored_targets_give_zero_loss_and_no_gradient_not_nan():
    model = tiny()
    idx = torch.randint(0, 97, (2, 10))
    _, loss = model(idx, torch.full((2, 10), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_cached_generation_logits_at_every_step_match_one_full_forward(attn_impl, padded):
    """The LM head's outputs during a whole cached generation (prefill, then one token per step) equal the logits
    of one forward pass over the final sequence, with and without left padding."""
    model = tiny(attn_impl=attn_impl).eval()
    prompt = torch.randint(0, 97, (2, 7))
    mask = torch.ones_like(prompt)
    if padded:
        mask[0, :3] = 0  # row 0 is a 4-token prompt, left-padded
    step_logits = []
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: step_logits.append(output))
    out = model.generate(prompt, 20, temperature=1.0, attention_mask=mask, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert [s.size(1) for s in step_logits] == [7] + [1] * 19  # the prompt once, then only the newest token
    full_mask = torch.cat([mask, torch.ones(2, 20, dtype=mask.dtype)], dim=1)
    full_logits, _ = model(out[:, :-1], attention_mask=full_mask[:, :-1])  # (2, 26, V)
    real = full_mask[:, :-1].bool()  # logits at padding positions are never used
    torch.testing.assert_close(torch.cat(step_logits, dim=1)[real], full_logits[real], rtol=1e-4, atol=1e-5)


def test_unpadded_cached_decoding_builds_no_attention_mask(monkeypatch):
    """Without padding, one new query sees every cached key: SDPA runs with no mask (nothing built per layer),
    even when the caller passes an all-ones attention_mask."""
    import nanollm.model as model_module

    model = tiny(attn_impl="sdpa").eval()
    prompt = torch.randint(0, 97, (2, 6))
    expected = model.generate(prompt, 10, temperature=0, use_cache=False)

    def no_mask_expected(*args, **kwargs):
        raise AssertionError("an attention mask was built")

    monkeypatch.setattr(model_module, "attention_mask_matrix", no_mask_expected)
    assert torch.equal(model.generate(prompt, 10, temperature=0, attention_mask=torch.ones_like(prompt)), expected)
