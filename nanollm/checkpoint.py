"""Checkpoints that survive crashes, exact resume, and the metrics log.

A checkpoint holds everything a run's future depends on: weights, optimizer moments, loss-scaler state,
iteration, RNG states and the settings. It is written to a temporary file and renamed over the old one,
so a crash mid-write never destroys the last good checkpoint (rename is atomic on POSIX).
"""
import json
import os
import random

import torch
import torch.distributed as dist


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
    """Every rank calls this (RNG states are gathered from all); rank 0 writes the file."""
    rng_states = gather_rng_states(runtime)
    if not runtime.is_master:
        return
    atomic_save({
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "config": config,
        "model_args": model_args,
        "rng_states": rng_states,
        **extra,
    }, path)


def restore_training_state(checkpoint, model, optimizer, scaler, runtime):
    """Load weights, optimizer and scaler state and this rank's RNG state; return (iter_num, best_val_loss)."""
    unwrap(model).load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    rng_states = checkpoint["rng_states"]
    set_rng_state(rng_states[runtime.rank if len(rng_states) == runtime.world_size else 0])
    return checkpoint["iter_num"], checkpoint["best_val_loss"]


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with weights_only=True (no arbitrary code from untrusted files)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable nanollm checkpoint ({type(e).__name__}: {e})") from e


class MetricsLog:
    """Append one JSON object per line to {out_dir}/metrics.jsonl.

    On resume from iteration `start_iter`, lines from iterations >= start_iter (written after the checkpoint
    by a run that then crashed) are dropped first, so the log reads as one uninterrupted run.
    """

    def __init__(self, path, start_iter=0):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if start_iter == 0 or not os.path.exists(path):
            open(path, "w").close()
            return
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("iter", 0) < start_iter]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def write(self, record):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
