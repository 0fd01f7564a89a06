"""Benchmark: our Triton kernels vs PyTorch eager and vs PyTorch's fused kernels (SDPA, torch.softmax,
F.cross_entropy), with `triton.testing.do_bench`. It prints figures; it is not a test.

    python bench/bench_kernels.py                       # CUDA: full sweep; no CUDA: correctness smoke run, exit 0
    python bench/bench_kernels.py --dtype=float16 --seq_lens="512,2048"
Attention FLOPs (FlashAttention papers): forward 4·B·H·T²·D (half when causal), backward 2.5× forward.
Bytes are the minimum traffic (each input read once, each output written once), so GB/s is a lower bound.
Every shape is checked against a reference before it is timed; the GPU name and versions head the output.
"""
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402,F401  (sets TRITON_INTERPRET=1 when there is no GPU, before triton loads)
import triton  # noqa: E402
from kernels.attention import attention_reference, flash_attention  # noqa: E402
from kernels.cross_entropy import cross_entropy, cross_entropy_reference  # noqa: E402
from kernels.softmax import softmax, softmax_reference  # noqa: E402
from nanollm.configurator import configure  # noqa: E402

batch = 4
heads = 16
seq_lens = "512,1024,2048,4096,8192"  # comma-separated T
head_dims = "64,128"
dtype = "bfloat16"  # bfloat16 | float16
eager_max_seq_len = 4096  # eager attention materializes B·H·T² scores: skipped above this T
cross_entropy_rows = 8192  # tokens per batch for the cross-entropy benchmark
vocab_size = 50257  # GPT-2 vocabulary
configure(globals(), sys.argv[1:])


def numbers(text):
    """'512,1024' (or the '(512, 1024)' the configurator makes of it) -> [512, 1024]"""
    return [int(n) for n in re.findall(r"\d+", text)]


