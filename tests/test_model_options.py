"""The GPT's architecture options (nanollm/model.py): rotary positions, RMSNorm, SwiGLU and squared-ReLU MLPs,
grouped-query attention, QK-norm and untied embeddings, each against a plain formula or an invariant; a model with all
of them trains, saves and loads with identical logits; checkpoints without the options still load as GPT-2 blocks."""
import math
import os
import runpy
import sys

import pytest
import torch
import torch.nn.functional as F

from nanollm.checkpoint import save_checkpoint
from nanollm.configurator import UserError, script_settings
from nanollm.distributed import Runtime
from nanollm.encdec import EncoderDecoder
from nanollm.export import export_release
from nanollm.gpt2 import config_to_gpt2
from nanollm.loader import load_model
from nanollm.model import (GPT, MLP, GPTConfig, SelfAttention, apply_rotary, attend, mlp_hidden_size, norm_layer,
                           rotary_angles)
from nanollm.pretraining import apply_preset, resumed_shape
from nanollm.tokenizer import train_tokenizer

SHAPE = dict(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=32)
MODERN = dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qk_norm=True, tie_embeddings=False,
              bias=False)
CPU = Runtime(device="cpu", device_type="cpu")


def tiny(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**dict(SHAPE, **overrides)))


# ------------------------------------------------------------------------------------------ rotary positions
def test_rope_scores_depend_only_on_the_offset():
    config = GPTConfig(**SHAPE, position="rope")
    q, k = torch.randn(2, 1, 1, 1, config.head_dim).unbind(0)  # one query and one key vector, (1, 1, 1, D)

    def score(m, n):  # q at position m, k at position n
        rotated_q = apply_rotary(q, rotary_angles(config, torch.tensor([[m]])))
        rotated_k = apply_rotary(k, rotary_angles(config, torch.tensor([[n]])))
        return (rotated_q * rotated_k).sum().item()

    for offset in (0, 1, 5, 17):
        scores = [score(n + offset, n) for n in (0, 3, 11, 30)]
        assert max(scores) - min(scores) < 1e-4, (offset, scores)
    assert abs(score(0, 0) - (q * k).sum().item()) < 1e-5  # position 0 is no rotation
    assert abs(score(5, 0) - score(0, 0)) > 1e-3  # ... and the offset does change the score
    rotated = apply_rotary(q, rotary_angles(config, torch.tensor([[9]])))
    assert abs(rotated.norm() - q.norm()) < 1e-5  # a rotation keeps the length


def test_rope_model_has_no_position_table_and_sees_token_order():
    model = tiny(position="rope").eval()
    assert model.wpe is None and "wpe.weight" not in model.state_dict()
    idx = torch.randint(0, 97, (1, 12))
    swapped = idx.clone()
    swapped[0, [3, 4]] = idx[0, [4, 3]]
    assert (model(idx)[0][0, -1] - model(swapped)[0][0, -1]).abs().max() > 1e-4  # order matters without a table


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_rope_kv_cache_decoding_equals_the_full_forward(attn_impl, padded):
    """Cached generation (prefill, then one token per step, rotated at its absolute position) gives the logits of one
    forward pass over the final sequence, also with left padding (positions counted from each row's first token)."""
    model = tiny(position="rope", n_kv_head=2, attn_impl=attn_impl).eval()
    prompt = torch.randint(0, 97, (2, 7))
    mask = torch.ones_like(prompt)
    if padded:
        mask[0, :3] = 0  # row 0: a 4-token prompt, left-padded
    step_logits = []
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: step_logits.append(output))
    out = model.generate(prompt, 12, temperature=1.0, attention_mask=mask, generator=torch.Generator().manual_seed(0))
    hook.remove()
    full_mask = torch.cat([mask, torch.ones(2, 12, dtype=mask.dtype)], dim=1)
    full_logits, _ = model(out[:, :-1], attention_mask=full_mask[:, :-1])
    real = full_mask[:, :-1].bool()
    torch.testing.assert_close(torch.cat(step_logits, dim=1)[real], full_logits[real], rtol=1e-4, atol=1e-5)
    if padded:  # the padded row continues exactly as its prompt alone does
        alone = model.generate(prompt[:1, 3:], 12, temperature=0)
        together = model.generate(prompt, 12, temperature=0, attention_mask=mask)
        assert torch.equal(together[0, 7:], alone[0, 4:])


# ------------------------------------------------------------------------------------ grouped-query attention
def reference_attention(attention, x):
    """Causal multi-head attention written out head by head; query head h reads key/value head h // (H / H_kv)."""
    B, T, C = x.shape
    H, H_kv = attention.n_head, attention.n_kv_head
    D = C // H
    q, k, v = F.linear(x, attention.c_attn.weight, attention.c_attn.bias).split([C, H_kv * D, H_kv * D], dim=-1)
    heads = []
    for h in range(H):
        g = h // (H // H_kv)
        scores = q[..., h * D:(h + 1) * D] @ k[..., g * D:(g + 1) * D].transpose(1, 2) / math.sqrt(D)  # (B, T, T)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v[..., g * D:(g + 1) * D])  # (B, T, D)
    return F.linear(torch.cat(heads, dim=-1), attention.c_proj.weight, attention.c_proj.bias)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # multi-head, grouped-query, multi-query
