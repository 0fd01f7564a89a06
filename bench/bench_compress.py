"""Benchmark: what int8 quantization and magnitude pruning save and cost, all measured in one run on this machine.

    python bench/bench_compress.py                  # out/ (python train_pretrain.py) on data/world val
    python bench/bench_compress.py --out_dir=out-sft --sparsities=0,0.5,0.9 --finetune_iters=0
docs/results.md measured out/ of `python train_pretrain.py` (the default) and of `--preset=gpt2` (GPT-2's block).
Table 1: fp32 vs our int8 (both matmul paths) vs PyTorch's dynamic int8: size on disk, perplexity, greedy CPU
generation speed (batch 1, KV cache; interleaved rounds, the best round reported) and how many greedy tokens match
fp32's. Table 2: global magnitude pruning, sparsity vs perplexity, before and after a short fine-tune with the masks.
It prints figures; it is not a test. Speeds on a shared machine are noisy: the load average is printed with them.
"""
import copy
import io
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nanollm.quantize as quantize  # noqa: E402
from nanollm.configurator import configure, reject_renamed  # noqa: E402
from nanollm.evaluation import perplexity_on_tokens, read_token_stream  # noqa: E402
from nanollm.loader import load_model  # noqa: E402
from nanollm.prune import finetune, magnitude_prune, sparsity_report  # noqa: E402

out_dir = "out"  # the model to compress (a checkpoint folder)
data_dir = os.path.join("data", "world")  # prepared data: perplexity on `split`, fine-tune on train
split = "val"
eval_tokens = 0  # perplexity over at most this many tokens (0 = the whole split)
gen_prompt = "Talo"
gen_tokens = 100  # greedy tokens per timed generation
gen_rounds = 5  # timed rounds, interleaved over the models; the fastest round counts (least disturbed)
threads = 1  # torch CPU threads for everything (1 is fair on a shared machine; 0 = torch's default)
torch_dynamic = True  # also measure torch.ao.quantization.quantize_dynamic (int8 activations and weights)
sparsities = "0,0.3,0.5,0.7,0.9"  # pruning table rows
finetune_iters = 20  # fine-tune steps after pruning, masks kept (0 = no fine-tune column)
finetune_lr = 1e-4
finetune_batch = 16
seed = 1337
reject_renamed(sys.argv[1:], {"ckpt_dir": "out_dir"})
configure(globals(), sys.argv[1:])

if not os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
    raise FileNotFoundError(f"{out_dir}/ckpt.pt not found: create it with `python train_pretrain.py` "
                            f"(about 2 minutes on a 2-core CPU), or pass --out_dir=<a folder holding ckpt.pt>")
if threads:
    torch.set_num_threads(threads)