def eager_attention(q, k, v, causal):
    """What a model does without a fused kernel: the (B, H, T, T) scores go through memory."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, T)
    if causal:
        seq_len = q.shape[-2]
        scores = scores.masked_fill(~torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril(),
                                    float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def time_ms(function, inputs):
    """Median milliseconds of function(), with input gradients cleared between runs."""
    return triton.testing.do_bench(function, grad_to_none=inputs, return_mode="median")


def forward_backward(attention, q, k, v, grad_out):
    return lambda: attention(q, k, v).backward(grad_out)


def bench_attention(element_type):
    print("\n== attention (B=%d, H=%d): TFLOP/s, and our speed ÷ each baseline's" % (batch, heads))
    print(f"{'T':>6} {'D':>4} {'causal':>6} {'pass':>8} | {'ours':>7} {'SDPA':>7} {'eager':>7} | "
          f"{'ours GB/s':>9} | {'÷SDPA':>6} {'÷eager':>6}")
    for head_dim in numbers(head_dims):
        for seq_len in numbers(seq_lens):
            for causal in (False, True):
                q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device="cuda", dtype=element_type,
                                       requires_grad=True) for _ in range(3))
                grad_out = torch.randn_like(q)
                ours = lambda q, k, v: flash_attention(q, k, v, causal=causal)  # noqa: E731
                sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                eager = lambda q, k, v: eager_attention(q, k, v, causal)  # noqa: E731
                check_attention_shape(ours, sdpa, q, k, v, grad_out)
                run_eager = seq_len <= eager_max_seq_len
                flops = 4 * batch * heads * seq_len ** 2 * head_dim * (0.5 if causal else 1.0)
                io_bytes = 4 * q.numel() * q.element_size()  # read q, k, v; write out
                for name, flop_factor, make in (("fwd", 1.0, lambda f: (lambda: f(q, k, v))),
                                                ("fwd+bwd", 3.5, lambda f: forward_backward(f, q, k, v, grad_out))):
                    times = {"ours": time_ms(make(ours), [q, k, v]), "SDPA": time_ms(make(sdpa), [q, k, v]),
                             "eager": time_ms(make(eager), [q, k, v]) if run_eager else float("nan")}
                    tflops = {key: flops * flop_factor / (ms * 1e-3) / 1e12 for key, ms in times.items()}
                    # fwd: q, k, v, out (4 tensors); bwd adds q, k, v, out, dout read and dq, dk, dv written (8)
                    gbps = io_bytes * (3 if name == "fwd+bwd" else 1) / (times["ours"] * 1e-3) / 1e9
                    print(f"{seq_len:>6} {head_dim:>4} {str(causal):>6} {name:>8} | {tflops['ours']:7.1f} "
                          f"{tflops['SDPA']:7.1f} {tflops['eager']:7.1f} | {gbps:9.0f} | "
                          f"{times['SDPA'] / times['ours']:6.2f} {times['eager'] / times['ours']:6.2f}")
                del q, k, v, grad_out
                torch.cuda.empty_cache()


def check_attention_shape(ours, sdpa, q, k, v, grad_out):
    """Output and gradients of our kernel match SDPA's at this shape, before anything is timed."""
    out = ours(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = sdpa(q, k, v)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    for name, actual, wanted in zip(("out", "dq", "dk", "dv"), (out,) + grads, (expected,) + expected_grads):
        error = ((actual.float() - wanted.float()).abs().max() / wanted.float().abs().max().clamp(min=1e-6)).item()
        if not error < 2e-2:
            raise SystemExit(f"bench_kernels.py: {name} differs from SDPA by {error:.3g} (relative) at "
                             f"{tuple(q.shape)}; not timing a wrong kernel")


def bench_softmax(element_type):
    print("\n== softmax over the last dim of (B, H, T, T) scores: GB/s, and our speed ÷ torch.softmax's")
    print(f"{'T':>6} {'pass':>8} | {'ours GB/s':>9} {'torch GB/s':>10} | {'ratio':>6}")
    for seq_len in numbers(seq_lens):
        shape = (batch, heads, seq_len, seq_len)
        # x, dy, y, dx and one temporary: skip shapes that would not fit
        if 5 * math.prod(shape) * element_type.itemsize > 0.6 * torch.cuda.get_device_properties(0).total_memory:
            print(f"{seq_len:>6} skipped: {shape} does not fit comfortably in memory")
            continue
        x = torch.randn(shape, device="cuda", dtype=element_type, requires_grad=True)
        grad_probs = torch.randn_like(x)
        ours, wanted = softmax(x[:1]), torch.softmax(x[:1].float(), dim=-1)  # check one batch row (memory)
        if not (ours.float() - wanted).abs().max().item() < 1e-2:
            raise SystemExit(f"bench_kernels.py: softmax differs from torch at {shape}; not timing it")
        del ours, wanted
        tensor_bytes = x.numel() * x.element_size()
        for name, passes, run_ours, run_torch in (
                ("fwd", 2, lambda: softmax(x), lambda: torch.softmax(x, dim=-1)),  # read x, write y
                ("fwd+bwd", 5, lambda: softmax(x).backward(grad_probs),  # + read y, dy; write dx
                 lambda: torch.softmax(x, dim=-1).backward(grad_probs))):
            ms_ours, ms_torch = time_ms(run_ours, [x]), time_ms(run_torch, [x])
            print(f"{seq_len:>6} {name:>8} | {passes * tensor_bytes / ms_ours / 1e6:9.0f} "
                  f"{passes * tensor_bytes / ms_torch / 1e6:10.0f} | {ms_torch / ms_ours:6.2f}")
        del x, grad_probs
        torch.cuda.empty_cache()


def bench_cross_entropy(element_type):
    print(f"\n== cross-entropy, {cross_entropy_rows} tokens × {vocab_size} vocab, forward + backward")
    logits = torch.randn(cross_entropy_rows, vocab_size, device="cuda", dtype=element_type, requires_grad=True)
    targets = torch.randint(0, vocab_size, (cross_entropy_rows,), device="cuda")
    if not abs(cross_entropy(logits, targets).item() - cross_entropy_reference(logits, targets).item()) < 1e-2:
        raise SystemExit("bench_kernels.py: cross_entropy differs from F.cross_entropy; not timing it")
    for name, loss_of in (("ours", cross_entropy), ("F.cross_entropy", F.cross_entropy)):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = time_ms(lambda: loss_of(logits, targets).backward(), [logits])
        extra = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        print(f"{name:>16}: {ms:7.2f} ms, peak extra memory {extra:7.0f} MiB")


def smoke_test():
    """No GPU: check each kernel against its reference through the interpreter, at tiny shapes."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 33, 32, requires_grad=True) for _ in range(3))
    mask = torch.arange(33)[None, :] < torch.tensor([[33], [20]])  # (B, T_k) True = real token
    errors = {}
    out, expected = flash_attention(q, k, v, True, mask), attention_reference(q, k, v, True, mask)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    errors["attention forward"] = (out - expected).abs().max().item()
    errors["attention backward"] = max((a - b).abs().max().item() for a, b in zip(grads, expected_grads))
    x = torch.randn(2, 2, 5, 100, requires_grad=True)
    probs, expected = softmax(x, 0.5, True), softmax_reference(x, 0.5, True)
    errors["softmax forward"] = (probs - expected).abs().max().item()
    errors["softmax backward"] = (torch.autograd.grad(probs.square().sum(), x)[0]
                                  - torch.autograd.grad(expected.square().sum(), x)[0]).abs().max().item()
    logits, targets = torch.randn(6, 100, requires_grad=True), torch.randint(0, 100, (6,))
    errors["cross-entropy"] = abs(cross_entropy(logits, targets) - cross_entropy_reference(logits, targets)).item()
    for name, error in errors.items():
        print(f"  {name:<20} max |ours − reference| = {error:.2e}  {'ok' if error < 1e-4 else 'FAILED'}")
    return all(error < 1e-4 for error in errors.values())


if __name__ == "__main__":
    print(f"torch {torch.__version__}, triton {triton.__version__}")
    if not torch.cuda.is_available():
        print("CUDA is not available: no timings are measured (none are claimed). Running the correctness smoke "
              "test through the Triton interpreter instead.")
        sys.exit(0 if smoke_test() else 1)
    element_type = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    print(f"GPU: {torch.cuda.get_device_name(0)}, dtype {dtype}")
    bench_attention(element_type)
    bench_softmax(element_type)
    bench_cross_entropy(element_type)
