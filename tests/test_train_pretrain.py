"""End-to-end checks of train_pretrain.py, run as a user runs it (subprocesses, CPU, tiny model)."""
import copy
import json
import os
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanollm.configurator import UserError
from nanollm.distributed import Runtime
from nanollm.model import GPT, GPTConfig
from nanollm.optim import configure_optimizer
from nanollm.training import MAX_BAD_STEPS, GuardedStep
from script_runner import run_script, write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "train_pretrain.py")
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--vocab_size=400",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=8", "--learning_rate=3e-3",
        "--dtype=float32", "--device=cpu", "--sample_tokens=5", "--dropout=0.1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus, prepared once (tokenizer + .bin) and shared by the tests of this file."""
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder)
    data_dir = str(folder / "prepared")
    run([f"--dataset={folder / 'text.txt'}", f"--data_dir={data_dir}", f"--out_dir={folder / 'out0'}",
         "--max_iters=0", "--eval_only=True"])
    return data_dir


def run(args, nproc=0, timeout=300):
    result = run_script("train_pretrain.py", TINY + args, nproc, timeout=timeout)
    return result.stdout + result.stderr


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_training_logs_metrics_and_lowers_the_loss(corpus, tmp_path):
    out = run([f"--dataset={corpus}", f"--out_dir={tmp_path}", "--max_iters=8", "--eval_interval=4"])
    assert "sample:" in out and "unigram baseline" in out
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    assert [r["iter"] for r in steps] == list(range(8))
    assert {"iter", "loss", "lr", "grad_norm", "dt_ms", "tokens_per_sec"} <= set(steps[0])
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 4, 8]
    assert evals[-1]["val_ppl"] == pytest.approx(2.718281828 ** evals[-1]["val_loss"], rel=1e-6)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert os.path.exists(tmp_path / "ckpt.pt") and os.path.exists(tmp_path / "tokenizer.model")


