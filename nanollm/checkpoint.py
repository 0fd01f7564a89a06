"""Checkpoints that survive crashes, exact resume, and the metrics log.

A checkpoint holds everything a run's future depends on: weights, optimizer moments, loss-scaler state,
iteration, RNG states and the settings. It is written to a temporary file and renamed over the old one,
so a crash mid-write never destroys the last good checkpoint (rename is atomic on POSIX).
A run leaves its out_dir as it was until every check has passed and the loop is about to start (start_run).
"""
import glob
import json
import os
import random
import shutil

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanollm.configurator import MissingFileError, UserError
from nanollm.model import architecture_args
from nanollm.parallel import gather_state, load_state

TENSORBOARD_DIR = "tensorboard"  # event files of MetricsLog(tensorboard=True), under out_dir
RUN_FILES = ("ckpt.pt", "metrics.jsonl", "samples.txt", "tokenizer.model", "meta.pkl")  # what a run writes in out_dir
CHECKPOINT_KEYS = ("model", "model_args", "config")  # what every checkpoint of a nanollm stage holds


def unwrap(model):
    """The plain module under DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def atomic_save(obj, path):
    """torch.save to `path` via a temporary file in the same folder, then an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def rng_state():
    """This process's random states (python, torch CPU, CUDA)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore rng_state()'s output; its tensors may come back on a GPU (map_location), RNG states live on the CPU."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def gather_rng_states(runtime):
    """Every rank's RNG state (a list indexed by rank), collected on all ranks; dropout differs per rank."""
    state = rng_state()
    if not runtime.ddp:
        return [state]
    states = [None] * runtime.world_size
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(path, runtime, model, optimizer, scaler, iter_num, best_val_loss, config, model_args, **extra):
    """Every rank calls this (RNG states are gathered from all); rank 0 writes the file. model_args is saved
    without its runtime fields (attn_impl, dropout): those are chosen again by whoever loads the checkpoint."""
    rng_states = gather_rng_states(runtime)
    if runtime.sharded:  # every rank takes part in gathering the full tensors; rank 0 receives them
        model_state, optimizer_state = gather_state(unwrap(model), optimizer, runtime.parallelism == "tp")
    elif runtime.is_master:
        model_state = unwrap(model).state_dict()
        optimizer_state = optimizer.state_dict() if optimizer is not None else None
    if not runtime.is_master:
        return
    atomic_save({
        "model": model_state,
        "optimizer": optimizer_state,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "config": config,
        "model_args": architecture_args(model_args),
        "rng_states": rng_states,
        **extra,
    }, path)


def restore_training_state(checkpoint, model, optimizer, scaler, runtime):
    """Load weights, optimizer and scaler state and this rank's RNG state; return (iter_num, best_val_loss). A split
    model (runtime.sharded) keeps its own shard of each full tensor."""
    if runtime.sharded:
        load_state(unwrap(model), optimizer, checkpoint["model"], checkpoint["optimizer"], runtime.parallelism == "tp")
    else:
        unwrap(model).load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    rng_states = checkpoint["rng_states"]
    set_rng_state(rng_states[runtime.rank if len(rng_states) == runtime.world_size else 0])
    return checkpoint["iter_num"], checkpoint["best_val_loss"]


def load_checkpoint(path, map_location="cpu", keys=CHECKPOINT_KEYS):
    """Load a checkpoint with weights_only=True (no arbitrary code from untrusted files) and check that it holds
    `keys` (an int8 file holds other ones than a training checkpoint: its loader passes its own)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable nanollm checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in keys if k not in checkpoint] if isinstance(checkpoint, dict) else keys
    if missing:
        raise UserError(f"{path}: not a nanollm checkpoint (no {', '.join(repr(k) for k in missing)})")
    return checkpoint


def check_out_dir(out_dir, resume, overwrite=False):
    """Before any work: out_dir is a folder (or does not exist yet), a resumed run has a checkpoint, and a fresh run
    does not silently replace the run already there."""
    checkpoint = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir={out_dir!r} is a file, not a folder")
    if resume and not os.path.isfile(checkpoint):
        raise UserError(f"init_from='resume': there is no {checkpoint} to resume")
    if not resume and os.path.exists(checkpoint) and not overwrite:
        raise UserError(f"out_dir={out_dir!r} already holds a run ({checkpoint}): continue it with "
                        f"--init_from=resume, choose another out_dir, or replace it with --overwrite=True")


def start_run(out_dir, runtime, resume, iter_num, tokenizer_path=None, tensorboard=False, max_iters=0,
              log_interval=1):
    """The run's first write to out_dir, once every check has passed and the models are built: a fresh run
    replaces whatever run was there (ckpt.pt, metrics.jsonl, samples.txt, tensorboard/) and copies its tokenizer; a
    resumed one keeps its log up to the checkpoint. Removes temporary files of a save that was killed. Returns the
    run's RunLog (it writes on rank 0 only; tensorboard=True mirrors it as TensorBoard scalars)."""
    if tensorboard:
        tensorboard_writer_class()  # a missing package is a one-line error before anything is written
    if not runtime.is_master:
        return RunLog(None, max_iters=max_iters, initial=iter_num)
    os.makedirs(out_dir, exist_ok=True)
    for leftover in glob.glob(os.path.join(glob.escape(out_dir), "ckpt.pt.tmp.*")):
        os.remove(leftover)
    if not resume:  # the tokenizer: our tokenizer.model, or nanoGPT's meta.pkl (its characters)
        target = tokenizer_path and os.path.join(out_dir, os.path.basename(tokenizer_path))
        in_place = target and os.path.exists(target) and os.path.samefile(target, tokenizer_path)
        for name in RUN_FILES:
            path = os.path.join(out_dir, name)
            if os.path.exists(path) and not (in_place and path == target):
                os.remove(path)
        if target and not in_place:
            shutil.copyfile(tokenizer_path, target)
        shutil.rmtree(os.path.join(out_dir, TENSORBOARD_DIR), ignore_errors=True)  # the old run's event files
    return RunLog(os.path.join(out_dir, "metrics.jsonl"), start_iter=iter_num if resume else 0, tensorboard=tensorboard,
                  max_iters=max_iters, initial=iter_num, log_interval=log_interval)