t_start = time.time()
base, tokenizer, _, _ = load_model(out_dir)
tokens = read_token_stream(data_dir, tokenizer, split)
prompt = torch.tensor([tokenizer.encode(gen_prompt, bos=True)])  # (1, T)
gen_tokens = min(gen_tokens, base.config.block_size - prompt.size(1))
print(f"model {out_dir}: {base.num_parameters() / 1e6:.2f} M parameters; perplexity on {data_dir} {split} "
      f"({eval_tokens or tokens.numel() - 1:,} tokens); torch {torch.__version__}, "
      f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs")


def file_megabytes(save):
    """Size of what save(path) writes, in MB (10^6 bytes)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.pt")
        save(path)
        return os.path.getsize(path) / 1e6


def ppl(model):
    return perplexity_on_tokens(model, tokens, max_tokens=eval_tokens)["ppl"]


# ---- 1. the models: fp32, ours (saved as int8 and loaded back from the file), PyTorch's dynamic quantization
rows = {"fp32": {"size": file_megabytes(lambda path: torch.save(base.state_dict(), path)), "model": base}}
with tempfile.TemporaryDirectory() as folder:
    int8_path = os.path.join(folder, quantize.QUANTIZED_FILE)
    quantized = copy.deepcopy(base)
    names = quantize.quantize_model(quantized)
    quantize.save_quantized(quantized, int8_path)
    int8 = load_model(int8_path).model  # what a fresh process would load
    int8_size = os.path.getsize(int8_path) / 1e6
rows["int8 ours, reference matmul"] = {"size": int8_size, "model": int8, "path": "reference"}
rows["int8 ours, _weight_int8pack_mm"] = {"size": int8_size, "model": int8, "path": "int8pack"}
if not quantize.int8pack_available():
    print("torch._weight_int8pack_mm is not in this torch: its row is left out")
    del rows["int8 ours, _weight_int8pack_mm"]
if torch_dynamic:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {torch.nn.Linear}, dtype=torch.qint8)
        buffer = io.BytesIO()
        torch.save(dynamic.state_dict(), buffer)
    rows["torch.ao dynamic int8"] = {"size": len(buffer.getvalue()) / 1e6, "model": dynamic}
print(f"our int8: {len(names)} Linear layers quantized (per-row scales; an untied lm_head is one of them); the token "
      f"embedding (and a tied lm_head), position embedding and norms stay fp32")

for name, row in rows.items():
    quantize.matmul_path = "auto"  # perplexity batches: 'auto' takes the reference path for > 16 rows
    row["ppl"] = rows["int8 ours, reference matmul"]["ppl"] if name.endswith("int8pack_mm") else ppl(row["model"])


def generate(row):
    quantize.matmul_path = row.get("path", "auto")
    t0 = time.perf_counter()
    out = row["model"].generate(prompt, gen_tokens, temperature=0.0)  # (1, T + n), greedy, KV cache
    return gen_tokens / (time.perf_counter() - t0), out[0, prompt.size(1):]


for row in rows.values():
    generate(row)  # warm-up (first-call allocations, kernel selection)
load_before = os.getloadavg()[0]
for _ in range(gen_rounds):
    for row in rows.values():
        speed, generated = generate(row)
        row["speed"] = max(row.get("speed", 0.0), speed)
        row["generated"] = generated
load_after = os.getloadavg()[0]
reference = rows["fp32"]["generated"]

print(f"\nTable 1 (load average {load_before:.2f} before timing, {load_after:.2f} after; {os.cpu_count()} CPUs)")
print("| model | size on disk | compression | val perplexity | greedy tokens/s (CPU, batch 1) | "
      "greedy tokens equal to fp32's before the first difference |")
print("|---|---|---|---|---|---|")
for name, row in rows.items():
    differs = (row["generated"] != reference).nonzero()
    same_prefix = int(differs[0]) if len(differs) else gen_tokens
    print(f"| {name} | {row['size']:.2f} MB | {rows['fp32']['size'] / row['size']:.2f}x | {row['ppl']:.4f} | "
          f"{row['speed']:.0f} | {same_prefix}/{gen_tokens} |")
print("(sizes: the model's weights alone, as saved; the int8pack row shares the int8 file and perplexity of the "
      "row above. Training checkpoints are larger: they also hold the optimizer state)")

# ---- 2. pruning: sparsity vs perplexity, then a short fine-tune that keeps the masks
print(f"\nTable 2: global magnitude pruning of the Linear weights ({data_dir} {split} perplexity"
      + (f"; fine-tune: {finetune_iters} AdamW steps, lr {finetune_lr}, batch {finetune_batch} x "
         f"{base.config.block_size} tokens of train" if finetune_iters else "") + ")")
header = "| sparsity of Linear weights | of all weights | val perplexity |"
print(header + (" after fine-tune |" if finetune_iters else ""))
print("|---|---|---|" + ("---|" if finetune_iters else ""))
for sparsity in [float(value) for value in sparsities.strip("()[] ").split(",")]:  # 0,0.5 arrives as "(0, 0.5)"
    pruned = copy.deepcopy(base)
    magnitude_prune(pruned, sparsity)
    report = sparsity_report(pruned)
    line = f"| {report['sparsity']:.1%} | {report['model_sparsity']:.1%} | {ppl(pruned):.4f} |"
    if finetune_iters:
        finetune(pruned, data_dir, finetune_iters, finetune_lr, finetune_batch, seed=seed)
        assert sparsity_report(pruned)["zeros"] == report["zeros"], "a pruned weight came back to life"
        line += f" {ppl(pruned):.4f} |"
    print(line)
print(f"\n(total time {time.time() - t_start:.0f} s)")
