"""Benchmark: SFT of a small student with and without a larger teacher (distillation), at equal steps.

    python pipeline.py                                    # once: the teacher (out-pipeline/sft) and its tokenizer
    python bench/bench_distill.py                         # student base, then SFT twice: plain, and with the teacher
    python bench/bench_distill.py --student_args="--n_layer=2 --n_embd=64" --alphas=0.5,0.1
    python bench/bench_distill.py --student_base=out      # out/ of train_pretrain.py --preset=gpt2 (4 x 128)
The student is pretrained with GPT-2's block and AdamW (--preset=gpt2, then student_args), as in
docs/results.md, on the pipeline's prepared world data (same tokenizer as the teacher), then fine-tuned on
the same SFT demo set for the same iterations: once with the plain cross-entropy (alpha = 1) and once per distill
alpha with train_sft.py --teacher=<the pipeline's SFT model>. It prints one markdown row per run, from each run's
"after" record in metrics.jsonl (the held-out set of the SFT demo). It is not a test.
"""
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from nanollm.configurator import MissingFileError, configure  # noqa: E402

pipeline_dir = "out-pipeline"  # where pipeline.py wrote pretrain/, sft/ (the teacher) and data/
work_dir = "/tmp/bench_distill"  # the student's runs go here
student_base = ""  # a pretrained student on the teacher's tokenizer (e.g. out/ of the default run); '' = pretrain one
student_args = "--n_layer=4 --n_head=4 --n_embd=64 --batch_size=32"  # its shape then (the teacher: 4 x 192)
sft_args = ""  # extra train_sft.py settings for every student run
alphas = "0.5"  # distill_alpha values to run beside the plain run (comma-separated)
distill_temperature = 2.0
device = "cpu"
configure(globals(), sys.argv[1:])
CLASSIC = ["--preset=gpt2"]  # GPT-2's block and AdamW, as the docs measured it; a setting named after it wins


def run(script, args, log_name):
    """Run one script to the end (its output in work_dir/<log_name>.log); seconds taken."""
    t0 = time.time()
    with open(os.path.join(work_dir, log_name + ".log"), "w") as log:
        subprocess.run([sys.executable, os.path.join(REPO, script)] + args, check=True, stdout=log,
                       stderr=subprocess.STDOUT, cwd=REPO)
    return time.time() - t0


def after(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        return [record for record in map(json.loads, handle) if record.get("phase") == "after"][-1]


teacher = os.path.join(pipeline_dir, "sft")
data_dir = os.path.join(pipeline_dir, "data", "pretrain")  # the prepared world corpus and its tokenizer
for path in (teacher, data_dir):
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: not found; run python pipeline.py first (it writes the teacher)")
os.makedirs(work_dir, exist_ok=True)
base, seconds = student_base, {"base": 0.0}
if not base:
    base = os.path.join(work_dir, "student-base")
    seconds["base"] = run("train_pretrain.py", [f"--out_dir={base}", f"--data_dir={data_dir}", f"--device={device}",
                                                "--overwrite=True"] + CLASSIC + student_args.split(),
                           "student-base")
runs = [("plain SFT", 1.0)] + [(f"distilled, alpha={a}", float(a)) for a in str(alphas).strip("()").split(",")]
rows = []
for name, alpha in runs:
    out = os.path.join(work_dir, f"student-alpha{alpha}")
    extra = [] if alpha == 1.0 else [f"--teacher={teacher}", f"--distill_alpha={alpha}",
                                     f"--distill_temperature={distill_temperature}"]
    took = run("train_sft.py", [f"--init_from={base}", f"--out_dir={out}", f"--device={device}",
                                f"--data_dir={os.path.join(pipeline_dir, 'data', 'sft_demo')}", "--overwrite=True"]
               + extra + sft_args.split(), os.path.basename(out))
    rows.append((name, after(out), took))
rows.append((f"teacher ({teacher})", after(teacher), float("nan")))
keys = ["val_loss", "exact_match", "token_f1", "token_recall", "rouge_l_f1", "accuracy", "macro_f1"]
print(f"student: {student_base or student_args} (pretraining {seconds['base']:.0f} s); T = {distill_temperature}")
print("| run | " + " | ".join(keys) + " | seconds |\n|---" * 1 + "|---" * (len(keys) + 1) + "|")
for name, record, took in rows:
    print(f"| {name} | " + " | ".join(f"{record[k]:.4f}" if k in record else "–" for k in keys) + f" | {took:.0f} |")
