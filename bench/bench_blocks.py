"""Benchmark: each architecture option of the GPT (and the Muon optimizer, and a larger vocabulary) alone, and a
combination, against GPT-2's block at equal process CPU time on real public-domain English text; held-out bits per byte
decides (it does not depend on the tokenizer). It prints a markdown table; it is not a test.

    python bench/bench_blocks.py                                    # fetch the text, then every run, 3 seeds, in turn
    python bench/bench_blocks.py --prepare_only=True; for s in 1 2 3; do python bench/bench_blocks.py --seeds=$s & done
    python bench/bench_blocks.py --seeds=2 --runs=classic,rope      # a subset; results add to work_dir/results.jsonl
    python bench/bench_blocks.py --report_only=True                 # the table of everything in results.jsonl
Text: the four English texts of the Canterbury corpus, which the `brotli` package's source distribution ships as test
data (Carroll's Alice's Adventures in Wonderland, Shakespeare's As You Like It, Milton's Paradise Lost, and the 1992
Library of Congress workshop proceedings as distributed by Project Gutenberg; 1.19 MB, public domain). `pip download`
fetches it from the package index; nothing is vendored. Passages of about 2,000 characters are the documents; 10% of
them, drawn at random, are held out.
Equal time means process CPU time (time.process_time, one torch thread): the machine is shared with other jobs, so wall
time would measure their load, not the model. The learning rate follows the fraction of the budget spent (warmup, then
cosine to min_lr, as train_pretrain.py over its iterations), so every run completes its schedule. A seed gives the same
batches in the same order to every run; every run of a vocabulary is scored on the same held-out batches.
"""
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from contextlib import nullcontext

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from nanollm.configurator import UserError, configure  # noqa: E402
from nanollm.data import get_batch, load_meta, load_tokenizer, prepare_dataset  # noqa: E402
from nanollm.metrics import token_byte_lengths  # noqa: E402
from nanollm.model import GPT, GPTConfig  # noqa: E402
from nanollm.optim import Schedule, configure_optimizer  # noqa: E402
from nanollm.pretraining import estimate_loss  # noqa: E402

runs = ("classic,rope,rmsnorm,swiglu,relu2,gqa,qk_norm,untied,muon,vocab8k,best,"  # names in RUNS, 'best', or options
        "position=rope+mlp=relu2+qk_norm=True+tie_embeddings=False+optimizer=muon")
best = "position=rope,mlp=relu2,qk_norm=True,tie_embeddings=False"  # the run 'best': the single options that won
# a run may also be its options joined by '+', e.g. position=rope+optimizer=muon
seeds = "1,2,3"
cpu_seconds = 25.0  # training budget of each run in process CPU seconds (evaluation not counted)
work_dir = "/tmp/bench_blocks"  # the downloaded package, the prepared data and results.jsonl
eval_iters = 20  # held-out batches per split (16 x 128 tokens each)
report_only = False  # True: print the table of results.jsonl and stop
prepare_only = False  # True: fetch and prepare the data, then stop (before starting several seeds side by side)
# train_pretrain.py's default sizes and schedule; the block is GPTConfig's (GPT-2's, train_pretrain.py --preset=gpt2)
# with a run's options on top, and the optimizer AdamW unless a run names one: train_pretrain.py's defaults changed
vocab_size, block_size, batch_size, n_layer, n_head, n_embd = 2048, 128, 16, 4, 4, 128
learning_rate, min_lr, warmup, weight_decay, beta1, beta2, grad_clip = 2e-3, 2e-4, 0.05, 0.1, 0.9, 0.95, 1.0
configure(globals(), sys.argv[1:])

RUNS = {  # each changes one thing in GPT-2's block (nanollm/model.py GPTConfig) or in the training
    "classic": {}, "rope": dict(position="rope"), "rmsnorm": dict(norm="rmsnorm"), "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2"), "gqa": dict(n_kv_head=2), "mqa": dict(n_kv_head=1), "qk_norm": dict(qk_norm=True),
    "untied": dict(tie_embeddings=False), "no_bias": dict(bias=False), "muon": dict(optimizer="muon"),
    "vocab8k": dict(vocab_size=8192),
}
BROTLI = "brotli==1.2.1"  # its sdist carries tests/testdata/*.txt: the Canterbury corpus
TEXTS = ("alice29.txt", "asyoulik.txt", "plrabn12.txt", "lcet10.txt")
PASSAGE_CHARS = 2000  # paragraphs are joined into documents of at least this many characters
EVAL_SEED = 12345  # the held-out batches: the same for every run and seed
RESULTS = os.path.join(work_dir, "results.jsonl")


def parse_options(text):
    """'position=rope,qk_norm=True,n_kv_head=2' -> {'position': 'rope', 'qk_norm': True, 'n_kv_head': 2}"""
    options = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        options[key] = {"True": True, "False": False}.get(value, int(value) if value.isdigit() else value)
    return options


