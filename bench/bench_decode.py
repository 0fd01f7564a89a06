"""Benchmark: greedy decoding speed with the KV cache vs recomputing the whole prefix at every step.
It prints figures; it is not a test.

    python bench/bench_decode.py                       # 4 x 128 GPT, vocab 2048, block 256, 1 x 240 tokens after 16
    python bench/bench_decode.py --device=cuda --gen_batch=8
Each path runs `repeats` times; the best run counts (the machine may be shared and noisy).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanollm import distributed as dist_utils  # noqa: E402
from nanollm.configurator import configure  # noqa: E402
from nanollm.model import GPT, GPTConfig  # noqa: E402


def decode_speed(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128, attn_impl="sdpa", device="auto",
                 gen_batch=1, gen_prompt=16, gen_tokens=240, repeats=3):
    """Time greedy generation of gen_tokens after a random prompt, with and without the KV cache; print both
    (best of `repeats` runs each) and their ratio. Returns (cached tokens/s, uncached tokens/s)."""
    device = dist_utils.pick_device(device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd, attn_impl=attn_impl)).to(device).eval()
    print(f"decode: device={device} attn_impl={attn_impl} params={model.num_parameters() / 1e6:.2f}M "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    prompt = torch.randint(0, vocab_size, (gen_batch, gen_prompt), device=device)
    results = {}
    for use_cache in (True, False):
        model.generate(prompt, 8, temperature=0, use_cache=use_cache)  # warmup
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            out = model.generate(prompt, gen_tokens, temperature=0, use_cache=use_cache)
            sync(device)
            times.append(time.perf_counter() - t0)
        rates = sorted(gen_batch * gen_tokens / t for t in times)
        results[use_cache] = (rates[-1], out)
        print(f"  {'with' if use_cache else 'without'} KV cache: best {rates[-1]:,.0f} tokens/s "
              f"(runs: {', '.join(f'{r:,.0f}' for r in rates)})")
    same = torch.equal(results[True][1], results[False][1])
    print(f"decode ({gen_batch} x {gen_tokens} new tokens after {gen_prompt}, greedy): with KV cache "
          f"{results[True][0]:,.0f} tokens/s, without {results[False][0]:,.0f} tokens/s, "
          f"speed-up {results[True][0] / results[False][0]:.2f}x; identical outputs: {same}")
    return results[True][0], results[False][0]


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    settings = dict(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128, attn_impl="sdpa",
                    device="auto", gen_batch=1, gen_prompt=16, gen_tokens=240, repeats=3)
    configure(settings, sys.argv[1:])
    decode_speed(**settings)
