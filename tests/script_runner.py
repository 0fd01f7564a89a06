"""Run a repository script as a user does: a subprocess on the CPU with one thread, optionally under torchrun."""
import os
import runpy
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, args, nproc=0, check=True, timeout=300, cwd=REPO, unset=()):
    """`python <script> args` (or torchrun with nproc processes); with check, a non-zero exit fails the test and shows
    the end of the output. unset: environment variables the script must not see. Returns the CompletedProcess."""
    env = {k: v for k, v in dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1").items() if k not in unset}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    result = subprocess.run(launcher + [os.path.join(REPO, script)] + list(args), cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


WORDS = ["river", "stone", "lamp", "garden", "north", "quiet", "seven", "blue", "market", "window"]


def write_corpus(folder, n_lines=600):
    """A small English text file for tiny pretraining runs (ten words in rotation, one numbered sentence a line);
    returns its path."""
    lines = [f"The {WORDS[i % 10]} near the {WORDS[(i * 3) % 10]} is {WORDS[(i * 7 + 1) % 10]} number {i}."
             for i in range(n_lines)]
    path = folder / "text.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def interrupt_after(script, args, out_dir, key='"loss"', records=2, timeout=300):
    """`python <script> args`, then Ctrl-C (SIGINT) as soon as out_dir/metrics.jsonl holds `records` lines with `key`
    (a training step's record); returns (exit code, stdout + stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, os.path.join(REPO, script)] + list(args), cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = os.path.join(out_dir, "metrics.jsonl"), time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if os.path.exists(metrics):
            with open(metrics, encoding="utf-8") as f:
                if sum(key in line for line in f) >= records:
                    break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=timeout)[0]
    return process.returncode, output


def run_in_process(script, args, monkeypatch):
    """Run a script in this process, for a failure before its loop (no interpreter start-up): argv set through
    pytest's monkeypatch, so it is restored after the test."""
    path = os.path.join(REPO, script)
    monkeypatch.setattr(sys, "argv", [path] + list(args))
    runpy.run_path(path, run_name="__main__")
