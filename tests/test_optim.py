import math
import os
import runpy
import sys

import pytest
import torch

from nanollm.configurator import UserError
from nanollm.model import GPT, GPTConfig
from nanollm.optim import LAMB, LARS, Muon, configure_optimizer, get_lr, orthogonalize
from script_runner import run_script, write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_warmup_then_cosine_hits_hand_computed_points():
    kwargs = dict(learning_rate=1.0, warmup_iters=10, lr_decay_iters=110, min_lr=0.1)
    assert get_lr(0, **kwargs) == pytest.approx(1 / 11)  # (it + 1) / (warmup + 1)
    assert get_lr(9, **kwargs) == pytest.approx(10 / 11)
    assert get_lr(10, **kwargs) == pytest.approx(1.0)  # decay starts at the peak
    assert get_lr(60, **kwargs) == pytest.approx(0.1 + 0.5 * 0.9)  # halfway: cos(pi/2) = 0
    assert get_lr(110, **kwargs) == pytest.approx(0.1)
    assert get_lr(500, **kwargs) == pytest.approx(0.1)


def test_polynomial_and_constant_schedules():
    kwargs = dict(learning_rate=1.0, warmup_iters=0, lr_decay_iters=100, min_lr=0.0)
    assert get_lr(25, schedule="poly", **kwargs) == pytest.approx(0.75)  # linear: 1 - 25/100
    assert get_lr(50, schedule="poly", power=2.0, **kwargs) == pytest.approx(0.25)
    assert get_lr(50, schedule="constant", **kwargs) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        get_lr(5, schedule="step", **kwargs)


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    optimizer = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False)
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in not_decayed["params"])
    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_params == model.num_parameters()  # the tied matrix is there once


def test_cpu_optimizer_is_fused_and_steps_like_plain_adamw():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    optimizer = configure_optimizer(model, 0.1, 1e-2, (0.9, 0.95), "cpu", verbose=False)
    assert optimizer.defaults["fused"] is True  # one fused kernel for all parameters, not a loop of small ops
    plain = torch.optim.AdamW([{"params": [p for p in reference if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in reference if p.dim() < 2], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), foreach=False)  # the unfused per-tensor loop
    for _ in range(3):
        for p, q in zip(model.parameters(), reference):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        optimizer.step()
        plain.step()
    for p, q in zip(model.parameters(), reference):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---- LAMB and LARS: one step on a tiny tensor, computed by hand

def one_step(optimizer_class, weight, grad, adapt=True, **kwargs):
    p = torch.tensor(weight, requires_grad=True)
    optimizer = optimizer_class([{"params": [p], "layer_adaptation": adapt}], **kwargs)
    p.grad = torch.tensor(grad)
    optimizer.step()
    return p.detach()


def test_lamb_step_is_the_adam_direction_scaled_by_the_trust_ratio():
    # first step: m̂ = g, v̂ = g², so m̂ / √v̂ = sign(g) = [1, -1]; u = sign(g) + 0.1·w = [1.3, -0.6]
    # ‖w‖ = 5, ‖u‖ = √(1.69 + 0.36) = √2.05; w' = w − lr·(‖w‖/‖u‖)·u
    new = one_step(LAMB, [3.0, 4.0], [0.5, -2.0], lr=0.1, weight_decay=0.1, eps=0.0)
    ratio = 5 / math.sqrt(2.05)
    torch.testing.assert_close(new, torch.tensor([3 - 0.1 * ratio * 1.3, 4 + 0.1 * ratio * 0.6]))


def test_lamb_trust_ratio_is_clipped_and_one_for_a_zero_weight():
    # ‖w‖ = 500, u = [1, -1] (no decay): 500/√2 clipped to 10 -> w' = w − 0.1·10·[1, −1]
    torch.testing.assert_close(one_step(LAMB, [300.0, 400.0], [0.5, -2.0], lr=0.1, eps=0.0),
                               torch.tensor([299.0, 401.0]))
    # ‖w‖ = 0: ratio 1, the plain Adam step −lr·sign(g)
    torch.testing.assert_close(one_step(LAMB, [0.0, 0.0], [0.5, -2.0], lr=0.1, eps=0.0), torch.tensor([-0.1, 0.1]))


def test_lamb_without_layer_adaptation_takes_the_plain_adam_step():
    # a bias: u = sign(g) + 0 (its group has no weight decay), no trust ratio: w' = w − lr·sign(g)
    new = one_step(LAMB, [3.0, 4.0], [0.5, -2.0], adapt=False, lr=0.1, eps=0.0)
    torch.testing.assert_close(new, torch.tensor([2.9, 4.1]))


def test_lars_local_learning_rate_by_hand():
    # ‖w‖ = 5, ‖g‖ = 0.5, β = 0.1: λ = η·‖w‖ / (‖g‖ + β·‖w‖) = 1·5 / (0.5 + 0.5) = 5
    # v = γ·λ·(g + β·w) = 0.1·5·([0.3, -0.4] + [0.3, 0.4]) = [0.3, 0]; w' = w − v
    p = torch.tensor([3.0, 4.0], requires_grad=True)
    optimizer = LARS([p], lr=0.1, momentum=0.9, weight_decay=0.1)
    p.grad = torch.tensor([0.3, -0.4])
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.7, 4.0]))
    # second step, g = 0: λ = 1·‖w'‖ / (0 + 0.1·‖w'‖) = 10, v = 0.9·[0.3, 0] + 0.1·10·0.1·w' = 0.27 + 0.1·w'
    p.grad = torch.zeros(2)
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.7 - 0.27 - 0.27, 4.0 - 0.4]))


