import os

import pytest
import torch

from nanollm.checkpoint import MetricsLog, atomic_save, load_checkpoint, read_metrics


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated mid-write)")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["step"] == 1  # the last good checkpoint survives
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_load_rejects_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_checkpoint(str(corrupt))


def test_metrics_log_drops_lines_after_the_resumed_iteration(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    for it in range(6):
        log.write({"iter": it, "loss": float(it)})
    log = MetricsLog(path, start_iter=4)  # crashed after iter 5, checkpoint at 4
    log.write({"iter": 4, "loss": 40.0})
    assert [(r["iter"], r["loss"]) for r in read_metrics(path)] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
