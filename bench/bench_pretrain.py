"""Benchmark: training throughput (tokens/s, achieved FLOP/s, MFU) and generation speed with vs without the
KV cache, for one model configuration on random tokens. It prints figures; it is not a test.

    python bench/bench_pretrain.py                               # the default train_pretrain.py model
    python bench/bench_pretrain.py --device=cuda --dtype=bfloat16 --n_layer=12 --n_embd=768 --batch_size=16
MFU = achieved FLOP/s / peak FLOP/s, with training FLOPs per token = 6N + 12·L·C·T (PaLM, appendix B).
Pass --peak_tflops for your hardware (e.g. 989 for H100 SXM bf16 dense); without it MFU is not printed.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanollm import distributed as dist_utils  # noqa: E402
from nanollm.configurator import configure  # noqa: E402
from nanollm.model import GPT, GPTConfig  # noqa: E402

vocab_size = 2048
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
batch_size = 16
attn_impl = "sdpa"
device = "auto"
dtype = "auto"
train_iters = 10  # timed iterations (after 2 warmup iterations)
gen_batch = 1
gen_prompt = 16
gen_tokens = 100
peak_tflops = 0.0  # 0 = unknown: MFU not printed
compile = False
configure(globals(), sys.argv[1:])

device = dist_utils.pick_device(device)
device_type = device.split(":")[0]
dtype = dist_utils.resolve_dtype(dtype, device_type)
ctx = dist_utils.autocast(device_type, dtype)
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      attn_impl=attn_impl)).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
train_model = torch.compile(model) if compile else model
n_params = model.num_parameters()
print(f"device={device} dtype={dtype} attn_impl={attn_impl} params={n_params / 1e6:.2f}M torch={torch.__version__} "
      f"threads={torch.get_num_threads()}")


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


# ---- training throughput
x = torch.randint(0, vocab_size, (batch_size, block_size), device=device)
for i in range(train_iters + 2):
    if i == 2:
        sync()
        t0 = time.perf_counter()
    with ctx:
        _, loss = train_model(x, x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
sync()
dt = (time.perf_counter() - t0) / train_iters
tokens_per_sec = batch_size * block_size / dt
flops_per_sec = model.flops_per_token(block_size) * tokens_per_sec
line = f"train: {dt * 1000:.1f} ms/iter, {tokens_per_sec:,.0f} tokens/s, {flops_per_sec / 1e12:.3f} TFLOP/s achieved"
if peak_tflops > 0:
    line += f", MFU {100 * flops_per_sec / (peak_tflops * 1e12):.1f}%"
print(line)

# ---- generation: KV cache vs recomputing the whole prefix each step
model.eval()
prompt = torch.randint(0, vocab_size, (gen_batch, gen_prompt), device=device)
results = {}
for use_cache in (True, False):
    model.generate(prompt, 4, use_cache=use_cache)  # warmup
    sync()
    t0 = time.perf_counter()
    with ctx:
        out = model.generate(prompt, gen_tokens, temperature=0, use_cache=use_cache)
    sync()
    results[use_cache] = (gen_batch * gen_tokens / (time.perf_counter() - t0), out)
same = torch.equal(results[True][1], results[False][1])
print(f"generate ({gen_batch} x {gen_tokens} new tokens after {gen_prompt}): with KV cache {results[True][0]:,.0f} "
      f"tokens/s, without {results[False][0]:,.0f} tokens/s, speed-up {results[True][0] / results[False][0]:.2f}x; "
      f"identical greedy outputs: {same}")
