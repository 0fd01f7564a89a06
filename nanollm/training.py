"""Pieces of a training step that every stage shares: the guarded optimizer step and the graceful stop.

The loop itself stays in each train_*.py script; these are the parts that would otherwise be copied.
Both take decisions that must agree across DDP ranks, so each decision is all-reduced first.
"""
import math
import signal

import torch
from tqdm import tqdm

from nanollm.checkpoint import check_out_dir
from nanollm.distributed import any_rank, setup

MAX_BAD_STEPS = 3  # consecutive non-finite steps before a run gives up


class GuardedStep:
    """Unscale, clip, check, step: a non-finite loss or gradient norm skips the step (weights untouched)."""

    def __init__(self, optimizer, scaler, grad_clip, runtime, dtype=None):
        self.optimizer, self.scaler, self.grad_clip = optimizer, scaler, grad_clip
        self.runtime, self.fp16 = runtime, (dtype or runtime.dtype) == "float16"
        self.bad_steps = 0

    def minimize(self, model, loss, iter_num):
        """Backward of one loss (scaled for fp16), then the guarded step; returns the gradient norm."""
        self.scaler.scale(loss).backward()
        return self(model, loss.item(), iter_num)

    def __call__(self, model, loss_mean, iter_num):
        """Call after the backward passes of one iteration; returns the (pre-clip) global gradient norm."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # ‖g‖₂ over all parameters
        # one read-back of each number per step (a GPU sync); plain floats from here on, no tensors built.
        # loss_mean may be a float or a 0-dim tensor (a loop that sums micro-step losses on the device)
        grad_norm, loss_mean = float(grad_norm), float(loss_mean)
        # fp16 overflow is the GradScaler's business (it skips that step itself and lowers the scale)
        non_finite = not math.isfinite(loss_mean) or (not self.fp16 and not math.isfinite(grad_norm))
        if any_rank(non_finite, self.runtime):
            self.bad_steps += 1
            if self.runtime.is_master:
                tqdm.write(f"[nanollm] iter {iter_num}: non-finite loss ({loss_mean}) or gradient norm "
                           f"({grad_norm}); step skipped, weights untouched")
            if self.bad_steps >= MAX_BAD_STEPS:
                raise RuntimeError(f"{MAX_BAD_STEPS} non-finite steps in a row: lower learning_rate, "
                                   f"or use dtype='bfloat16'/'float32'")
        else:
            self.bad_steps = 0
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm


def setup_run(settings, check_settings):
    """A script's start, before any work: its settings checked (check_settings) and its out_dir (nothing in it changes
    before the loop starts; a fresh run does not replace a run unless overwrite), then the device, DDP and precision.
    Returns the Runtime."""
    check_settings(settings)
    check_out_dir(settings["out_dir"], settings["init_from"] == "resume", settings["overwrite"])
    return setup(settings["device"], settings["backend"], settings["dtype"], announce=True,
                 parallelism=settings.get("parallelism", "ddp"))


def evaluation_due(iter_num, eval_interval, max_iters, eval_only=False):
    """Evaluate (and checkpoint) every eval_interval iterations, at the end, and in an evaluation-only run."""
    return iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only


class CheckpointRule:
    """After an evaluation: checkpoint always, or only when the held-out loss improved. Rank 0 evaluates; every rank
    learns its decision (all ranks take part in saving). With keep (a model) and always=False, rank 0 also keeps a CPU
    copy of the best weights, for a run that must end with its best model rather than its last (restore_best)."""

    def __init__(self, always, best=float("inf"), keep=None):
        self.always, self.best, self.keep = always, best, keep
        self.best_weights, self.best_iter = None, None

    def __call__(self, val_loss, runtime, iter_num=None):
        """val_loss: rank 0's held-out loss (None on the other ranks). Returns True on every rank when it is time."""
        improved = val_loss is not None and val_loss < self.best
        self.best = min(self.best, val_loss) if val_loss is not None else self.best
        if improved and self.keep is not None and not self.always:
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.keep.state_dict().items()}
            self.best_iter = iter_num
        return any_rank(runtime.is_master and (improved or self.always), runtime)

    def restore_best(self):
        """Load the kept best weights into the model (rank 0); returns their iteration, or None if none were kept."""
        if self.best_weights is not None:
            self.keep.load_state_dict(self.best_weights)
        return self.best_iter


class GracefulStop:
    """Ctrl-C or SIGTERM asks the loop to checkpoint and exit at the next step boundary; a second Ctrl-C
    stops at once."""

    def __init__(self):
        self.flag, self.signum = False, signal.SIGINT  # a rank that heard nothing stops as if Ctrl-C'd
        self.stopped = False  # set once every rank has agreed to stop
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag, self.signum = True, signum

    def requested(self, runtime, iter_num=None):
        """True on every rank once any rank was asked to stop; with iter_num, rank 0 says where the run stops."""
        self.stopped = any_rank(self.flag, runtime)
        if self.stopped and iter_num is not None and runtime.is_master:
            tqdm.write(f"[nanollm] stop requested: checkpoint at iteration {iter_num}; resume with --init_from=resume")
        return self.stopped

    @property
    def exit_code(self):
        """0 for a finished run; 128 + the signal's number for a stopped one (see exit_if_stopped)."""
        return 128 + int(self.signum) if self.stopped else 0

    def exit_if_stopped(self):
        """A stopped run ends with exit code 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as a shell
        reports it, so that a caller can tell it from a finished run (exit code 0)."""
        if self.stopped:
            raise SystemExit(128 + int(self.signum))