def tensorboard_writer_class():
    """torch.utils.tensorboard.SummaryWriter, or a one-line UserError naming the setting if the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("tensorboard=True needs the tensorboard package: pip install tensorboard "
                        "(or pip install -e .[extras]), or leave tensorboard=False") from None
    return SummaryWriter


class MetricsLog:
    """Append one JSON object per line to {out_dir}/metrics.jsonl.

    On resume from iteration `start_iter`, lines from iterations >= start_iter (written after the checkpoint
    by a run that then crashed) are dropped first, so the log reads as one uninterrupted run.
    tensorboard=True also writes every number of every record as a TensorBoard scalar in {out_dir}/tensorboard/
    (step = the record's "iter", tag = its key, under "<phase>/" if the record has a "phase"); metrics.jsonl stays
    the source of truth. View with: tensorboard --logdir out_dir/tensorboard
    """

    def __init__(self, path, start_iter=0, tensorboard=False):
        self.path = path
        self.tensorboard_dir = os.path.join(os.path.dirname(os.path.abspath(path)), TENSORBOARD_DIR) \
            if tensorboard else None
        self.writer, self.start_iter = None, start_iter  # the writer is opened at the first record
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if start_iter == 0 or not os.path.exists(path):
            open(path, "w").close()
            return
        kept = [record for record in read_metrics(path) if record.get("iter", 0) < start_iter]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)

    def write(self, record):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard_dir is not None:
            self._write_scalars(record)

    def _write_scalars(self, record):
        if self.writer is None:
            # on resume, purge_step hides events a crashed run wrote at steps >= start_iter (metrics.jsonl drops them)
            self.writer = tensorboard_writer_class()(log_dir=self.tensorboard_dir, purge_step=self.start_iter or None)
        prefix = f"{record['phase']}/" if isinstance(record.get("phase"), str) else ""
        step = record.get("iter", 0)
        for key, value in record.items():
            if key != "iter" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(prefix + key, value, global_step=step)
        self.writer.flush()  # each record reaches the disk now, as metrics.jsonl does

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class RunLog(MetricsLog):
    """A training run's log: metrics.jsonl (and TensorBoard) plus the progress bar. On ranks other than 0 (path None)
    it writes nothing and shows nothing, so a script calls it on every rank."""

    def __init__(self, path, start_iter=0, tensorboard=False, max_iters=0, initial=0, log_interval=1):
        if path is not None:
            super().__init__(path, start_iter, tensorboard)
        self.path, self.log_interval = path, log_interval
        self.progress = tqdm(total=max_iters, initial=initial, disable=path is None, dynamic_ncols=True)

    def write(self, record):
        if self.path is not None:
            super().write(record)

    def say(self, text):
        """A line on the console, above the progress bar (rank 0)."""
        if self.path is not None:
            tqdm.write(text)

    def step(self, iter_num, record, shown=("loss", "lr")):
        """One training iteration done: the progress bar moves and shows `shown`; every log_interval iterations the
        record (with its iteration) goes to metrics.jsonl."""
        self.progress.update(1)
        self.progress.set_postfix({key: f"{record[key]:.4g}" for key in shown})
        if iter_num % self.log_interval == 0:
            self.write({"iter": iter_num, **record})

    def close(self):
        """The loop is over: the progress bar goes; the log stays open for the run's final records."""
        self.progress.close()


def read_metrics(path):
    """The records of a metrics.jsonl. A last line cut short (the process was killed mid-write) is dropped; any other
    line that is not JSON is an error naming the file and line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: a write that never finished
                break
            raise UserError(f"{path}:{number}: not a JSON line ({e.msg})") from None
    return records