@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
def test_grouped_query_attention_matches_a_plain_reference(n_kv_head, attn_impl):
    torch.manual_seed(0)
    attention = SelfAttention(GPTConfig(**SHAPE, n_kv_head=n_kv_head, attn_impl=attn_impl))
    assert attention.c_attn.weight.shape == (32 + 2 * n_kv_head * 8, 32)  # q: 4 heads, k and v: n_kv_head heads
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(attention(x), reference_attention(attention, x), rtol=1e-5, atol=1e-6)


def test_n_kv_head_equal_to_n_head_is_multi_head_attention_exactly():
    classic, explicit = tiny(), tiny(n_kv_head=4)
    assert {k: v.shape for k, v in classic.state_dict().items()} == \
           {k: v.shape for k, v in explicit.state_dict().items()}  # GPT-2's tensors: old checkpoints fit
    explicit.load_state_dict(classic.state_dict())
    idx = torch.randint(0, 97, (2, 10))
    assert torch.equal(classic(idx)[0], explicit(idx)[0])


def test_kv_cache_stores_only_the_key_value_heads():
    model = tiny(n_kv_head=1).eval()
    cache = model.new_kv_cache(3, 10)
    assert cache.keys.shape == (2, 3, 1, 10, 8)  # (n_layer, B, H_kv, max_len, D): 4x smaller than multi-head
    prompt = torch.randint(0, 97, (3, 4))
    assert torch.equal(model.generate(prompt, 6, temperature=0), model.generate(prompt, 6, temperature=0,
                                                                               use_cache=False))


def test_triton_attention_runs_grouped_query_attention(on_kernel_device):
    q, k, v = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)  # 4 query heads, 2 kv heads
    expected = attend(q, k, v, "manual", causal=True)
    torch.testing.assert_close(attend(q, k, v, "triton", causal=True), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attend(q, k, v, "sdpa", causal=True), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ norms and MLPs
def test_rmsnorm_and_qk_norm_follow_the_plain_formula():
    config = GPTConfig(**SHAPE, norm="rmsnorm")
    norm = norm_layer(config)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 32) * 3 + 1
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight  # Zhang & Sennrich 2019
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)
    assert not hasattr(norm, "bias") or norm.bias is None
    attention = SelfAttention(GPTConfig(**SHAPE, qk_norm=True, norm="rmsnorm"))
    assert attention.q_norm.weight.shape == (8,)  # one scale per head feature


@pytest.mark.parametrize("kind", ["swiglu", "relu2", "gelu"])
def test_mlp_variants_follow_their_formulas(kind):
    torch.manual_seed(0)
    mlp = MLP(GPTConfig(**SHAPE, mlp=kind))
    x = torch.randn(2, 5, 32)
    hidden = F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias)
    if kind == "swiglu":  # Shazeer 2020: Swish(xW) ⊙ xV, with Swish(z) = z·σ(z)
        width = mlp.c_proj.in_features  # h: the gate is the first h outputs of c_fc, the value the next h
        gate, value = hidden[..., :width], hidden[..., width:]
        activated = gate * torch.sigmoid(gate) * value
    elif kind == "relu2":  # So et al. 2021
        activated = hidden.clamp(min=0) ** 2
    else:  # GPT-2's tanh approximation of GELU
        activated = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden ** 3)))
    torch.testing.assert_close(mlp(x), F.linear(activated, mlp.c_proj.weight, mlp.c_proj.bias), rtol=1e-5,
                               atol=1e-6)


def mlp_config(kind):
    return GPTConfig(**dict(SHAPE, n_embd=128), mlp=kind)


def test_swiglu_keeps_the_mlp_parameters_about_equal():
    counts = {kind: sum(p.numel() for p in MLP(mlp_config(kind)).parameters()) for kind in ("gelu", "swiglu")}
    assert mlp_hidden_size(mlp_config("swiglu")) == 344  # 8·128/3 = 341.3, up to a multiple of 8
    assert abs(counts["swiglu"] / counts["gelu"] - 1) < 0.01, counts


# ------------------------------------------------------------------------------ the options together
@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    texts = [f"person {i} lives in town {i % 5}" for i in range(100)]
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "tokenizer"), vocab_size=300)