@pytest.mark.slow
def test_resume_under_ddp_continues_exactly_with_each_ranks_random_state(corpus, tmp_path):
    """Two ranks, dropout on (each rank draws its own masks): a run checkpointed at 4 and resumed equals a straight
    one only if every rank gets its own random state back. (One process resuming: the Ctrl-C test below.)"""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [f"--dataset={corpus}", "--eval_interval=100", "--gradient_accumulation_steps=2"]
    run(common + [f"--out_dir={straight}", "--max_iters=8"], nproc=2)
    run(common + [f"--out_dir={split}", "--max_iters=4"], nproc=2)
    states = torch.load(split / "ckpt.pt", weights_only=True)["rng_states"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])  # one per rank, different
    run(common + [f"--out_dir={split}", "--max_iters=8", "--init_from=resume"], nproc=2)
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(8))
    for it in range(8):  # dropout is on: RNG states must be restored too
        assert abs(a[it] - b[it]) < 1e-6, (it, a[it], b[it])


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_accumulation(corpus, tmp_path):
    common = [f"--dataset={corpus}", "--eval_interval=100", "--max_iters=4", "--dropout=0.0"]
    run(common + [f"--out_dir={tmp_path / 'single'}", "--gradient_accumulation_steps=2"])
    run(common + [f"--out_dir={tmp_path / 'ddp'}", "--gradient_accumulation_steps=2"], nproc=2)
    # the default gradient_accumulation_steps=1 under two processes: one micro-step each, the same global batch
    run(common + [f"--out_dir={tmp_path / 'ddp_default'}"], nproc=2)
    a, b, c = losses(tmp_path / "single"), losses(tmp_path / "ddp"), losses(tmp_path / "ddp_default")
    assert sorted(a) == sorted(b) == sorted(c) == list(range(4))
    for it in range(4):
        assert abs(a[it] - b[it]) < 1e-5 and abs(a[it] - c[it]) < 1e-5, (it, a[it], b[it], c[it])


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_the_run_resumes_exactly(corpus, tmp_path):
    common = TINY + [f"--dataset={corpus}", "--eval_interval=1000", "--max_iters=400", "--lr_decay_iters=400"]
    straight = tmp_path / "straight"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, SCRIPT] + common + [f"--out_dir={straight}", "--max_iters=12"],
                            cwd=REPO, env=env)
    assert proc.wait(timeout=300) == 0
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, SCRIPT] + common + [f"--out_dir={interrupted}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(_lines(interrupted / "metrics.jsonl")) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-3000:]  # 128 + SIGINT: a caller can tell a stopped run from a finished one
    assert "stop requested" in output
    stopped_at = len(losses(interrupted))
    assert 3 <= stopped_at < 400
    resume = [sys.executable, SCRIPT] + common + [f"--out_dir={interrupted}", "--init_from=resume"]
    resume[resume.index("--max_iters=400")] = f"--max_iters={max(12, stopped_at + 2)}"
    assert subprocess.run(resume, cwd=REPO, env=env, capture_output=True).returncode == 0
    a, b = losses(straight), losses(interrupted)
    for it in range(12):
        assert abs(a[it] - b[it]) < 1e-6, (it, a[it], b[it])


def _lines(path):
    try:
        with open(path) as f:
            return [line for line in f if '"loss"' in line]
    except FileNotFoundError:
        return []


@pytest.mark.slow
def test_non_finite_loss_skips_the_step_and_stops_with_a_clear_message(corpus, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, SCRIPT] + TINY + [
        f"--dataset={corpus}", f"--out_dir={tmp_path}", "--max_iters=10", "--learning_rate=1e30",
        "--warmup_iters=0", "--grad_clip=0", "--eval_interval=100"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode != 0
    assert "step skipped, weights untouched" in result.stdout
    assert "3 non-finite steps in a row" in result.stderr


def test_a_non_finite_step_leaves_the_weights_and_the_optimizer_state_untouched():
    """The guard train_pretrain.py's loop calls after its backward passes (nanollm/training.py), in float32: a NaN
    loss, or a finite loss with an infinite gradient, skips the step: weights, AdamW moments and step count stay
    as they were, and the gradients are cleared; MAX_BAD_STEPS such steps in a row stop the run."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    optimizer = configure_optimizer(model, 0.1, 1e-2, (0.9, 0.95), "cpu", verbose=False)
    runtime = Runtime("cpu", "cpu", dtype="float32")
    step = GuardedStep(optimizer, runtime.grad_scaler(), grad_clip=1.0, runtime=runtime)
    x = torch.randint(0, 50, (2, 8))
    step.minimize(model, model(x, x)[1], 0)  # a clean step first: AdamW has moments to keep
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict()["state"])

    def untouched(gradients_cleared=True):
        now = optimizer.state_dict()["state"]
        return (all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
                and all(torch.equal(state[i][key], now[i][key]) for i in state for key in state[i])
                and (not gradients_cleared or all(p.grad is None for p in model.parameters())))

    step.minimize(model, model(x, x)[1] * float("nan"), 1)  # a NaN loss (and NaN gradients)
    assert untouched() and step.bad_steps == 1
    loss = model(x, x)[1]
    loss.backward()
    model.lm_head.weight.grad[0, 0] = float("inf")  # a finite loss, an infinite gradient
    step(model, loss.item(), 2)
    assert untouched() and step.bad_steps == 2
    with pytest.raises(RuntimeError, match=f"{MAX_BAD_STEPS} non-finite steps in a row"):
        step.minimize(model, model(x, x)[1] * float("inf"), 3)
    assert untouched(gradients_cleared=False)  # the run stops here; its gradients do not matter


@pytest.mark.slow
def test_unknown_setting_is_rejected_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--max_iter=5", f"--out_dir={tmp_path}"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "unknown setting 'max_iter'" in result.stderr and "max_iters" in result.stderr
    assert not os.listdir(tmp_path)


def readme_command(prefix):
    """The README's command line that starts with `prefix`, without its comment."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        lines = [line.split("#")[0].strip() for line in f if line.startswith(prefix)]
    assert lines, f"README.md has no line starting with {prefix!r}"
    return lines[0].split()


@pytest.mark.slow
def test_the_readme_ddp_command_runs_at_the_defaults(tmp_path):
    command = readme_command("torchrun --standalone --nproc_per_node=2 train_pretrain.py")
    command[command.index("train_pretrain.py")] = SCRIPT  # run from a scratch folder: data/ and out/ land there
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command + ["--max_iters=2", "--eval_iters=1"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world_size=2" in result.stdout and "optimizer step sees 2 micro-batches" in result.stdout
    assert [r["iter"] for r in read_records(tmp_path / "out" / "metrics.jsonl") if "val_loss" in r] == [0, 2]
    assert os.path.exists(tmp_path / "out" / "ckpt.pt")


def snapshot(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.mark.slow
def test_a_failed_run_leaves_the_out_dir_as_it_was(corpus, tmp_path):
    out = tmp_path / "out"
    run([f"--dataset={corpus}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2"])
    before = snapshot(out)
    assert {"ckpt.pt", "metrics.jsonl", "tokenizer.model"} <= set(before)
    other = tmp_path / "other.txt"
    other.write_text("".join(f"a different corpus, line {i}: {'xyzzy' * (i % 7)}\n" for i in range(300)))
    attempts = [
        [f"--dataset={corpus}"],  # a fresh run over an existing run: refused
        [f"--dataset={other}", "--overwrite=True", "--n_head=3"],  # a bad setting: refused before any work
        [f"--dataset={tmp_path / 'missing.txt'}", "--overwrite=True"],  # fails while preparing its data
        [f"--dataset={other}", f"--data_dir={tmp_path / 'other'}", "--init_from=resume"],  # another tokenizer
    ]
    messages = ["already holds a run", "n_embd=32 must be a multiple of n_head=3", "dataset path not found",
                "is not the one the run in"]
    for extra, message in zip(attempts, messages):  # each in this process: every one fails before the loop
        argv = [SCRIPT] + TINY + [f"--out_dir={out}", "--max_iters=4"] + extra
        with pytest.MonkeyPatch.context() as patch, pytest.raises(UserError, match=message):
            patch.setattr(sys, "argv", argv)
            runpy.run_path(SCRIPT, run_name="__main__")
        assert snapshot(out) == before, extra
    run([f"--dataset={corpus}", f"--out_dir={out}", "--max_iters=1", "--eval_interval=1", "--overwrite=True"])
    assert [r["iter"] for r in read_records(out / "metrics.jsonl") if "val_loss" in r] == [0, 1]  # the new run only


def read_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("setting, message", [
    ("--batch_size=0", "batch_size=0: must be > 0"), ("--batch_size=-1", "batch_size=-1: must be > 0"),
    ("--eval_interval=0", "eval_interval=0: must be > 0"),
    ("--gradient_accumulation_steps=0", "gradient_accumulation_steps=0: must be > 0"),
    ("--block_size=0", "block_size=0: must be > 0"), ("--dropout=1.0", "dropout=1.0: must be in [0, 1)"),
    ("--n_head=3", "n_embd=128 must be a multiple of n_head=3"),
])
def test_a_bad_setting_is_refused_naming_it_before_any_work(tmp_path, monkeypatch, setting, message):
    monkeypatch.chdir(tmp_path)  # the script's own checks, run in this process (they come before any work)
    monkeypatch.setattr(sys, "argv", [SCRIPT, setting])
    with pytest.raises(UserError) as error:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert str(error.value) == message
    assert os.listdir(tmp_path) == []  # no data prepared, no out_dir made


@pytest.mark.slow
def test_a_user_error_is_one_line_and_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--batch_size=0"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr == "error: batch_size=0: must be > 0\n"


def test_an_out_dir_that_is_a_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "out").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--out_dir=out"])
    with pytest.raises(UserError, match="out_dir='out' is a file, not a folder"):
        runpy.run_path(SCRIPT, run_name="__main__")
