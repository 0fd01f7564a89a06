"""Magnitude pruning: the exact global sparsity, the global threshold, masks through fine-tuning, permanence."""
import pytest
import torch
import torch.nn as nn

from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig
from nanollm.prune import magnitude_prune, make_permanent, prunable_linears, save_pruned, sparsity_report


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))


N_LINEAR = 2 * (16 * 48 + 16 * 16 + 16 * 64 + 64 * 16)  # prunable weights, counted by hand: 6144


def test_global_sparsity_is_reached_exactly_and_only_linear_weights_are_touched():
    model = tiny_gpt()
    embedding_before = model.wte.weight.detach().clone()
    n_pruned = magnitude_prune(model, 0.37)
    report = sparsity_report(model)
    assert report["total"] == N_LINEAR
    assert n_pruned == round(0.37 * N_LINEAR)
    assert abs(report["zeros"] - 0.37 * N_LINEAR) <= 1  # within one weight
    assert [name for name, _ in prunable_linears(model)] == [
        f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert torch.equal(model.wte.weight, embedding_before)  # embeddings (and the tied lm_head) untouched
    assert all(not torch.any(m.weight == 0) for m in model.modules() if isinstance(m, nn.LayerNorm))


def test_the_threshold_is_global_smallest_magnitudes_go_first_across_layers():
    model = tiny_gpt()
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight.mul_(0.01)  # one layer of tiny weights: a global threshold prunes it first
    before = {name: module.weight.detach().abs().clone() for name, module in prunable_linears(model)}
    magnitude_prune(model, 0.2)
    pruned = torch.cat([before[name][module.weight == 0] for name, module in prunable_linears(model)])
    kept = torch.cat([before[name][module.weight != 0] for name, module in prunable_linears(model)])
    assert pruned.max() <= kept.min()
    layers = sparsity_report(model)["layers"]
    assert layers["blocks.0.mlp.c_fc"][0] == 1024  # 0.2 · 6144 = 1229 zeros: all 1024 tiny weights among them
    assert layers["blocks.1.mlp.c_fc"][0] < 1229 - 1024  # a per-layer threshold would have taken 20% of each


def test_pruned_weights_stay_zero_through_fine_tune_steps():
    model = tiny_gpt()
    magnitude_prune(model, 0.5)
    zero_before = {name: (module.weight == 0).clone() for name, module in prunable_linears(model)}
    weights_before = {name: module.weight.detach().clone() for name, module in prunable_linears(model)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # built after pruning
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, module in prunable_linears(model):
        assert torch.equal(module.weight == 0, zero_before[name])  # the same positions, still exactly zero
        assert not torch.equal(module.weight, weights_before[name])  # while the kept weights did train
    assert sparsity_report(model)["zeros"] == N_LINEAR // 2


def test_pruning_again_prunes_further_and_make_permanent_keeps_zeros_names_and_logits(tmp_path):
    model = tiny_gpt().eval()
    magnitude_prune(model, 0.3)
    first_zeros = {name: (m.weight == 0).clone() for name, m in prunable_linears(model)}
    magnitude_prune(model, 0.6)
    assert sparsity_report(model)["zeros"] == round(0.6 * N_LINEAR)
    for name, module in prunable_linears(model):
        assert torch.all(module.weight[first_zeros[name]] == 0)  # the earlier zeros are still among the pruned
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        masked_logits = model(idx)[0]
    make_permanent(model)
    assert set(model.state_dict()) == set(tiny_gpt().state_dict())  # plain names again: loads as any GPT
    assert sparsity_report(model)["zeros"] == round(0.6 * N_LINEAR)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], masked_logits)
    save_pruned(model, str(tmp_path / "ckpt.pt"), "test", 0.6)
    loaded = load_model(str(tmp_path)).model
    assert sparsity_report(loaded)["zeros"] == round(0.6 * N_LINEAR)


def test_sparsity_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune(tiny_gpt(), 1.0)
