"""kernels/attention.py: the fused FlashAttention kernel against the plain PyTorch reference.

On CPU every kernel runs through the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py),
so shapes are tiny; the CUDA tests run the compiled kernels at larger shapes and skip only without CUDA.
"""
import math

import pytest
import torch

from kernels.attention import _flash_attention_forward, attention_reference, flash_attention
from kernels import kernel_device

# (atol, rtol) per dtype. Interpreter: the kernel computes in fp32 like the reference, so the only
# difference is the final rounding to the input dtype (≈1 ulp: 2^-11 fp16, 2^-8 bf16).
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}
# CUDA: tl.dot multiplies 16-bit tiles (P is rounded to 16 bits before P·V), so allow more.
TOLERANCE_CUDA = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 8e-2)}


DEVICE = kernel_device()  # the CPU checks run compiled on CUDA when a GPU is present
if DEVICE == "cuda":
    TOLERANCE = TOLERANCE_CUDA
pytestmark = pytest.mark.usefixtures("on_kernel_device")  # tensors made in a test land on DEVICE


def make_inputs(batch, heads, seq_len_q, seq_len_k, head_dim, dtype, device=None, padding=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator, device="cpu").to(device or DEVICE, dtype).requires_grad_()
               for length in (seq_len_q, seq_len_k, seq_len_k))
    mask = None
    if padding:  # right padding with per-sequence lengths; with B ≥ 2 the first sequence is all padding
        lengths = torch.randint(1, seq_len_k + 1, (batch,), generator=generator, device="cpu")
        lengths[0] = 0 if batch >= 2 else lengths[0]
        mask = (torch.arange(seq_len_k, device="cpu")[None, :] < lengths[:, None]).to(device or DEVICE)  # (B, T_k) True = real token
    grad_out = torch.randn(batch, heads, seq_len_q, head_dim, generator=generator, device="cpu").to(device or DEVICE, dtype)
    return q, k, v, mask, grad_out


def check_against_reference(q, k, v, mask, grad_out, causal, tolerance, sm_scale=None):
    out = flash_attention(q, k, v, causal=causal, key_padding_mask=mask, sm_scale=sm_scale)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = attention_reference(q, k, v, causal=causal, key_padding_mask=mask, sm_scale=sm_scale)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    atol, rtol = tolerance
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)
    for name, grad, expected_grad in zip("qkv", grads, expected_grads):
        assert grad.dtype == q.dtype
        torch.testing.assert_close(grad.float(), expected_grad.float(), atol=atol, rtol=rtol, msg=f"d{name}")


# (B, H, T_q, T_k, D): single token, odd lengths, several blocks (64 on CPU) with a ragged tail,
# T_q < T_k (decoding against a longer context), T_q > T_k (causal: the first rows see nothing),
# head dims 16..128 including one that is not a power of two.
SHAPES = [(2, 2, 1, 1, 16), (2, 2, 17, 17, 32), (1, 2, 129, 129, 64), (1, 2, 17, 70, 32), (2, 1, 33, 17, 16),
          (1, 1, 20, 20, 48), (1, 1, 17, 17, 128)]


@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_forward_and_gradients_match_reference(shape, causal, padding):
    q, k, v, mask, grad_out = make_inputs(*shape, torch.float32, padding=padding)
    check_against_reference(q, k, v, mask, grad_out, causal, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 2, 17, 17, 32), (1, 1, 129, 129, 64)], ids=lambda s: "x".join(map(str, s)))
def test_half_precision_forward_and_gradients_match_reference(shape, dtype):
    q, k, v, mask, grad_out = make_inputs(*shape, dtype, padding=True)
    check_against_reference(q, k, v, mask, grad_out, True, TOLERANCE[dtype])


def test_custom_scale_and_transposed_inputs_match_reference():
    # the model passes q, k, v as transposed views of (B, T, H, D); sm_scale overrides 1/√D
    q, k, v, mask, grad_out = make_inputs(2, 3, 17, 17, 16, torch.float32, padding=True)
    q_view, k_view, v_view = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                              for t in (q, k, v))
    assert not q_view.is_contiguous()
    check_against_reference(q_view, k_view, v_view, mask, grad_out, True, TOLERANCE[torch.float32], sm_scale=0.3)


def test_fully_masked_rows_give_zero_output_and_zero_gradients():
    q, k, v, _, grad_out = make_inputs(2, 2, 9, 5, 16, torch.float32)
    mask = torch.tensor([[False] * 5, [True, True, False, False, False]])  # sequence 0: all padding
    out = flash_attention(q, k, v, causal=True, key_padding_mask=mask)  # T_q > T_k: causal rows 0..3 see no key
    grad_q, grad_k, grad_v = torch.autograd.grad(out, (q, k, v), grad_out)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (grad_q, grad_k, grad_v))
    assert (out[0] == 0).all() and (grad_q[0] == 0).all() and (grad_k[0] == 0).all() and (grad_v[0] == 0).all()
    assert (out[1, :, :4] == 0).all() and (grad_q[1, :, :4] == 0).all()  # query i sees keys j ≤ i − 4
    assert (grad_k[1, :, 2:] == 0).all() and (grad_v[1, :, 2:] == 0).all()  # padding keys get no gradient
    assert (out[1, :, 4:].abs().sum(-1) > 0).all()  # rows that see a key are not zero