def test_lars_trust_coefficient_and_zero_norms():
    # η = 0.001, no decay: λ = 0.001·5 / 0.5 = 0.01, w' = w − 1·0.01·g
    new = one_step(LARS, [3.0, 4.0], [0.3, -0.4], lr=1.0, trust_coefficient=0.001)
    torch.testing.assert_close(new, torch.tensor([3.0 - 0.003, 4.0 + 0.004]))
    # ‖w‖ = 0: λ = 1, plain momentum SGD
    torch.testing.assert_close(one_step(LARS, [0.0, 0.0], [0.3, -0.4], lr=0.1), torch.tensor([-0.03, 0.04]))
    # a bias: no local learning rate at all
    torch.testing.assert_close(one_step(LARS, [3.0, 4.0], [0.3, -0.4], adapt=False, lr=0.1),
                               torch.tensor([2.97, 4.04]))


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_biases_and_norms_are_excluded_from_layer_adaptation(name):
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    optimizer = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False, name=name)
    adapted, plain = optimizer.param_groups
    assert adapted["layer_adaptation"] and adapted["weight_decay"] == 0.1
    assert not plain["layer_adaptation"] and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in plain["params"]} == {n for n, p in model.named_parameters()
                                                       if n.endswith(".bias") or "ln" in n}


# ---- Muon

def newton_schulz_by_hand(g):
    """Jordan et al. (2024): X = G/‖G‖_F, five times X ← aX + b(XXᵀ)X + c(XXᵀ)²X, a, b, c = 3.4445, −4.7750, 2.0315."""
    x = g / g.norm()
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x


def test_muon_step_is_the_newton_schulz_orthogonalized_momentum():
    torch.manual_seed(0)
    weight, grad = torch.randn(2, 3), torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    p = weight.clone().requires_grad_()
    optimizer = Muon([{"params": [p], "use_muon": True}], lr=0.1, weight_decay=0.01, momentum=0.95)
    p.grad = grad.clone()
    optimizer.step()
    # first step: B = G, Nesterov G + μ·B = 1.95·G (the scale vanishes in X = G/‖G‖_F)
    # w' = w·(1 − lr·λ) − lr·0.2·√max(2, 3)·NS5(G)
    expected = weight * (1 - 0.1 * 0.01) - 0.1 * 0.2 * math.sqrt(3) * newton_schulz_by_hand(grad)
    torch.testing.assert_close(p.detach(), expected)


def test_newton_schulz_keeps_singular_vectors_and_pushes_singular_values_towards_one():
    torch.manual_seed(0)
    g = torch.randn(4, 6, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    o = orthogonalize(g)
    inner = u.T @ o @ vh.T  # diagonal when o = U·diag(s')·Vᵀ
    assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=1e-6)
    assert torch.all(torch.diagonal(inner) > 0.6) and torch.all(torch.diagonal(inner) < 1.25), torch.diagonal(inner)
    torch.testing.assert_close(orthogonalize(g.T), o.T)  # a tall matrix is done as its transpose


