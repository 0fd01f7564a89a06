"""train_pretrain.py with --model_type=bert and --model_type=encdec, run as a user runs it (subprocess, CPU, tiny)."""
import json
import os

import pytest

from nanollm.data import prepare_dataset
from script_runner import run_script, write_corpus

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_iters=4",
        "--log_interval=1", "--warmup_iters=3", "--learning_rate=5e-3", "--dtype=float32", "--device=cpu",
        "--sample_tokens=5", "--dropout=0.0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus, prepared once (tokenizer + .bin) for the tests of this file."""
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder)
    return prepare_dataset(str(folder / "text.txt"), str(folder / "prepared"), vocab_size=400)


def run(args, check=True, nproc=0):
    return run_script("train_pretrain.py", TINY + args, nproc, check=check)


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["bert", "encdec"])
def test_variant_trains_and_its_metrics_improve(corpus, tmp_path, model_type):
    result = run([f"--dataset={corpus}", f"--out_dir={tmp_path}", f"--model_type={model_type}", "--max_iters=60",
                  "--lr_decay_iters=60", "--eval_interval=60"])
    out = result.stdout + result.stderr
    assert ("BERT" if model_type == "bert" else "EncoderDecoder") in out and "sample:" in out
    evals = [r for r in records(tmp_path) if "val_loss" in r]
    steps = [r["loss"] for r in records(tmp_path) if "loss" in r]
    assert [r["iter"] for r in evals] == [0, 60] and len(steps) == 60
    print(f"{model_type}: val loss {evals[0]['val_loss']:.3f} -> {evals[-1]['val_loss']:.3f}, "
          f"train loss {steps[0]:.3f} -> {steps[-1]:.3f}")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # starts near ln(400) = 6.0
    assert sum(steps[-5:]) < sum(steps[:5]) - 5.0
    if model_type == "bert":
        print(f"bert: val MLM accuracy {evals[0]['val_mlm_accuracy']:.3f} -> {evals[-1]['val_mlm_accuracy']:.3f}")
        assert evals[-1]["val_mlm_accuracy"] > evals[0]["val_mlm_accuracy"] + 0.05
    assert os.path.exists(tmp_path / "ckpt.pt")


@pytest.mark.slow
def test_bert_resume_continues_exactly_and_a_wrong_model_type_is_refused(corpus, tmp_path):
    common = [f"--dataset={corpus}", "--model_type=bert", "--eval_interval=100", "--max_iters=6",
              "--lr_decay_iters=6", "--dropout=0.1"]
    run(common + [f"--out_dir={tmp_path / 'straight'}"])
    run(common + [f"--out_dir={tmp_path / 'split'}", "--max_iters=3"])
    run(common + [f"--out_dir={tmp_path / 'split'}", "--init_from=resume"])
    straight = {r["iter"]: r["loss"] for r in records(tmp_path / "straight") if "loss" in r}
    split = {r["iter"]: r["loss"] for r in records(tmp_path / "split") if "loss" in r}
    assert sorted(straight) == sorted(split) == list(range(6))
    for it in range(6):  # masking noise and dropout are reproduced exactly after the resume
        assert abs(straight[it] - split[it]) < 1e-6, (it, straight[it], split[it])
    wrong = run([f"--dataset={corpus}", f"--out_dir={tmp_path / 'split'}", "--init_from=resume",
                 "--model_type=encdec"], check=False)
    assert wrong.returncode != 0 and "holds a 'bert' model" in wrong.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model_type, resumed", [("bert", False), ("encdec", True)])
def test_two_ranks_match_one_process_with_accumulation(corpus, tmp_path, model_type, resumed):
    """DDP for the masked-LM and infilling objectives: two ranks give the losses of one process accumulating the same
    global batch; the encoder-decoder's two ranks stop at 2 and resume (BERT's resume: the test above). Dropout is
    off; the masking and span noise come from each micro-batch's own seed, so they match too."""
    common = [f"--dataset={corpus}", f"--model_type={model_type}", "--eval_interval=100", "--lr_decay_iters=4",
              "--dropout=0.0", "--gradient_accumulation_steps=2"]
    run(common + [f"--out_dir={tmp_path / 'single'}", "--max_iters=4"])
    if resumed:
        run(common + [f"--out_dir={tmp_path / 'ddp'}", "--max_iters=2"], nproc=2)
    run(common + [f"--out_dir={tmp_path / 'ddp'}", "--max_iters=4"] + ["--init_from=resume"] * resumed, nproc=2)
    single = {r["iter"]: r["loss"] for r in records(tmp_path / "single") if "loss" in r}
    ddp = {r["iter"]: r["loss"] for r in records(tmp_path / "ddp") if "loss" in r}
    assert sorted(single) == sorted(ddp) == list(range(4))
    for it in range(4):
        assert abs(single[it] - ddp[it]) < 1e-5, (it, single[it], ddp[it])
