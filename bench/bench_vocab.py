"""Benchmark: the same corpus and wall-clock budget at several vocabulary sizes; held-out bits per byte decides.

    python bench/bench_vocab.py                                   # world corpus, 2k / 8k / 32k, ~90 s of training each
    python bench/bench_vocab.py --vocab_sizes=2048,8192 --seconds=300 --device=cuda
Each vocabulary trains train_pretrain.py (its default sizes, with GPT-2's block and AdamW: --preset=gpt2,
as docs/vocab.md measured it) for about `seconds`: a short calibration run measures the time per iteration, then
max_iters = seconds / that time. Loss and perplexity are per token, so they cannot be compared across vocabularies;
bits per byte (val_bpb) can. It prints a markdown table; it is not a test.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from nanollm.configurator import configure  # noqa: E402
from nanollm.data import load_meta, load_tokenizer  # noqa: E402

vocab_sizes = "2048,8192,32768"  # comma-separated SentencePiece vocabulary sizes
seconds = 90.0  # training budget per vocabulary (wall clock, evaluation included)
calibration_iters = 8  # iterations timed to choose max_iters
dataset = "world"
work_dir = "/tmp/bench_vocab"  # prepared data and runs go here
device = "cpu"
extra = ""  # more train_pretrain.py arguments, space-separated (e.g. "--n_layer=6")
configure(globals(), sys.argv[1:])
CLASSIC = ["--preset=gpt2"]  # GPT-2's block and AdamW, as the docs measured it; a setting named after it wins


def train(vocab_size, out_name, max_iters):
    """Run train_pretrain.py; returns (its stdout, its metrics records)."""
    out_dir = os.path.join(work_dir, out_name)
    command = [sys.executable, os.path.join(REPO, "train_pretrain.py")] + CLASSIC + [f"--dataset={dataset}",
               f"--data_dir={os.path.join(work_dir, f'data_{vocab_size}')}", f"--vocab_size={vocab_size}",
               f"--out_dir={out_dir}", f"--max_iters={max_iters}", f"--eval_interval={max(max_iters, 1)}",
               f"--device={device}", "--overwrite=True", "--sample_tokens=1", "--log_interval=1"] + extra.split()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"train_pretrain.py failed at vocab_size={vocab_size}:\n{result.stderr[-2000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return result.stdout, [json.loads(line) for line in f]


def chars_per_token(data_dir):
    """Characters of the decoded val text per val token (the tokenizer's compression)."""
    meta = load_meta(data_dir)
    ids = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=meta["dtype"]).tolist()
    return len(load_tokenizer(data_dir).decode(ids, skip_special=True)) / len(ids)


rows = []
for vocab_size in [int(v) for v in vocab_sizes.split(",")]:
    _, records = train(vocab_size, f"calibrate_{vocab_size}", calibration_iters)  # also prepares the data once
    step_ms = float(np.median([r["dt_ms"] for r in records if "dt_ms" in r][1:]))  # skip the warm-up step
    max_iters = max(1, int(seconds * 1000 / step_ms))
    stdout, records = train(vocab_size, f"run_{vocab_size}", max_iters)
    final = [r for r in records if "val_bpb" in r][-1]
    trained = float(re.search(r"trained \d+ iterations in ([\d.]+) s", stdout).group(1))
    params = int(re.search(r"total\s+([\d,]+)", stdout).group(1).replace(",", "")) \
        if re.search(r"total\s+([\d,]+)", stdout) else None
    data_dir = os.path.join(work_dir, f"data_{vocab_size}")
    rows.append({"asked vocab": vocab_size, "real vocab": load_meta(data_dir)["vocab_size"], "params": params,
                 "iters": max_iters, "seconds": trained, "chars/token": chars_per_token(data_dir),
                 "val loss": final["val_loss"], "val bpb": final["val_bpb"], "train bpb": final["train_bpb"]})
    print(f"[bench] {rows[-1]}", flush=True)

print("\n| " + " | ".join(rows[0]) + " |\n" + "|---" * len(rows[0]) + "|")
for row in rows:
    print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) and k not in ("seconds", "chars/token")
                            else f"{v:.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
                            for k, v in row.items()) + " |")
