"""Benchmark: AdamW, LAMB, LARS and Muon at a large batch, on the same data and the same token budget.

    python bench/bench_optimizers.py --jobs=15            # world corpus, 8x the default batch, ~8 min of CPU
    python bench/bench_optimizers.py --max_iters=600 --extra="--n_layer=4 --n_embd=128" --device=cuda
Every optimizer trains train_pretrain.py on GPT-2's block (--preset=gpt2) with
gradient_accumulation_steps=8 (8 x the default 16 x 128 tokens per step) for max_iters steps, once per learning rate
of its small grid (min_lr = learning rate / 10). The learning rate of each optimizer is chosen by the training split's
loss at the end (eval batches of train.bin); the table then reports the held-out validation split's loss and bits per
byte of that run, so the choice does not peek at what is reported. It prints two markdown tables (the chosen runs, then
the whole grid); it is not a test.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from nanollm.configurator import UserError, configure  # noqa: E402

# optimizer:learning rates (slash-separated), comma-separated. In 40-60 steps the best rates are high. LAMB moves each
# matrix by lr·‖w‖ per step, about lr·0.02 per weight at the initial scale, where AdamW moves a weight by up to lr, so
# its rates sit higher; LARS moves a matrix by at most lr·‖w‖ before momentum (~10x that after); Muon's update has
# AdamW's RMS (nanollm/optim.py). A first grid at 60 steps put AdamW's best at 8e-3 and LAMB at 5e-3 far too low
# (docs/optimizers.md).
grid = ("adamw:4e-3/8e-3/1.6e-2,lamb:5e-2/1e-1/2e-1/4e-1,lars:2e-2/5e-2/1e-1,"
        "muon:8e-3/1.6e-2/3.2e-2/6.4e-2/1.28e-1")
max_iters = 40  # optimizer steps per run: every run sees max_iters x 16,384 tokens
gradient_accumulation_steps = 8  # 8 micro-batches of 16 x 128 tokens per step: 8 x the default batch
warmup_iters = 4  # a tenth of the steps
dataset = "world"
work_dir = "/tmp/bench_optimizers"  # prepared data and runs go here
device = "cpu"
extra = "--n_layer=2 --n_embd=64 --n_head=2"  # more train_pretrain.py arguments, space-separated
jobs = 1  # runs at once (each one process with its own CPU time measured; the numbers do not depend on it)
configure(globals(), sys.argv[1:])
CLASSIC = ["--preset=gpt2"]  # GPT-2's block and AdamW, as the docs measured it; a setting named after it wins


def parse_grid(text):
    """'adamw:1e-3/2e-3,lamb:1e-2' -> {'adamw': [0.001, 0.002], 'lamb': [0.01]}"""
    try:
        return {name: [float(lr) for lr in rates.split("/")]
                for name, rates in (item.split(":") for item in text.split(","))}
    except ValueError:
        raise UserError(f"grid={text!r}: expected optimizer:lr/lr/...,optimizer:lr/...") from None


def train(optimizer, learning_rate):
    """Run train_pretrain.py; returns (its final evaluation record, the CPU seconds that process used)."""
    out_dir = os.path.join(work_dir, f"{optimizer}_{learning_rate:g}")
    command = [sys.executable, os.path.join(REPO, "train_pretrain.py")] + CLASSIC + [f"--dataset={dataset}",
               f"--data_dir={os.path.join(work_dir, 'data')}", f"--out_dir={out_dir}", f"--optimizer={optimizer}",
               f"--learning_rate={learning_rate}", f"--min_lr={learning_rate / 10}", f"--max_iters={max_iters}",
               f"--eval_interval={max_iters}", f"--warmup_iters={warmup_iters}", "--eval_iters=16",
               f"--gradient_accumulation_steps={gradient_accumulation_steps}", f"--device={device}",
               "--overwrite=True", "--sample_tokens=1", "--log_interval=1"] + extra.split()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_output.txt"), "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own CPU time, even with other runs in parallel
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        with open(os.path.join(out_dir, "bench_output.txt")) as output:
            sys.exit(f"train_pretrain.py failed for {optimizer} at lr {learning_rate}:\n{output.read()[-2000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        final = [r for r in map(json.loads, f) if "val_loss" in r][-1]
    return final, usage.ru_utime + usage.ru_stime


def table(rows):
    lines = ["| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) and k != "CPU s" else
                                       f"{v:.0f}" if isinstance(v, float) else str(v) for k, v in row.items()) + " |")
    return "\n".join(lines)


def run(job):
    optimizer, learning_rate = job
    final, cpu_seconds = train(optimizer, learning_rate)
    row = {"optimizer": optimizer, "learning rate": f"{learning_rate:g}", "train loss": final["train_loss"],
           "val loss": final["val_loss"], "val bpb": final["val_bpb"], "CPU s": cpu_seconds}
    print(f"[bench] {row}", flush=True)
    return row


# the data is prepared once, before runs start in parallel
subprocess.run([sys.executable, os.path.join(REPO, "train_pretrain.py")] + CLASSIC +
               [f"--dataset={dataset}", "--eval_only=True", f"--data_dir={os.path.join(work_dir, 'data')}",
                f"--out_dir={os.path.join(work_dir, 'prepare')}", "--overwrite=True", f"--device={device}"]
               + extra.split(), check=True, capture_output=True)
jobs_list = [(name, lr) for name, rates in parse_grid(grid).items() for lr in rates]
with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait for their subprocess
    runs = list(pool.map(run, jobs_list))

chosen = [min((run for run in runs if run["optimizer"] == name), key=lambda run: run["train loss"])
          for name in parse_grid(grid)]  # the learning rate picked on the training split
print(f"\nChosen learning rate per optimizer (by train loss), {max_iters} steps of "
      f"{gradient_accumulation_steps} x the default batch:\n")
print(table(chosen))
print("\nThe whole grid:\n")
print(table(runs))
print(f"\nTotal CPU: {sum(run['CPU s'] for run in runs):.0f} s")