def test_saved_log_sum_exp_equals_torch_logsumexp():
    # the forward saves lse = log Σ_j exp(s_ij) per query row; the backward rebuilds P from it
    q, k, v, _, _ = make_inputs(1, 2, 70, 70, 32, torch.float32)
    scale = 1 / math.sqrt(32)
    _, lse = _flash_attention_forward(q, k, v, None, True, scale)
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~torch.ones(70, 70, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=1e-5, rtol=1e-5)


def test_custom_op_registration_passes_opcheck():
    # checks the schema, the fake (meta) implementation and the autograd registration
    q, k, v, mask, _ = make_inputs(1, 2, 17, 17, 16, torch.float32, padding=True)
    mask[0, :3] = True
    torch.library.opcheck(_flash_attention_forward, (q, k, v, mask, True, 0.25))


def test_torch_compile_traces_through_the_custom_op():
    q, k, v, _, grad_out = make_inputs(1, 2, 17, 17, 16, torch.float32)

    def loss_of(q, k, v):
        return (flash_attention(q * 2, k, v, causal=True) * grad_out).sum()

    compiled = torch.compile(loss_of, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    expected_grads = torch.autograd.grad(loss_of(q, k, v), (q, k, v))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_bad_inputs_raise_value_error_naming_the_file():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="kernels/attention.py"):
        flash_attention(q[0], q[0], q[0])  # 3-D
    with pytest.raises(ValueError, match="kernels/attention.py"):
        flash_attention(q, q, torch.randn(1, 2, 8, 32))  # v head dim differs
    with pytest.raises(ValueError, match="key_padding_mask"):
        flash_attention(q, q, q, key_padding_mask=torch.ones(1, 8))  # not bool
    with pytest.raises(ValueError, match="dtype|fp32"):
        flash_attention(q.double(), q.double(), q.double())


def test_tiny_gpt_trains_the_same_with_triton_and_manual_attention(monkeypatch):
    import kernels.attention
    from nanollm.model import GPT, GPTConfig

    calls = []  # prove the 'triton' run really goes through our kernel
    monkeypatch.setattr(kernels.attention, "flash_attention",
                        lambda *args, **kwargs: calls.append(1) or flash_attention(*args, **kwargs))

    def train(attn_impl, state, steps=3):
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True,
                           attn_impl=attn_impl)
        model = GPT(config)
        model.load_state_dict(state)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tokens = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1), device="cpu").to(DEVICE)  # T = 20: ragged block
        losses = []
        for _ in range(steps):  # the same batch each step: the loss must fall
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    torch.manual_seed(0)
    state = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)).state_dict()
    manual_losses, triton_losses = train("manual", state), train("triton", state)
    assert len(calls) == 2 * 3  # n_layer × steps
    assert manual_losses[-1] < manual_losses[0] - 0.3  # it does learn
    # fp32 everywhere: only the summation order differs (measured: equal to 1e-7 over 3 steps)
    assert triton_losses == pytest.approx(manual_losses, abs=1e-5)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need CUDA")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 3, 257, 257, 64), (1, 2, 300, 1000, 128), (2, 2, 1000, 1000, 80)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cuda_forward_and_gradients_match_reference(shape, dtype, causal):
    q, k, v, mask, grad_out = make_inputs(*shape, dtype, device="cuda", padding=True)
    check_against_reference(q, k, v, mask, grad_out, causal, TOLERANCE_CUDA[dtype])


@needs_cuda
def test_cuda_matches_scaled_dot_product_attention():
    q, k, v, _, _ = make_inputs(4, 8, 1024, 1024, 64, torch.bfloat16, device="cuda")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(flash_attention(q, k, v, causal=True), expected, atol=2e-2, rtol=2e-2)


def test_launch_grid_puts_batch_times_heads_on_the_unlimited_axis():
    from kernels.attention import MAX_GRID_AXIS_1, launch_grid

    # B·H = 65,536 (e.g. B = 4096, H = 16) at T = 8192 with 128-row blocks: CUDA allows 65,535 on axes 1 and 2
    assert launch_grid(8192, 128, 65_536) == (65_536, 64)
    assert launch_grid(17, 64, 6) == (6, 1)  # a partial block still gets a program
    assert launch_grid(128, 64, 6) == (6, 2)
    with pytest.raises(ValueError, match="kernels/attention.py"):
        launch_grid(64 * (MAX_GRID_AXIS_1 + 1), 64, 1)  # a sequence of more than 65,535 blocks


def test_head_dim_padding_is_said_and_head_dim_256_is_refused(capsys):
    from kernels.attention import padded_head_dim

    assert [padded_head_dim(d) for d in (8, 16, 64, 80, 96, 128)] == [16, 16, 64, 128, 128, 128]
    q, k, v, _, _ = make_inputs(1, 1, 5, 5, 80, torch.float32)
    out = flash_attention(q, k, v)
    torch.testing.assert_close(out, attention_reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert "D=80 runs padded to 128" in capsys.readouterr().out
    big = torch.randn(1, 1, 4, 256)
    with pytest.raises(ValueError, match=r"D=256 is not supported.*attn_impl='sdpa'"):
        flash_attention(big, big, big)