@pytest.mark.parametrize("shape", [(4, 6), (8, 3)])
def test_newton_schulz_commutes_with_a_row_permutation(shape):
    """NS(P·X) = P·NS(X): tensor parallelism may orthogonalize a fused layer with its rows in the per-rank order."""
    torch.manual_seed(0)
    g = torch.randn(shape)
    rows = torch.randperm(shape[0])
    torch.testing.assert_close(orthogonalize(g[rows]), orthogonalize(g)[rows], rtol=0, atol=1e-6)


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
    optimizer = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False, name="muon")
    names = {id(p): n for n, p in model.named_parameters()}
    muon, adamw_decayed, adamw_plain = [{names[id(p)] for p in g["params"]} for g in optimizer.param_groups]
    assert muon == {f"blocks.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert adamw_decayed == {"wte.weight", "wpe.weight"}  # the embedding, tied with the head
    assert all(n.endswith(".bias") or "ln" in n for n in adamw_plain)
    assert [g["use_muon"] for g in optimizer.param_groups] == [True, False, False]


def test_muon_adamw_groups_step_like_torch_adamw():
    torch.manual_seed(0)
    p = torch.randn(5, 3, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours = Muon([{"params": [p], "use_muon": False}], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    reference = torch.optim.AdamW([q], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
        ours.step()
        reference.step()
    torch.testing.assert_close(p, q)


# ---- resume: an optimizer restored from its saved state continues exactly as one that never stopped

@pytest.mark.parametrize("name", ["lamb", "lars", "muon"])
def test_optimizer_state_round_trip_continues_exactly(name, tmp_path):
    def build():
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
        return model, configure_optimizer(model, 0.1, 1e-2, (0.9, 0.95), "cpu", verbose=False, name=name)

    def train(model, optimizer, steps, start):
        for step in range(start, start + steps):
            x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(step))
            _, loss = model(x, x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    straight, straight_optimizer = build()
    train(straight, straight_optimizer, 4, 0)
    first, first_optimizer = build()
    train(first, first_optimizer, 2, 0)
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed, resumed_optimizer = build()
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train(resumed, resumed_optimizer, 2, 2)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_unknown_optimizer_is_refused():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False, name="sgd")


@pytest.mark.parametrize("script", ["train_pretrain.py", "train_sft.py"])
def test_the_scripts_refuse_an_unknown_optimizer_before_any_work(script, tmp_path, monkeypatch):
    path = os.path.join(REPO, script)
    monkeypatch.chdir(tmp_path)  # the script's own checks, run in this process (they come before any work)
    monkeypatch.setattr(sys, "argv", [path, "--optimizer=sgd"])
    with pytest.raises(UserError, match=r"^optimizer='sgd': expected one of \('adamw', 'lamb', 'lars', 'muon'\)$"):
        runpy.run_path(path, run_name="__main__")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_muon_under_ddp_two_processes_match_one_process(tmp_path):
    # DDP all-reduces the gradients before the step, so both ranks orthogonalize the same momentum: the same weights
    # as one process accumulating the same two micro-batches
    text = write_corpus(tmp_path)
    common = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--vocab_size=400",
              "--eval_iters=1", "--log_interval=1", "--warmup_iters=1", "--learning_rate=1e-2", "--dtype=float32",
              "--device=cpu", "--sample_tokens=2", "--max_iters=4", "--eval_interval=100", "--optimizer=muon",
              "--gradient_accumulation_steps=2"]
    prepared = tmp_path / "prepared"
    run_script("train_pretrain.py", common + [f"--dataset={text}", f"--data_dir={prepared}",
                                              f"--out_dir={tmp_path / 'single'}"])
    run_script("train_pretrain.py", common + [f"--dataset={prepared}", f"--out_dir={tmp_path / 'ddp'}"], nproc=2)
    single, ddp = [torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("single", "ddp")]
    assert single["iter_num"] == ddp["iter_num"] == 4
    assert single["optimizer"]["param_groups"][0]["use_muon"] and "momentum_buffer" in single["optimizer"]["state"][0]
    for name, weight in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], weight, rtol=1e-5, atol=1e-5, msg=name)


def test_a_state_of_another_optimizer_is_refused_naming_the_right_one():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    lamb = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False, name="lamb")
    adamw = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False)
    with pytest.raises(UserError, match="optimizer='adamw', but the checkpoint's optimizer state is 'lamb''s: "
                                        "resume with --optimizer=lamb"):
        adamw.load_state_dict(lamb.state_dict())
    untagged = adamw.state_dict()
    for group in untagged["param_groups"]:
        del group["optimizer"]  # a checkpoint written before the tag: AdamW's
    adamw.load_state_dict(untagged)
    with pytest.raises(UserError, match="state is 'adamw''s"):
        lamb.load_state_dict(untagged)
