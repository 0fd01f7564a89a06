"""float16 loss scaling on the CPU, through the guarded step every training script uses (nanollm/training.py)."""
import torch

from nanollm.distributed import Runtime
from nanollm.model import GPT, GPTConfig
from nanollm.optim import configure_optimizer
from nanollm.training import MAX_BAD_STEPS, GuardedStep

FP16 = Runtime("cpu", "cpu", dtype="float16")


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))


def forward(model, step):
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(step))  # 16 target tokens
    with FP16.autocast():  # float16 matmuls on the CPU; the weights stay float32
        return model(x, x)[1]


def test_float16_runs_on_the_cpu_with_an_enabled_scaler():
    assert FP16.grad_scaler().is_enabled()
    assert not Runtime("cpu", "cpu", dtype="float32").grad_scaler().is_enabled()
    model = tiny_gpt()
    with FP16.autocast():
        logits, _ = model(torch.zeros(1, 8, dtype=torch.long))
    assert logits.dtype == torch.float16


def test_overflow_skips_the_step_and_halves_the_scale_and_clean_steps_grow_it():
    model = tiny_gpt()
    optimizer = configure_optimizer(model, 0.1, 1e-2, (0.9, 0.95), "cpu", verbose=False)
    # 2^21 overflows float16 for sure: d loss / d logit = (softmax - onehot) / 16 tokens, ≈ 1/16 at a random start,
    # times 2^21 is ~128,000 > 65504, the largest float16
    growth_interval = 2
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 21, growth_interval=growth_interval)
    step = GuardedStep(optimizer, scaler, grad_clip=1.0, runtime=FP16)
    clean_in_a_row, events = 0, []
    for iteration in range(7):
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        step.minimize(model, forward(model, 0), iteration)
        skipped = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        # GradScaler's rule: an overflow skips the step (weights untouched) and halves the scale; growth_interval
        # clean steps in a row double it
        if skipped:
            clean_in_a_row, expected, event = 0, scale / 2, "skip"
        else:
            clean_in_a_row += 1
            expected, event = (scale * 2, "grow") if clean_in_a_row == growth_interval else (scale, "step")
            clean_in_a_row %= growth_interval
        assert scaler.get_scale() == expected, (iteration, scale, scaler.get_scale(), event)
        assert all(p.grad is None for p in model.parameters())
        events.append(event)
    assert events[0] == "skip" and "grow" in events, events
    assert events.index("step") > MAX_BAD_STEPS  # overflows are the scaler's business: the run goes on
    assert step.bad_steps == 0


def gradients_after_unscaling(scaler):
    model = tiny_gpt()
    scaler.scale(forward(model, 0)).backward()
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_loss_scaling_keeps_small_float16_gradients_from_underflowing():
    plain = gradients_after_unscaling(torch.amp.GradScaler("cpu", enabled=False))
    scaled = gradients_after_unscaling(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    less_scaled = gradients_after_unscaling(torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    assert (plain == 0).sum() > 0 and (scaled == 0).sum() == 0  # unscaled, the tiniest gradients flush to 0
    # two scales (powers of two, both without overflow) give the same gradients up to float16 rounding of the
    # smallest ones; the unscaled run is off by far more
    torch.testing.assert_close(less_scaled, scaled, rtol=0, atol=1e-7)
    assert (plain - scaled).abs().max() > 1e-5
