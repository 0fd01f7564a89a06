"""TensorBoard mirrors metrics.jsonl (read back with TensorBoard's own reader), and pretraining logs bits per byte."""
import math
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from nanollm.checkpoint import MetricsLog, read_metrics
from nanollm.configurator import UserError
from conftest import require
from script_runner import run_script, write_corpus

require("tensorboard")  # in the test extra; CI fails rather than skips without it
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--vocab_size=400",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--dtype=float32", "--device=cpu",
        "--sample_tokens=5", "--max_iters=4", "--eval_interval=2"]


def scalars(folder):
    """{tag: [(step, value), ...]} of every event file under folder, as TensorBoard reads them."""
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0 = keep every point
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny pretraining run on ASCII text with --tensorboard=True."""
    folder = tmp_path_factory.mktemp("tb")
    write_corpus(folder)
    out_dir = folder / "out"
    args = [f"--dataset={folder / 'text.txt'}", f"--data_dir={folder / 'prepared'}", f"--out_dir={out_dir}"]
    result = run_script("train_pretrain.py", TINY + args + ["--tensorboard=True"])
    return {"out_dir": out_dir, "args": args, "stdout": result.stdout, "data_dir": str(folder / "prepared")}


def test_tensorboard_scalars_equal_metrics_jsonl(run):
    records = read_metrics(run["out_dir"] / "metrics.jsonl")
    expected = {}
    for record in records:
        for key, value in record.items():
            if key != "iter":
                expected.setdefault(key, []).append((record["iter"], value))
    found = scalars(run["out_dir"] / "tensorboard")
    assert set(found) == set(expected)
    assert {"loss", "lr", "val_loss", "val_bpb", "train_bpb"} <= set(found)
    for tag, points in expected.items():
        assert [step for step, _ in found[tag]] == [step for step, _ in points], tag
        for (_, value), (_, logged) in zip(found[tag], points):
            assert value == pytest.approx(logged, rel=1e-6), tag  # event files store float32


def test_fresh_run_replaces_old_event_files(run, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(run["out_dir"], out_dir)  # a copy of the 4-iteration run, replaced by a 2-iteration one
    old = set(os.listdir(out_dir / "tensorboard"))
    assert old
    run_script("train_pretrain.py", TINY + run["args"][:2] + [f"--out_dir={out_dir}", "--tensorboard=True",
                                                            "--overwrite=True", "--max_iters=2"])
    new = set(os.listdir(out_dir / "tensorboard"))
    assert new and not (old & new)
    assert max(step for step, _ in scalars(out_dir / "tensorboard")["loss"]) == 1  # only the 2-iteration run


def test_pretrain_val_bpb_equals_nll_over_text_bytes_of_the_eval_batches(run):
    """The logged val_bpb, recomputed independently from the final checkpoint: per-token NLL of the same eval
    batches, over the bytes of the decoded target text (ASCII corpus: each row decodes cleanly)."""
    from nanollm.data import get_batch, load_tokenizer
    from nanollm.loader import load_model

    last = [r for r in read_metrics(run["out_dir"] / "metrics.jsonl") if "val_bpb" in r][-1]
    assert last["iter"] == 4
    assert f"val_bpb {last['val_bpb']:.4f}" in run["stdout"]
    model = load_model(str(run["out_dir"])).model.eval()
    tokenizer = load_tokenizer(run["data_dir"])
    nll_bits, n_bytes = 0.0, 0
    for k in range(2):  # eval_iters=2 batches, seeded as estimate_loss seeds them (seed + 1, step k)
        x, y = get_batch(run["data_dir"], "val", 4, 32, 1337 + 1, step=k, micro_step=0)
        with torch.no_grad():
            logits, _ = model(x)
        for row in range(y.size(0)):
            for t in range(y.size(1)):
                token = int(y[row, t])
                if token >= 8:  # the 8 reserved ids are not text
                    nll_bits += F.cross_entropy(logits[row, t][None], y[row, t][None]).item() / math.log(2)
            n_bytes += len(tokenizer.decode(y[row].tolist(), skip_special=True).encode("utf-8"))
    assert last["val_bpb"] == pytest.approx(nll_bits / n_bytes, rel=1e-4)


def test_phase_records_get_a_tag_prefix_and_resume_purges_later_steps(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"), tensorboard=True)
    for step in range(4):
        log.write({"iter": step, "phase": "ppo", "reward": float(step), "ok": True})
    log.close()
    log = MetricsLog(str(tmp_path / "metrics.jsonl"), start_iter=2, tensorboard=True)  # resume at iteration 2
    log.write({"iter": 2, "phase": "ppo", "reward": 20.0})
    log.close()
    assert scalars(tmp_path / "tensorboard") == {"ppo/reward": [(0, 0.0), (1, 1.0), (2, 20.0)]}  # bools are not scalars


def test_missing_tensorboard_package_is_a_one_line_error(monkeypatch, tmp_path):
    from nanollm.checkpoint import start_run

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(UserError, match="tensorboard=True needs the tensorboard package"):
        start_run(str(tmp_path / "out"), None, False, 0, tensorboard=True)
    assert not os.path.exists(tmp_path / "out")
