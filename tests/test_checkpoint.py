import os

import pytest
import torch

from nanollm.checkpoint import MetricsLog, atomic_save, check_out_dir, load_checkpoint, read_metrics, start_run
from nanollm.configurator import UserError
from nanollm.distributed import Runtime


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated mid-write)")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path, keys=("step",))["step"] == 1  # the last good checkpoint survives
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


def test_a_file_without_our_keys_is_named_with_what_it_lacks(tmp_path):
    foreign = str(tmp_path / "ckpt.pt")
    torch.save({"state_dict": {}}, foreign)  # e.g. another framework's checkpoint
    with pytest.raises(UserError, match=r"ckpt.pt: not a nanollm checkpoint \(no 'model', 'model_args', 'config'\)"):
        load_checkpoint(foreign)
    torch.save([1, 2], foreign)
    with pytest.raises(UserError, match="not a nanollm checkpoint"):
        load_checkpoint(foreign)


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_and_other_bad_lines_are_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iter": 0, "loss": 1.0}\n{"iter": 1, "loss": 0.5}\n{"iter": 2, "lo')  # killed mid-write
    assert read_metrics(str(path)) == [{"iter": 0, "loss": 1.0}, {"iter": 1, "loss": 0.5}]
    log = MetricsLog(str(path), start_iter=2)  # resume at the checkpoint of iteration 2
    log.write({"iter": 2, "loss": 0.25})
    assert [r["iter"] for r in read_metrics(str(path))] == [0, 1, 2]
    path.write_text('{"iter": 0}\nnot json\n{"iter": 2}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON line"):
        MetricsLog(str(path), start_iter=2)


def test_out_dir_checks_refuse_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="out_dir=.*a_file' is a file"):
        check_out_dir(str(tmp_path / "a_file"), resume=False)
    with pytest.raises(UserError, match="no .*ckpt.pt to resume"):
        check_out_dir(str(tmp_path / "empty"), resume=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"old")
    with pytest.raises(UserError, match="already holds a run.*--init_from=resume.*--overwrite=True"):
        check_out_dir(str(run), resume=False)
    check_out_dir(str(run), resume=False, overwrite=True)
    check_out_dir(str(run), resume=True)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "run"]  # the checks wrote nothing


def test_start_run_replaces_the_old_run_as_a_whole_and_removes_killed_saves(tmp_path):
    run, tokenizer = tmp_path / "run", tmp_path / "data" / "tokenizer.model"
    run.mkdir()
    tokenizer.parent.mkdir()
    tokenizer.write_bytes(b"new tokenizer")
    for name, data in [("ckpt.pt", b"old"), ("metrics.jsonl", b'{"iter": 0}\n'), ("samples.txt", b"old"),
                       ("tokenizer.model", b"old tokenizer"), ("ckpt.pt.tmp.4242", b"half"), ("notes.txt", b"mine")]:
        (run / name).write_bytes(data)
    log = start_run(str(run), Runtime("cpu", "cpu"), resume=False, iter_num=0, tokenizer_path=str(tokenizer))
    assert sorted(os.listdir(run)) == ["metrics.jsonl", "notes.txt", "tokenizer.model"]
    assert (run / "tokenizer.model").read_bytes() == b"new tokenizer" and (run / "metrics.jsonl").read_bytes() == b""
    assert log.path == str(run / "metrics.jsonl")
    other_rank = start_run(str(run), Runtime("cpu", "cpu", rank=1, world_size=2), False, 0)  # rank 0 writes
    other_rank.write({"iter": 1, "loss": 2.0})
    assert other_rank.path is None and (run / "metrics.jsonl").read_bytes() == b""
