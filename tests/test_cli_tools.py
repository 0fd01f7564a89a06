"""The command-line tools run as a user runs them (subprocesses, CPU) on one tiny pretrained checkpoint:
python -m nanollm.prune, python -m nanollm.quantize, python -m nanollm.annotators collect, and evaluate.py on a
release folder written by python -m nanollm.export."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nanollm.configurator import script_settings
from nanollm.data import prepare_dataset
from nanollm.loader import load_model
from script_runner import REPO, run_script, write_corpus

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4", "--eval_iters=2",
        "--log_interval=1", "--warmup_iters=1", "--learning_rate=3e-3", "--dtype=float32", "--device=cpu",
        "--sample_tokens=3", "--dropout=0.0"]

pytestmark = pytest.mark.slow  # a subprocess per test, and one pretraining run for the module


def run_module(module, *args, check=True):
    """`python -m <module> args`, as a user types it, from the repository root."""
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_corpus")
    write_corpus(folder, 400)
    return prepare_dataset(str(folder / "text.txt"), str(folder / "prepared"), vocab_size=400)


@pytest.fixture(scope="module")
def base_dir(data_dir, tmp_path_factory):
    """A tiny GPT pretrained for 4 iterations by train_pretrain.py: ckpt.pt + tokenizer.model, as a user has them."""
    out_dir = tmp_path_factory.mktemp("cli_base")
    run_script("train_pretrain.py", TINY + [f"--dataset={data_dir}", f"--out_dir={out_dir}", "--max_iters=4",
                                            "--eval_interval=4", "--overwrite=True"])
    return out_dir


def prunable_weights(model):
    from nanollm.prune import prunable_linears

    return {name: module.weight.detach().clone() for name, module in prunable_linears(model)}


def test_prune_cli_zeroes_the_globally_smallest_weights_and_finetunes_the_rest(base_dir, data_dir, tmp_path):
    result = run_module("nanollm.prune", f"--out_dir={base_dir}", "--sparsity=0.5", "--finetune_iters=3",
                        f"--data_dir={data_dir}", f"--pruned_dir={tmp_path}")
    assert "fine-tuned 3 steps with masks" in result.stdout
    before = prunable_weights(load_model(str(base_dir)).model)
    after = prunable_weights(load_model(str(tmp_path)).model)  # loads like any checkpoint
    assert sorted(before) == sorted(after) and len(before) == 5  # c_attn, attn.c_proj, c_fc, mlp.c_proj, untied lm_head
    magnitudes = torch.cat([w.abs().flatten() for w in before.values()])
    n_pruned = round(0.5 * magnitudes.numel())
    threshold = magnitudes.sort().values[n_pruned - 1]  # by hand: the n_pruned-th smallest |w| over all layers
    zeros = sum(int((w == 0).sum()) for w in after.values())
    assert zeros == n_pruned
    for name in before:
        expected_zero = before[name].abs() <= threshold  # one global threshold, not one per layer
        assert torch.equal(after[name] == 0, expected_zero), name  # the fine-tune revived no pruned weight
        kept = ~expected_zero
        assert not torch.equal(after[name][kept], before[name][kept]), name  # the kept weights were fine-tuned
    assert (tmp_path / "tokenizer.model").read_bytes() == (base_dir / "tokenizer.model").read_bytes()


def test_quantize_cli_writes_an_int8_model_equal_to_the_dequantized_float_model(base_dir, tmp_path):
    from nanollm.quantize import dequantize, quantizable_linears, quantize_per_channel

    result = run_module("nanollm.quantize", f"--out_dir={base_dir}", f"--int8_dir={tmp_path}")
    assert "5 Linear layers -> int8" in result.stdout  # one block's four and the untied lm_head
    quantized = load_model(tmp_path / "model_int8.pt").model
    reference = load_model(str(base_dir)).model.eval()
    for _, _, _, linear in quantizable_linears(reference):  # the float model with q · s in place of each weight
        linear.weight.data = dequantize(*quantize_per_channel(linear.weight))
    idx = torch.randint(0, reference.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(quantized(idx)[0], reference(idx)[0], atol=1e-5)
    assert (tmp_path / "tokenizer.model").read_bytes() == (base_dir / "tokenizer.model").read_bytes()


def test_annotators_collect_cli_writes_preference_files_with_the_asked_shape(base_dir, tmp_path):
    result = run_module("nanollm.annotators", "collect", f"--out_dir={base_dir}", f"--data_dir={tmp_path}",
                        "--n_prompts=5", "--k=3", "--max_new_tokens=4", "--labelers=2", "--heldout_fraction=0.4",
                        "--temperatures=1.0")
    meta = json.loads(result.stdout[result.stdout.index("{"):])  # the CLI prints meta.json
    assert meta == json.loads((tmp_path / "meta.json").read_text())
    assert meta["checkpoint_iter"] == 4 and meta["n_prompts"] == 5 and meta["k"] == 3

    def read(name):
        return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]

    gold, train, heldout = read("gold"), read("train"), read("heldout")
    assert len(gold) == 5 and all(len(record["replies"]) == 3 for record in gold)  # k replies for every prompt
    assert len(train) > 0 and len(heldout) > 0
    questions = [record["question"] if "question" in record else record["prompt"] for record in gold]
    assert len(set(questions)) == 5  # five different prompts


def test_evaluate_script_scores_a_release_folder_like_its_checkpoint(base_dir, data_dir, tmp_path):
    release = tmp_path / "release"
    run_module("nanollm.export", f"--out_dir={base_dir}", f"--release_dir={release}", "--onnx=no")
    result = run_script("evaluate.py", [f"--out_dir={base_dir},{release}", f"--text={data_dir}", "--questions=",
                                        "--max_tokens=200", "--device=cpu"])
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in result.stdout.splitlines()
             if line.startswith("|")]  # the markdown table: | row | model 1 | model 2 |
    rows = {row[0]: row[1:] for row in cells if row[0] in ("text tokens", "text loss", "text ppl")}
    assert set(rows) == {"text tokens", "text loss", "text ppl"}, result.stdout
    for name, (checkpoint_value, release_value) in rows.items():  # the same weights: the same numbers
        assert checkpoint_value == release_value, (name, result.stdout)
    assert rows["text tokens"][0] == "200"
    assert 1.0 < float(rows["text ppl"][0]) < 400  # an untrained model scores about vocab_size; this one learned a bit


@pytest.mark.parametrize("command, message", [
    (["-m", "nanollm.export", "--ckpt_dir=out-sft"], "command line: --ckpt_dir is now --out_dir"),
    (["-m", "nanollm.export", "--out=release"], "command line: --out is now --release_dir"),
    (["-m", "nanollm.export", "--onnx=maybe"], "onnx='maybe': expected 'auto', 'yes' or 'no'"),
    (["-m", "nanollm.quantize", "--ckpt_dir=out"], "command line: --ckpt_dir is now --out_dir"),
    (["-m", "nanollm.prune", "--sparsity=half"], "command line: 'sparsity' must be float (default 0.5), got str 'half'"),
    (["-m", "nanollm.prune", "--pruned_dr=x"], "command line: unknown setting 'pruned_dr' (did you mean pruned_dir?)"),
    (["-m", "nanollm.annotators", "collect", "--checkpoint=out-sft"], "command line: --checkpoint is now --out_dir"),
    (["-m", "nanollm.annotators", "collect", "--n_labelers=2"], "command line: --n_labelers is now --labelers"),
    (["-m", "nanollm.annotators", "collect", "--noise=0.1"], "command line: --noise is now --labeler_noise"),
    (["-m", "nanollm.annotators", "judge", "Who?", "--k=3"], "command line: unknown setting 'k'"),
    (["-m", "nanollm.annotators", "judge", "Who?"], "judge takes a question and a reply, each in quotes; got 1 words"),
    (["-m", "nanollm.sft", "show"], "command line: expected 'show FILE [--key=value ...]' (FILE: a .json or .jsonl "
                                    "SFT file), got show"),
    (["-m", "nanollm.report", "out-pipeline"], "command line: unexpected argument 'out-pipeline' (a pipeline folder: "
                                               "--pipeline_dir=out-pipeline)"),
    (["-m", "nanollm.report", "--out=x"], "command line: --out is now --report_dir"),
    (["serve.py", "--ckpt_dir=out-sft"], "command line: --ckpt_dir is now --out_dir"),
    (["evaluate.py", "--model=out,out-sft"], "command line: --model is now --out_dir"),
])
def test_every_tool_reads_key_value_settings_and_a_renamed_one_names_its_new_name(command, message):
    result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2  # the configurator's exit code for a user's mistake
    assert result.stderr.splitlines() == [f"error: {message}"]  # one line, no traceback, no usage block


def test_annotators_collect_names_its_labelers_as_train_rm_does():
    result = subprocess.run([sys.executable, "-m", "nanollm.annotators", "collect", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    defaults = dict(line.strip()[2:].split("=", 1) for line in result.stdout.splitlines() if line.startswith("  --"))
    train_rm = script_settings(os.path.join(REPO, "train_rm.py"))
    for name in ("labelers", "labeler_noise", "length_bias"):  # the same setting, the same name, the same default
        assert defaults[name] == str(train_rm[name]), name
    assert defaults["out_dir"] == "out-sft" and "checkpoint" not in defaults and "n_labelers" not in defaults
