"""kernels/softmax.py: the fused softmax against the plain PyTorch reference.

On CPU the kernels run through the Triton interpreter (one program per row, so few rows); rows longer
than MAX_BLOCK_CPU = 64 take the two-pass online path, shorter ones the single-block path.
"""
import pytest
import torch

from kernels.softmax import MAX_BLOCK_CPU, _softmax_forward, softmax, softmax_reference
from kernels import kernel_device

# (atol, rtol) per dtype: the kernel computes in fp32 like the reference; the output is rounded to the dtype.
TOLERANCE = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-3, 5e-3), torch.bfloat16: (8e-3, 3e-2)}


DEVICE = kernel_device()  # the CPU checks run compiled on CUDA when a GPU is present
pytestmark = pytest.mark.usefixtures("on_kernel_device")  # tensors made in a test land on DEVICE


def make_inputs(shape, dtype, padding=False, device=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=generator, device="cpu")).to(device or DEVICE, dtype).requires_grad_()
    mask = None
    if padding:  # per-sequence lengths; with B ≥ 2 the first sequence is all padding
        lengths = torch.randint(1, shape[-1] + 1, (shape[0],), generator=generator, device="cpu")
        lengths[0] = 0 if shape[0] >= 2 else lengths[0]
        mask = (torch.arange(shape[-1], device="cpu")[None, :] < lengths[:, None]).to(device or DEVICE)  # (B, T_k) True = real token
    grad_probs = torch.randn(shape, generator=generator, device="cpu").to(device or DEVICE, dtype)
    return x, mask, grad_probs


def check_against_reference(x, mask, grad_probs, scale, causal, tolerance):
    probs = softmax(x, scale=scale, causal=causal, key_padding_mask=mask)
    (grad_x,) = torch.autograd.grad(probs, x, grad_probs)
    expected = softmax_reference(x, scale=scale, causal=causal, key_padding_mask=mask)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_probs)
    atol, rtol = tolerance
    assert probs.dtype == x.dtype and grad_x.dtype == x.dtype
    torch.testing.assert_close(probs.float(), expected.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_x.float(), expected_grad.float(), atol=atol, rtol=rtol)


# (B, H, T_q, T_k): length-1 rows, odd single-block rows, exactly one block, several blocks with a
# ragged tail, and T_q ≠ T_k (the causal diagonal is bottom-right aligned).
SHAPES = [(2, 1, 3, 1), (2, 2, 5, 17), (1, 2, 4, MAX_BLOCK_CPU), (2, 1, 6, 129), (2, 1, 9, 5)]


@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_forward_and_gradient_match_reference(shape, causal, padding):
    x, mask, grad_probs = make_inputs(shape, torch.float32, padding)
    check_against_reference(x, mask, grad_probs, 0.7, causal, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 2, 5, 17), (2, 1, 4, 129)], ids=lambda s: "x".join(map(str, s)))
def test_half_precision_forward_and_gradient_match_reference(shape, dtype):
    x, mask, grad_probs = make_inputs(shape, dtype, padding=True)
    check_against_reference(x, mask, grad_probs, None, True, TOLERANCE[dtype])


def test_any_leading_shape_without_masks():
    x, _, grad_probs = make_inputs((3, 2, 2, 100), torch.float32)
    check_against_reference(x, None, grad_probs, 2.0, False, TOLERANCE[torch.float32])
    x, _, grad_probs = make_inputs((5, 30), torch.float32)  # 2-D with a key padding mask
    mask = torch.arange(30)[None, :] < torch.tensor([[30], [1], [7], [12], [29]])
    check_against_reference(x, mask, grad_probs, None, False, TOLERANCE[torch.float32])


def test_rows_sum_to_one_and_large_logits_do_not_overflow():
    x = torch.tensor([[1000.0, 999.0, -1000.0] + [0.0] * 97, [88.0] * 100])  # exp(1000) overflows fp32
    probs = softmax(x)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    torch.testing.assert_close(probs[0, :2], torch.tensor([1.0, 1.0 / torch.e]) / (1 + 1 / torch.e))
    torch.testing.assert_close(probs[1], torch.full((100,), 0.01))


def test_fully_masked_rows_give_zeros_forward_and_backward():
    x, _, grad_probs = make_inputs((2, 1, 6, 3), torch.float32)
    mask = torch.tensor([[False, False, False], [True, False, True]])
    probs = softmax(x, causal=True, key_padding_mask=mask)  # T_q = 6 > T_k = 3: causal rows 0..2 see nothing
    (grad_x,) = torch.autograd.grad(probs, x, grad_probs)
    assert torch.isfinite(probs).all() and torch.isfinite(grad_x).all()
    assert (probs[0] == 0).all() and (grad_x[0] == 0).all()
    assert (probs[1, 0, :3] == 0).all() and (grad_x[1, 0, :3] == 0).all()
    torch.testing.assert_close(probs[1, 0, 3:].sum(-1), torch.ones(3))
    assert (probs[1, 0, :, 1] == 0).all()  # the padding key gets no probability


def test_custom_op_registration_passes_opcheck():
    x, mask, _ = make_inputs((2, 1, 3, 17), torch.float32, padding=True)
    torch.library.opcheck(_softmax_forward, (x, mask, 0.5, True))


def test_torch_compile_traces_through_the_custom_op():
    x, _, grad_probs = make_inputs((2, 1, 3, 17), torch.float32)

    def loss_of(x):
        return (softmax(x * 2, causal=True) * grad_probs).sum()

    (grad_x,) = torch.autograd.grad(torch.compile(loss_of, backend="aot_eager", fullgraph=True)(x), x)
    torch.testing.assert_close(grad_x, torch.autograd.grad(loss_of(x), x)[0])


def test_bad_inputs_raise_value_error_naming_the_file():
    with pytest.raises(ValueError, match="kernels/softmax.py"):
        softmax(torch.randn(5), causal=True)  # causal needs (T_q, T_k)
    with pytest.raises(ValueError, match="key_padding_mask"):
        softmax(torch.randn(2, 3, 4), key_padding_mask=torch.ones(2, 5, dtype=torch.bool))  # wrong T_k
    with pytest.raises(ValueError, match="kernels/softmax.py"):
        softmax(torch.randn(2, 3).double())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need CUDA")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(4, 2, 100, 1000), (2, 2, 33, 16384), (1, 1, 7, 50000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_forward_and_gradient_match_reference(shape, dtype):
    x, mask, grad_probs = make_inputs(shape, dtype, padding=True, device="cuda")
    check_against_reference(x, mask, grad_probs, 0.5, True, TOLERANCE[dtype])
