"""End-to-end checks of train_sft.py, run as a user runs it (subprocesses, CPU, a tiny pretrained model)."""
import json
import os
import re

import pytest
import torch

from nanollm.configurator import UserError
from nanollm.instructions import demo_records
from script_runner import interrupt_after, run_in_process, run_script

TINY = ["--batch_size=4", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", "--dtype=float32",
        "--device=cpu", "--max_new_tokens=6", "--eval_examples=6"]


def run(args, nproc=0, check=True):
    return run_script("train_sft.py", TINY + args, nproc, check)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pretraining out_dir made by train_pretrain.py: a 2-layer GPT over a 400-piece tokenizer (2 iterations)."""
    folder = tmp_path_factory.mktemp("base")
    records = demo_records()["train"]
    lines = [r["question"] + " " + r["answer"] for r in records["qa.jsonl"] if r["question"].isascii()]
    (folder / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_script("train_pretrain.py", [f"--dataset={folder / 'text.txt'}", f"--data_dir={folder / 'prepared'}",
                                     f"--out_dir={folder / 'out'}", "--max_iters=2", "--n_layer=2", "--n_head=2",
                                     "--n_embd=32", "--block_size=64", "--batch_size=4", "--vocab_size=400",
                                     "--eval_iters=1", "--device=cpu", "--sample_tokens=2"])
    return str(folder / "out")


@pytest.fixture(scope="module")
def custom_data(tmp_path_factory):
    """A small dataset in three formats, Chinese included."""
    folder = tmp_path_factory.mktemp("data")
    qa = [{"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}."}
          for a in range(6) for b in range(4)]
    with open(folder / "qa.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in qa)
    chats = [[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
              {"role": "user", "content": f"{n}加一是多少？"}, {"role": "assistant", "content": f"是{n + 1}。"}]
             for n in range(8)]
    (folder / "chat.json").write_text(json.dumps([{"messages": m} for m in chats], ensure_ascii=False, indent=1))
    reviews = [{"text": t, "label": label} for t, label in [("great", "正面"), ("awful", "负面")] * 4]
    with open(folder / "reviews.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in reviews)
    return str(folder)


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    return {r["iter"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


@pytest.mark.slow
def test_demo_run_reports_before_and_after_and_lowers_the_loss(base, tmp_path):
    result = run([f"--init_from={base}", f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'demo'}",
                  "--max_iters=12", "--eval_interval=6"])
    out = result.stdout
    assert "| metric | before SFT | after SFT |" in out and "| exact_match |" in out and "| accuracy |" in out
    assert "truncated to block_size" in out
    records = metrics(tmp_path / "out")
    phases = [r for r in records if "phase" in r]
    assert [r["phase"] for r in phases] == ["before", "after"]
    assert {"val_loss", "val_ppl", "exact_match", "token_f1", "rouge_l_f1", "bleu", "accuracy"} <= set(phases[1])
    assert phases[1]["val_loss"] < phases[0]["val_loss"]
    assert [r["iter"] for r in records if "val_loss" in r and "phase" not in r] == [6, 12]
    steps = losses(tmp_path / "out")
    assert sorted(steps) == list(range(12)) and steps[11] < steps[0]
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert checkpoint["stage"] == "sft" and checkpoint["iter_num"] == 12
    assert os.path.exists(tmp_path / "out" / "tokenizer.model")
    assert {"qa.jsonl", "chat.jsonl", "knowledge.json"} <= set(os.listdir(tmp_path / "demo" / "train"))


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_the_run_resumes_exactly(base, custom_data, tmp_path):
    common = [f"--init_from={base}", f"--dataset={custom_data}", "--eval_interval=100", "--dropout=0.1",
              "--gradient_accumulation_steps=2", "--eval_examples=0", "--lr_decay_iters=20"]
    split = tmp_path / "split"
    code, output = interrupt_after("train_sft.py", TINY + common + [f"--out_dir={split}", "--max_iters=400"], split)
    assert code == 130 and "stop requested" in output and "Traceback" not in output, output[-3000:]
    stopped = torch.load(split / "ckpt.pt", weights_only=True)["iter_num"]
    assert 2 <= stopped == len(losses(split)) < 400  # the checkpoint is where the log ends
    end = max(6, stopped + 2)
    run(common[1:] + [f"--out_dir={split}", f"--max_iters={end}", "--init_from=resume"])
    run(common + [f"--out_dir={tmp_path / 'straight'}", f"--max_iters={end}"])
    a, b = losses(tmp_path / "straight"), losses(split)
    assert sorted(a) == sorted(b) == list(range(end))
    for it in range(end):  # dropout is on: RNG states must be restored too
        assert abs(a[it] - b[it]) < 1e-6, (it, a[it], b[it])
    assert [r["phase"] for r in metrics(split) if "phase" in r] == ["before", "after"]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_accumulation_and_packing(base, custom_data, tmp_path):
    common = [f"--init_from={base}", f"--dataset={custom_data}", "--eval_interval=100", "--max_iters=3",
              "--gradient_accumulation_steps=2", "--packing=True", "--eval_examples=0"]
    single = run(common + [f"--out_dir={tmp_path / 'single'}"])
    assert "packing:" in single.stdout
    run(common + [f"--out_dir={tmp_path / 'ddp'}"], nproc=2)
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == list(range(3))
    for it in range(3):
        assert abs(a[it] - b[it]) < 1e-5, (it, a[it], b[it])


@pytest.mark.slow
def test_a_bad_record_stops_the_run_before_training(base, custom_data, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"prompt": "p", "response": "r"}\n')
    message = f"{bad}:2: record matches no SFT format; keys seen: ['prompt', 'response']"
    with pytest.raises(UserError, match=re.escape(message)):
        run_in_process("train_sft.py", TINY + [f"--init_from={base}", f"--dataset={custom_data},{bad}",
                                               f"--out_dir={tmp_path / 'out'}"], monkeypatch)
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


@pytest.mark.slow
def test_gpt2_init_is_a_clear_error_while_there_is_no_gpt2_tokenizer(tmp_path):
    result = run(["--init_from=gpt2", f"--out_dir={tmp_path}"], check=False)
    assert result.returncode == 2 and "GPT-2 weights load" in result.stderr and "tokenizer" in result.stderr


@pytest.mark.slow
def test_distillation_from_an_identical_teacher_starts_at_zero_kl(base, tmp_path):
    # α = 0: the loss is T²·KL(teacher ‖ student) only; the student starts as a copy of the teacher, so the first
    # step's loss is 0 (up to float rounding) and its gradient is 0, while a plain run's first loss is the CE.
    out = str(tmp_path / "distilled")
    run([f"--init_from={base}", f"--out_dir={out}", f"--teacher={base}", "--distill_alpha=0.0", "--max_iters=2",
         "--eval_examples=0", "--eval_interval=100"])
    first = losses(out)[0]
    assert abs(first) < 1e-5
    assert metrics(out)[1]["grad_norm"] < 1e-4
    failed = run([f"--init_from={base}", f"--out_dir={tmp_path / 'x'}", f"--teacher={tmp_path / 'none'}"], check=False)
    assert failed.returncode == 2 and "teacher=" in failed.stderr and not os.path.exists(tmp_path / "x")
