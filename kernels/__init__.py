"""Hand-written Triton kernels (fused softmax, FlashAttention-style attention, fused cross-entropy),
each beside its plain-PyTorch reference. Without a GPU they run on the CPU through Triton's interpreter."""
import os
import sys

import torch

# `triton.jit` reads TRITON_INTERPRET when each kernel is defined, so this must run before the kernel
# modules are imported (importing `kernels.attention` imports this package first).
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # triton's own helpers (tl.zeros, ...) were already compiled for a GPU: the interpreter would fail later
        from nanollm.configurator import UserError  # one line for the user, exit code 2 from a script

        raise UserError("attn_impl='triton' without a GPU runs the kernels in Triton's interpreter, which must be "
                        "chosen before triton is imported: run with TRITON_INTERPRET=1 in the environment "
                        "(e.g. TRITON_INTERPRET=1 python train_pretrain.py --attn_impl=triton)")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreting():
    """True when kernels run through the Triton interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(tensor, where):
    """Compiled kernels need CUDA tensors; the interpreter needs CPU tensors."""
    wanted = "cpu" if interpreting() else "cuda"
    if tensor.device.type != wanted:
        raise ValueError(f"{where}: tensors must be on {wanted} (TRITON_INTERPRET="
                         f"{os.environ.get('TRITON_INTERPRET', 'unset')}), got {tensor.device}")


def kernel_device():
    """Where the kernels run: 'cpu' under the interpreter, 'cuda' when compiled (tests put their tensors here)."""
    return "cpu" if interpreting() else "cuda"