def fetch_corpus():
    """work_dir/canterbury.jsonl: the four texts as passages, one {"text": ...} per line (built once)."""
    corpus = os.path.join(work_dir, "canterbury.jsonl")
    if os.path.exists(corpus):
        return corpus
    download = os.path.join(work_dir, "download")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", BROTLI, "-d",
                    download], check=True)
    archive = os.path.join(download, sorted(os.listdir(download))[0])
    documents = []
    with tarfile.open(archive) as tar:
        for name in TEXTS:
            member = next(m for m in tar.getmembers() if m.name.endswith("tests/testdata/" + name))
            text = tar.extractfile(member).read().decode("latin-1").replace("\r\n", "\n")
            lines = "\n".join(line.strip() for line in text.split("\n"))  # centred layout: indentation dropped
            passage = ""
            for paragraph in filter(None, (p.strip() for p in lines.split("\n\n"))):
                passage = f"{passage}\n\n{paragraph}" if passage else paragraph
                if len(passage) >= PASSAGE_CHARS:
                    documents.append(passage)
                    passage = ""
            documents += [passage] if passage else []
    with open(corpus + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": document}) + "\n" for document in documents)
    os.replace(corpus + ".tmp", corpus)
    return corpus


def prepare(vocab):
    return prepare_dataset(fetch_corpus(), os.path.join(work_dir, f"data_{vocab}"), vocab_size=vocab,
                           val_fraction=0.1, seed=0)


def train(run, seed):
    """One run: its options, the budget of CPU seconds, then the held-out scores; returns its result record."""
    options = dict(parse_options(best) if run == "best" else RUNS[run] if run in RUNS
                   else parse_options(run.replace("+", ",")))
    optimizer_name, vocab = options.pop("optimizer", "adamw"), options.pop("vocab_size", vocab_size)
    data_dir = prepare(vocab)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=load_meta(data_dir)["vocab_size"], block_size=block_size, n_layer=n_layer,
                          n_head=n_head, n_embd=n_embd, attn_impl="sdpa", **options))
    optimizer = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), "cpu", False, optimizer_name)
    schedule = Schedule(learning_rate, round(warmup * 1000), -1, 1000, min_lr)  # "iterations": thousandths of budget
    spent, steps, wall = 0.0, 0, time.time()
    while spent < cpu_seconds:
        start = time.process_time()
        schedule.set(optimizer, int(1000 * spent / cpu_seconds))
        x, y = get_batch(data_dir, "train", batch_size, block_size, seed, steps, 0)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        spent += time.process_time() - start
        steps += 1
    scores = estimate_loss(model, lambda split, k: dict(zip(("idx", "targets"), get_batch(
        data_dir, split, batch_size, block_size, EVAL_SEED, k, 0))), eval_iters, nullcontext(),
        token_byte_lengths(load_tokenizer(data_dir)))
    return {"run": run, "options": options, "optimizer": optimizer_name, "vocab": vocab, "seed": seed,
            "val_bpb": scores["val_bpb"], "train_bpb": scores["train_bpb"], "steps": steps, "cpu_seconds": spent,
            "wall_seconds": time.time() - wall, "tokens_per_cpu_second": steps * batch_size * block_size / spent,
            "parameters": model.num_parameters(), "last_loss": loss.item()}


def report():
    """Markdown table: per run, mean ± std over seeds (the last result of each run and seed), and the paired
    difference to 'classic' on the same seeds."""
    latest = {}
    with open(RESULTS) as f:
        for record in map(json.loads, f):
            latest[record["run"], record["seed"]] = record
    by_run = {}
    for (run, seed), record in sorted(latest.items()):
        by_run.setdefault(run, {})[seed] = record

    def mean_std(values):
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f}"

    print("| run | options | seeds | val bpb | Δ vs classic (paired) | train bpb | steps | tokens / CPU-s | "
          "parameters |")
    print("|---|---|---|---|---|---|---|---|---|")
    classic = by_run.get("classic", {})
    for run, records in sorted(by_run.items(), key=lambda item: statistics.mean(r["val_bpb"]
                                                                              for r in item[1].values())):
        first = next(iter(records.values()))
        options = [f"{k}={v}" for k, v in first["options"].items()]
        options += [f"optimizer={first['optimizer']}"] if first["optimizer"] != "adamw" else []
        options += [f"vocab_size={first['vocab']}"] if first["vocab"] != vocab_size else []
        shared = [seed for seed in records if seed in classic]
        delta = mean_std([records[s]["val_bpb"] - classic[s]["val_bpb"] for s in shared]) if shared else "-"
        column = lambda key: [r[key] for r in records.values()]  # noqa: E731
        name = run if "=" not in run else "combination"  # its options are in the next column
        print(f"| {name} | {', '.join(options) or 'GPT-2 block'} | {len(records)} | {mean_std(column('val_bpb'))} | "
              f"{delta if run != 'classic' else '-'} | {mean_std(column('train_bpb'))} | "
              f"{statistics.mean(column('steps')):.0f} | {statistics.mean(column('tokens_per_cpu_second')):,.0f} | "
              f"{first['parameters']:,} |")


if __name__ == "__main__":
    os.makedirs(work_dir, exist_ok=True)
    if not report_only:
        torch.set_num_threads(1)  # one thread: CPU seconds are the model's, not a thread pool's spinning
        names = [name for name in runs.split(",") if name]
        unknown = [name for name in names if name not in RUNS and name != "best" and "=" not in name]
        if unknown:
            raise UserError(f"runs: unknown {unknown}; expected names from {tuple(RUNS)} or 'best'")
        for vocab in sorted({RUNS.get(name, {}).get("vocab_size", vocab_size) for name in names} | {vocab_size}):
            prepare(vocab)
        for seed in ([] if prepare_only else [int(s) for s in seeds.split(",")]):
            for name in names:
                record = train(name, seed)
                print(f"[bench] {json.dumps(record)}", flush=True)
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(record) + "\n")
    if os.path.exists(RESULTS):
        report()
