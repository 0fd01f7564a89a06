"""The whole pipeline in one command, on the built-in world: pretrain -> SFT -> feedback collection + reward model
-> PPO with the KL penalty -> PPO with β = 0 (reward hacking), then a summary report with the tables and the plot.

    python pipeline.py                 # about 19 minutes on 2 CPU cores -> out-pipeline/report.md (+ ppo_curves.png)
    python pipeline.py --pipeline_dir=run2 --ppo_args="--max_iters=100 --target_kl=0.5"
    python pipeline.py                 # again: finished stages are skipped, an interrupted one resumes
    python pipeline.py --methods=all   # then: PPO over β, DPO over β, IPO, GRPO, RLOO, best-of-N from the same SFT
                                       # model, one comparison table and gold_vs_kl.png (nanollm/comparison.py)
Each stage is the stage's own script run as a subprocess (read those for the loops); its output goes to the
console and to pipeline_dir/<stage>.log. Rebuild the report from existing runs:
    python -m nanollm.report --pipeline_dir=out-pipeline
Settings below are plain variables; override them with a config file and/or --key=value.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from nanollm.checkpoint import load_checkpoint
from nanollm.comparison import BEST_OF_N, REPO, check_arguments, command_line, method_stages, output_file, parse_methods
from nanollm.configurator import UserError, configure
from nanollm.report import ALL_STAGE_DIRS, MARKER, build_report, read_marker, read_run

# ------------------------------------------------------------------------------------------ settings
pipeline_dir = "out-pipeline"  # every stage's out_dir (pretrain/, sft/, rm/, ppo/, ppo-beta0/), data/, logs, report
methods = "ppo,ppo_beta0"  # the runs after the reward model, from nanollm/comparison.py's METHODS; 'all': every one
pretrain_args = "--n_embd=192 --batch_size=32"  # extra settings for train_pretrain.py: a 2.56 M-parameter base on
# 2x the default tokens, which knows more of the world's facts than the 2-minute default (SFT exact match 0.55 vs 0.43)
sft_args = ""  # ... for train_sft.py
rm_args = "--likelihood_weight=1.0"  # ... for train_rm.py (feedback collection and the reward model): the reward
# model reads its own likelihood of the reply too (docs/rlhf.md: 78.4% -> 85.8% vs gold on GPT-2's block's pipeline)
ppo_args = ""  # ... for every train_ppo.py run
ppo_beta0_args = "--max_iters=40"  # ... for the β = 0 run only (after ppo_args and --init_kl_coef=0): longer, so
# the reward hacking has time to show
dpo_args = ""  # ... for every train_dpo.py run (DPO over β, IPO)
grpo_args = ""  # ... for every train_grpo.py run (GRPO, RLOO, GRPO on the arithmetic reward)
best_of_n_args = ""  # ... for python -m nanollm.best_of_n
skip_done = True  # a stage already finished with the same command is skipped, an interrupted one resumed
device = "auto"  # passed to every stage: 'auto' | 'cpu' | 'cuda' | 'mps'
# ----------------------------------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
FINAL_PHASE = {"train_pretrain.py": None, "train_sft.py": "after", "train_rm.py": "final", "train_ppo.py": "eval",
               "train_dpo.py": "eval", "train_grpo.py": "eval"}


def stage_dir(stage):
    return os.path.join(pipeline_dir, ALL_STAGE_DIRS[stage])


def split_args(name, text):
    try:
        return shlex.split(text)
    except ValueError as e:
        raise SystemExit(f"[pipeline] {name}={text!r}: {e}") from None


data_root = os.path.join(pipeline_dir, "data")
# (stage, script, its arguments): the pipeline's wiring first, then the user's extras (a later --key wins)
STAGES = [
    ("pretrain", "train_pretrain.py", [f"--out_dir={stage_dir('pretrain')}", f"--data_dir={data_root}/pretrain",
                                       f"--device={device}"] + split_args("pretrain_args", pretrain_args)),
    ("sft", "train_sft.py", [f"--out_dir={stage_dir('sft')}", f"--init_from={stage_dir('pretrain')}",
                             f"--data_dir={data_root}/sft_demo", f"--device={device}"]
     + split_args("sft_args", sft_args)),
    ("rm", "train_rm.py", [f"--out_dir={stage_dir('rm')}", f"--init_from={stage_dir('sft')}",
                           f"--data_dir={data_root}/rm_demo", f"--device={device}"] + split_args("rm_args", rm_args)),
]
extras = {"train_ppo.py": ("ppo_args", ppo_args), "train_dpo.py": ("dpo_args", dpo_args),
          "train_grpo.py": ("grpo_args", grpo_args), BEST_OF_N: ("best_of_n_args", best_of_n_args)}
try:  # the methods after the reward model, each from the SFT model with the same data and seeds
    STAGES += method_stages(parse_methods(methods), pipeline_dir, device,
                            {script: split_args(name, text) for script, (name, text) in extras.items()},
                            {"ppo_beta0": split_args("ppo_beta0_args", ppo_beta0_args)})
    for stage, script, args in STAGES:  # every stage's arguments are checked before anything is touched
        check_arguments(stage, script, args)
except UserError as e:
    raise SystemExit(f"[pipeline] {e}") from None


def write_marker(out_dir, record):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, MARKER), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


def stage_state(out_dir, command):
    """'done' (finished with this command), 'partial' (started with this command, has a checkpoint of its own) or
    'new'. A checkpoint older than the marker's start is an earlier run's, left by a stage that failed its checks."""
    marker, checkpoint = read_marker(out_dir), os.path.join(out_dir, output_file(command[0]))
    if marker is None or marker.get("command") != command or not os.path.isfile(checkpoint) or \
            os.path.getmtime(checkpoint) < marker.get("started", 0):
        return "new"
    return "done" if marker.get("finished") else "partial"


def unfinished_reason(out_dir, script):
    """None when the run in out_dir reached its max_iters and wrote its final metrics line, else why not."""
    if not os.path.isfile(os.path.join(out_dir, output_file(script))):
        return f"it wrote no {output_file(script)}"
    if script == BEST_OF_N:  # written at the end, in one piece
        return None
    checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    max_iters, iter_num = checkpoint["config"]["max_iters"], checkpoint["iter_num"]
    if iter_num < max_iters:
        return f"its checkpoint is at iteration {iter_num} of {max_iters}"
    records = read_run(out_dir) or [{}]
    last, phase = records[-1], FINAL_PHASE[script]
    complete = last.get("phase") == phase if phase else "val_loss" in last  # pretraining ends on an evaluation
    if last.get("iter") != max_iters or not complete:
        return f"its metrics.jsonl has no final line (iteration {max_iters}{', phase ' + repr(phase) if phase else ''})"
    return None


def run_stage(stage, script, args, resume):
    """Run one stage as a subprocess, its output streamed to the console and to pipeline_dir/<stage>.log.
    Ctrl-C is passed on to the stage (which checkpoints and exits); returns (exit code, wall s, interrupted)."""
    log_path = os.path.join(pipeline_dir, f"{ALL_STAGE_DIRS[stage]}.log")
    # a new stage replaces what an older run left in its out_dir, once the stage's own checks have passed
    flags = [] if script == BEST_OF_N else ["--init_from=resume"] if resume else ["--overwrite=True"]
    command = [sys.executable] + command_line(script, args) + flags
    interrupted = []

    def forward(signum, frame):  # the stage runs in its own session: it hears a signal once, from us
        interrupted.append(signum)
        process.send_signal(signum)

    t0 = time.time()
    with open(log_path, "ab" if resume else "wb") as log:
        header = f"$ {shlex.join(command)}\n"
        log.write(header.encode())
        sys.stdout.write(header)
        sys.stdout.flush()
        path = os.pathsep.join([REPO] + os.environ.get("PYTHONPATH", "").split(os.pathsep))  # python -m nanollm...
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path.rstrip(os.pathsep)))
        handlers = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while chunk := os.read(process.stdout.fileno(), 65536):  # raw chunks: progress bars stream too
                log.write(chunk)
                log.flush()
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            process.wait()
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    return process.returncode, time.time() - t0, bool(interrupted)


def reads_from(args, folders):
    """Whether a stage's arguments name one of these folders (its input: a model or data another stage wrote)."""
    return any(arg.split("=", 1)[-1] in folders for arg in args)