def test_modern_model_trains_then_saves_and_loads_with_identical_logits(tmp_path, tokenizer_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**dict(SHAPE, vocab_size=300), **MODERN))
    assert model.lm_head.weight is not model.wte.weight  # untied
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    model.eval()
    save_checkpoint(str(tmp_path / "ckpt.pt"), CPU, model, None, None, 15, 0.0, {"model_type": "gpt"},
                    vars(model.config))
    release = export_release(model, tokenizer_path, str(tmp_path / "release"))  # untied: both matrices stored
    with torch.no_grad():
        expected = model(idx)[0]
        for path in (tmp_path, release):
            loaded = load_model(str(path)).model
            assert {k: getattr(loaded.config, k) for k in MODERN} == MODERN
            assert torch.equal(loaded(idx)[0], expected)


def test_a_checkpoint_saved_before_the_options_existed_loads_as_gpt2_blocks(tmp_path):
    model = tiny().eval()
    old_args = {k: v for k, v in vars(model.config).items() if k not in MODERN}  # what older versions saved
    save_checkpoint(str(tmp_path / "ckpt.pt"), CPU, model, None, None, 0, 0.0, {"model_type": "gpt"}, old_args)
    loaded = load_model(str(tmp_path)).model
    assert loaded.config.position == "learned" and loaded.config.mlp == "gelu" and loaded.config.kv_heads == 4
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_encoder_decoder_with_the_options_caches_exactly():
    torch.manual_seed(0)
    model = EncoderDecoder(GPTConfig(**SHAPE, **MODERN)).eval()
    src = torch.randint(3, 97, (2, 9))
    with_cache = model.generate(src, 8, temperature=0)
    assert torch.equal(with_cache, model.generate(src, 8, temperature=0, use_cache=False))


@pytest.mark.parametrize("name", ["position", "norm", "mlp", "qk_norm", "tie_embeddings", "n_kv_head"])
def test_gpt2_export_refuses_each_option(name):
    config = GPTConfig(**SHAPE, **{name: MODERN[name]})
    with pytest.raises(UserError, match=name):
        config_to_gpt2(config)
    config_to_gpt2(GPTConfig(**SHAPE))  # the GPT-2 block itself exports


def test_a_resumed_run_takes_its_architecture_from_the_checkpoint():
    saved = {"config": {"model_type": "gpt"}, "model_args": dict(SHAPE, bias=True, position="rope", n_kv_head=2)}
    shape = resumed_shape(saved, "gpt", "out")
    assert shape["position"] == "rope" and shape["n_kv_head"] == 2 and shape["block_size"] == 48
    assert (shape["norm"], shape["mlp"], shape["qk_norm"], shape["tie_embeddings"]) == ("layernorm", "gelu", False,
                                                                                        True)  # not saved: GPT-2's


@pytest.mark.parametrize("setting, message", [
    ("--mlp=geglu", "mlp='geglu': expected one of ('gelu', 'swiglu', 'relu2')"),
    ("--position=alibi", "position='alibi': expected one of ('learned', 'rope')"),
    ("--norm=batchnorm", "norm='batchnorm': expected one of ('layernorm', 'rmsnorm')"),
    ("--n_kv_head=3", "n_kv_head=3: expected 0 (= n_head) or a divisor of n_head=4"),
    ("--preset=llama", "preset='llama': expected '' or one of ('gpt2',)"),
])
def test_train_pretrain_refuses_a_bad_option_before_any_work(tmp_path, monkeypatch, setting, message):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_pretrain.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, setting])
    with pytest.raises(UserError) as error:
        runpy.run_path(script, run_name="__main__")
    assert str(error.value) == message
    assert list(tmp_path.iterdir()) == []


def test_preset_gpt2_gives_gpt2s_block_and_adamw_back_except_the_settings_named_with_it():
    defaults = script_settings(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                            "train_pretrain.py"))
    keys = ("bias", "position", "norm", "mlp", "n_kv_head", "qk_norm", "tie_embeddings", "optimizer")
    gpt2 = (True, "learned", "layernorm", "gelu", 0, False, True, "adamw")  # GPT-2 (Radford et al. 2019), by hand
    assert tuple(defaults[k] for k in keys) == (False, "rope", "rmsnorm", "swiglu", 0, True, False, "muon")  # Qwen3
    assert apply_preset(dict(defaults), defaults) == defaults  # preset='' changes nothing
    plain = apply_preset(dict(defaults, preset="gpt2"), defaults, ["--preset=gpt2"])
    assert tuple(plain[k] for k in keys) == gpt2
    assert {k: v for k, v in plain.items() if k not in keys} == \
        {k: v for k, v in dict(defaults, preset="gpt2").items() if k not in keys}  # nothing else moves
    # a setting named beside the preset wins, even when it equals the script's default (muon, rope)
    mixed = apply_preset(dict(defaults, preset="gpt2", n_kv_head=2), defaults,
                         ["--preset=gpt2", "--optimizer=muon", "--position=rope", "--n_kv_head=2"])
    assert tuple(mixed[k] for k in keys) == (True, "rope", "layernorm", "gelu", 2, False, True, "muon")
