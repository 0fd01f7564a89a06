"""Benchmark: our training step against a plain minimal PyTorch GPT-2 step on the same tokens, then greedy
decoding with vs without the KV cache. It prints figures; it is not a test.

    OMP_NUM_THREADS=2 python bench/bench_pretrain.py           # nanoGPT's CPU shapes: 4 x 128, block 128, batch 16
    python bench/bench_pretrain.py --compile=True              # our model through torch.compile (inductor, gcc on CPU)
    python bench/bench_pretrain.py --device=cuda --dtype=bfloat16 --n_layer=12 --n_embd=768 --peak_tflops=989
"Ours" is one iteration of train_pretrain.py's loop built from the same library pieces (GPT, configure_optimizer,
GuardedStep: clip, non-finite check, step). "Plain" is nanoGPT's loop in its simplest form, written below: SDPA
attention, AdamW (fused where this PyTorch has it), clip, step, no extras. The two alternate step by step, so a
noisy shared machine slows both alike; the ratio is plain time ÷ our time (above 1: ours is faster).
MFU = achieved FLOP/s / peak FLOP/s, with training FLOPs per token = 6N + 12·L·C·T (PaLM, appendix B).
"""
import inspect
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_decode import decode_speed  # noqa: E402
from nanollm import distributed as dist_utils  # noqa: E402
from nanollm.configurator import configure  # noqa: E402
from nanollm.model import GPT, GPTConfig  # noqa: E402
from nanollm.optim import configure_optimizer, get_lr  # noqa: E402
from nanollm.training import GuardedStep  # noqa: E402

vocab_size = 8192  # nanoGPT's CPU example shapes
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
batch_size = 16
attn_impl = "sdpa"
device = "auto"
dtype = "auto"
train_iters = 10  # timed iterations of each loop (after 3 warmup iterations)
compile = False  # torch.compile our model
compile_plain = False  # torch.compile the plain model too
decode = True  # also time greedy decoding (bench/bench_decode.py's model: vocab 2048, block 256, 240 tokens)
peak_tflops = 0.0  # 0 = unknown: MFU not printed
configure(globals(), sys.argv[1:])

runtime = dist_utils.setup(device)
device, device_type = runtime.device, runtime.device_type
dtype = dist_utils.resolve_dtype(dtype, device_type)
ctx = dist_utils.autocast(device_type, dtype)
print(f"device={device} dtype={dtype} attn_impl={attn_impl} torch={torch.__version__} "
      f"threads={torch.get_num_threads()} compile={compile}")


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- the plain loop (nanoGPT's shape, no extras)
class PlainBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.c_attn, self.attn_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.c_fc, self.mlp_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(PlainBlock() for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


torch.manual_seed(0)
plain_model = PlainGPT().to(device)
fused = "fused" in inspect.signature(torch.optim.AdamW).parameters  # CPU and CUDA both have it in recent PyTorch
plain_optimizer = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                    **({"fused": True} if fused else {}))
plain_train = torch.compile(plain_model) if compile_plain else plain_model


def plain_step(iter_num):
    with ctx:
        loss = plain_train(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
    plain_optimizer.step()
    plain_optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------- ours: one iteration of train_pretrain.py
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      attn_impl=attn_impl)).to(device)
optimizer = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), device_type)
scaler = dist_utils.grad_scaler(device_type, dtype)
guarded_step = GuardedStep(optimizer, scaler, 1.0, runtime, dtype)
train_model = torch.compile(model) if compile else model


def our_step(iter_num):
    lr = get_lr(iter_num, 1e-3, 30, 600, 1e-4)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with ctx:
        _, loss = train_model(idx=x, targets=y)
    scaler.scale(loss).backward()
    loss_mean = dist_utils.all_reduce_mean(loss.item(), runtime)  # what the loop logs
    guarded_step(train_model, loss_mean, iter_num)


# ------------------------------------------------------------------------ time both, alternating
tokens = torch.randint(0, vocab_size, (batch_size, block_size + 1), generator=torch.Generator().manual_seed(0))
x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)  # the same tokens for both
print(f"params: ours {model.num_parameters() / 1e6:.2f}M, plain {sum(p.numel() for p in plain_model.parameters()) / 1e6:.2f}M; "
      f"plain AdamW fused={fused}")
t0 = time.perf_counter()
for i in range(3):  # warmup (and compilation)
    plain_step(i)
    our_step(i)
sync()
print(f"warmup (3 steps each, compilation included): {time.perf_counter() - t0:.1f} s")
times = {"ours": [], "plain": []}
for i in range(3, 3 + train_iters):
    for name, step_fn in (("plain", plain_step), ("ours", our_step)):
        sync()
        t0 = time.perf_counter()
        step_fn(i)
        sync()
        times[name].append(time.perf_counter() - t0)
for name, values in times.items():
    print(f"  {name:>5s}: best {min(values) * 1000:.1f} ms, median {statistics.median(values) * 1000:.1f} ms "
          f"per step ({train_iters} steps)")
best_ratio = min(times["plain"]) / min(times["ours"])
median_ratio = statistics.median(times["plain"]) / statistics.median(times["ours"])
dt = statistics.median(times["ours"])
tokens_per_sec = batch_size * block_size / dt
flops_per_sec = model.flops_per_token(block_size) * tokens_per_sec
line = (f"train step ({n_layer} x {n_embd}, block {block_size}, batch {batch_size}, vocab {vocab_size}, {dtype}): "
        f"ours {best_ratio:.2f}x the plain loop's speed (best step vs best step; medians: {median_ratio:.2f}x); "
        f"ours {tokens_per_sec:,.0f} tokens/s, {flops_per_sec / 1e12:.3f} TFLOP/s")
if peak_tflops > 0:
    line += f", MFU {100 * flops_per_sec / (peak_tflops * 1e12):.1f}%"
print(line)

# ------------------------------------------------------------------------ decoding: KV cache vs none
if decode:
    decode_speed(device=device, attn_impl=attn_impl)