# ---- the stages, in order; a stage that runs makes every stage that reads its folder start afresh (its input changed)
os.makedirs(pipeline_dir, exist_ok=True)
notes, wall_times, ran = {}, {}, set()
t_start = time.time()
for stage, script, args in STAGES:
    out_dir, log_path = stage_dir(stage), os.path.join(pipeline_dir, f"{ALL_STAGE_DIRS[stage]}.log")
    command = [script] + args
    state = stage_state(out_dir, command) if skip_done and not reads_from(args, ran) else "new"
    if state == "partial" and script == BEST_OF_N:  # one pass, nothing to resume
        state = "new"
    if state == "done":
        marker = read_marker(out_dir)
        notes[stage] = "skipped: already done (time of the run that made it)"
        took = f"{marker['wall_s']:.1f} s" if marker.get("wall_s") is not None else "time unknown"
        print(f"[pipeline] {stage}: already done in {out_dir} ({took} when it ran), skipped")
        continue
    if state == "new" and stage == "rm":  # the collected feedback came from the old SFT model
        shutil.rmtree(os.path.join(data_root, "rm_demo"), ignore_errors=True)
    print(f"[pipeline] {stage}: {'resuming' if state == 'partial' else 'running'} {script} -> {out_dir} "
          f"(log: {log_path})")
    earlier = read_marker(out_dir) if state == "partial" else None  # the interrupted part's time, if known
    earlier_s = earlier.get("wall_s") if earlier else 0.0
    record = {"command": command, "finished": False, "wall_s": None, "resumed": state == "partial",
              "started": earlier["started"] if earlier and "started" in earlier else time.time()}
    write_marker(out_dir, record)  # wall_s None: this part's time is unknown until it ends (a hard kill loses it)
    returncode, wall_s, interrupted = run_stage(stage, script, args, resume=state == "partial")
    ran.add(out_dir)
    record["wall_s"] = wall_s + earlier_s if earlier_s is not None else None  # None: a part was never timed
    write_marker(out_dir, record)  # a stage that stopped keeps its time for the resumed run to add to
    if interrupted:
        raise SystemExit(f"[pipeline] interrupted during stage '{stage}' after {wall_s:.1f} s; run the same command "
                         f"again to resume it (log: {log_path})")
    if returncode != 0:
        raise SystemExit(f"[pipeline] stage '{stage}' ({script}) failed with exit code {returncode} after "
                         f"{wall_s:.1f} s; see {log_path}")
    reason = unfinished_reason(out_dir, script)
    if reason:
        raise SystemExit(f"[pipeline] stage '{stage}' ({script}) exited without finishing: {reason}; see {log_path}")
    write_marker(out_dir, dict(record, finished=True))
    wall_times[stage] = wall_s
    print(f"[pipeline] {stage}: done in {wall_s:.1f} s" + (f" (this part; {record['wall_s']:.1f} s in all)"
                                                           if state == "partial" and record["wall_s"] else ""))

# ---- the report
markdown = build_report({stage: stage_dir(stage) for stage in ALL_STAGE_DIRS}, pipeline_dir, notes)
print(markdown)
print("[pipeline] stages run now: " + (", ".join(f"{s} {t:.1f} s" for s, t in wall_times.items()) or "none")
      + f"; this invocation took {time.time() - t_start:.1f} s")
print(f"[pipeline] report: {os.path.join(pipeline_dir, 'report.md')}")
