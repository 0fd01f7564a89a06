"""kernels/cross_entropy.py: the fused cross-entropy against torch.nn.functional.cross_entropy.

On CPU the kernels run through the Triton interpreter; vocabularies longer than BLOCK_V_CPU = 64
cover the multi-block online log-sum-exp.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.cross_entropy import _cross_entropy_forward, cross_entropy, cross_entropy_reference
from kernels import kernel_device

# (atol, rtol) per dtype: math in fp32 in both; the gradient is rounded to the logits' dtype.
TOLERANCE = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-3, 5e-3), torch.bfloat16: (8e-3, 3e-2)}


DEVICE = kernel_device()  # the CPU checks run compiled on CUDA when a GPU is present
pytestmark = pytest.mark.usefixtures("on_kernel_device")  # tensors made in a test land on DEVICE


def make_inputs(rows, vocab_size, dtype, device=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(rows, vocab_size, generator=generator, device="cpu")
    logits = logits.to(device or DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, vocab_size, (rows,), generator=generator, device="cpu").to(device or DEVICE)
    targets[::3] = -100  # ignored positions (prompt tokens in SFT, padding)
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("vocab_size", [1, 17, 64, 200], ids=lambda v: f"V{v}")
def test_loss_and_gradient_match_torch(vocab_size, dtype):
    logits, targets = make_inputs(7, vocab_size, dtype)
    loss = cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = cross_entropy_reference(logits, targets)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), expected_grad.float(), atol=atol, rtol=rtol)
    assert (grad[::3] == 0).all()  # ignored rows get no gradient


def test_batched_logits_and_custom_ignore_index():
    logits, targets = make_inputs(6, 30, torch.float32)
    logits3d = logits.detach().view(2, 3, 30).requires_grad_()
    targets = targets.view(2, 3).clamp(min=0)
    targets[1, 2] = 5  # ignore_index=5: this row and any other target 5 are left out
    loss = cross_entropy(logits3d, targets, ignore_index=5)
    expected = F.cross_entropy(logits3d.detach().view(6, 30), targets.view(6), ignore_index=5)
    torch.testing.assert_close(loss, expected)


def test_hand_computed_value():
    # uniform logits over V classes: loss = log V ; gradient = (1/V − onehot) / rows
    logits = torch.zeros(2, 4, requires_grad=True)
    loss = cross_entropy(logits, torch.tensor([1, 3]))
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, torch.log(torch.tensor(4.0)))
    torch.testing.assert_close(grad, torch.tensor([[0.25, -0.75, 0.25, 0.25], [0.25, 0.25, 0.25, -0.75]]) / 2)


def test_all_targets_ignored_gives_zero_loss_not_nan():
    logits = torch.randn(3, 10, requires_grad=True)
    loss = cross_entropy(logits, torch.full((3,), -100))
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and (grad == 0).all()


def test_a_first_vocabulary_block_of_only_minus_infinity_is_finite():
    # tokens banned with logit −inf fill the whole first block (BLOCK_V_CPU = 64 columns) of row 0: the online
    # log-sum-exp must not compute exp(−inf − (−inf)) = NaN there
    logits, targets = make_inputs(3, 200, torch.float32)
    logits = logits.detach().clone()
    logits[0, :64] = float("-inf")
    logits[1, 64:128] = float("-inf")  # a middle block, for comparison
    targets = torch.tensor([100, 150, 7])
    logits.requires_grad_()
    loss = cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = cross_entropy_reference(logits, targets)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert (grad[0, :64] == 0).all()  # probability exp(−inf) = 0: no gradient on the banned tokens


def test_saves_only_one_number_per_row():
    logits, targets = make_inputs(5, 100, torch.float32)
    losses, lse = _cross_entropy_forward(logits, targets, -100)
    assert lse.shape == (5,)
    torch.testing.assert_close(lse, torch.logsumexp(logits.detach(), dim=-1))
    torch.testing.assert_close(losses, F.cross_entropy(logits.detach(), targets, reduction="none"))


def test_custom_op_registration_passes_opcheck():
    logits, targets = make_inputs(4, 70, torch.float32)
    torch.library.opcheck(_cross_entropy_forward, (logits, targets, -100))


def test_bad_targets_raise_value_error_naming_the_file():
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match="kernels/cross_entropy.py"):
        cross_entropy(logits, torch.tensor([0, 10, 2]))  # out of range
    with pytest.raises(ValueError, match="kernels/cross_entropy.py"):
        cross_entropy(logits, torch.tensor([0, 1]))  # wrong shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_matches_torch_at_gpt2_vocab(dtype):
    logits, targets = make_inputs(512, 50257, dtype, device="cuda")
    loss = cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = cross_entropy_reference(logits, targets)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad.float(), expected_grad.float(), atol=1e-6, rtol=TOLERANCE[dtype][1])
