"""Run a repository script as a user does: a subprocess on the CPU with one thread, optionally under torchrun."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, args, nproc=0, check=True, timeout=300, cwd=REPO):
    """`python <script> args` (or torchrun with nproc processes); with check, a non-zero exit fails the test and shows
    the end of the output. Returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    result = subprocess.run(launcher + [os.path.join(REPO, script)] + list(args), cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
