"""End-to-end checks of train_rm.py, run as a user runs it (subprocesses, CPU, a tiny pretrained model)."""
import json
import os
import re

import pytest
import torch

from nanollm.annotators import GoldAnnotator, feedback_prompts
from nanollm.checkpoint import load_checkpoint
from nanollm.configurator import UserError
from nanollm.loader import load_model
from nanollm.reward import dataset_loss, encode_groups, load_groups, score_encoded
from nanollm.tokenizer import Tokenizer
from nanollm.world import World
from script_runner import interrupt_after, run_in_process, run_script

TINY = ["--batch_size=4", "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-3", "--dtype=float32",
        "--device=cpu"]
BASE_MODEL = ["--max_iters=2", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4",
              "--vocab_size=400", "--eval_iters=1", "--device=cpu", "--sample_tokens=2"]  # the pretrained bases' runs


def run(args, nproc=0, check=True):
    return run_script("train_rm.py", TINY + args, nproc, check)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pretraining out_dir made by train_pretrain.py: a 2-layer GPT over a 400-piece tokenizer (2 iterations)."""
    folder = tmp_path_factory.mktemp("base")
    lines = [f"{p.question} {p.answer}" for p in World(0).qa_pairs(0) if p.language == "en"]
    (folder / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_script("train_pretrain.py", [f"--dataset={folder / 'text.txt'}", f"--data_dir={folder / 'prepared'}",
                                     f"--out_dir={folder / 'out'}"] + BASE_MODEL)
    return str(folder / "out")


@pytest.fixture(scope="module")
def scored_data(tmp_path_factory):
    """Score-format files about world questions (3 replies each, scored by the gold annotator) and a pairwise file."""
    folder = tmp_path_factory.mktemp("prefs")
    world, records = World(0), []
    gold = GoldAnnotator(world)
    for question in feedback_prompts(world, 40, seed=0):
        parsed = gold.question(question)
        replies = [parsed.reference, parsed.answer, "I do not know."]
        records.append({"input": question, "outputs": [{"response": r, "score": gold.judge(question, r).overall}
                                                       for r in replies]})
    for name, part in (("train.jsonl", records[:32]), ("heldout.jsonl", records[32:])):
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    pairs = [{"prompt": r["input"], "chosen": r["outputs"][0]["response"], "rejected": "I do not know."}
             for r in records]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return folder


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    return {r["iter"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


@pytest.mark.slow
def test_demo_run_collects_trains_logs_and_saves_a_centred_reward_model(base, tmp_path):
    demo = ["--demo_prompts=24", "--demo_k=3", "--demo_max_new_tokens=8", f"--data_dir={tmp_path / 'demo'}"]
    result = run([f"--init_from={base}", f"--out_dir={tmp_path / 'out'}", "--max_iters=6", "--eval_interval=3"] + demo)
    assert "collected 24 x 3 replies" in result.stdout and "| response length (tokens) |" in result.stdout
    records = metrics(tmp_path / "out")
    evals = [r for r in records if "val_pair_acc" in r]
    assert [r["iter"] for r in evals] == [0, 3, 6, 6] and evals[-1]["phase"] == "final"
    assert {"val_loss", "val_pair_acc", "val_spearman", "val_kendall", "val_gold_pair_acc", "val_gold_kendall",
            "reward_mean", "reward_std", "val_length_corr"} <= set(evals[-1])
    assert sorted(losses(tmp_path / "out")) == list(range(6))
    assert {"train.jsonl", "heldout.jsonl", "gold.jsonl", "meta.json"} <= set(os.listdir(tmp_path / "demo"))
    # the saved model: stage, bias, and a mean reward of 0 on the SFT model's (here: the base model's) responses
    model, _, _, checkpoint = load_model(str(tmp_path / "out" / "ckpt.pt"), kinds=("reward",))
    assert checkpoint["stage"] == "reward" and checkpoint["iter_num"] == 6 and checkpoint["loss"] == "ranking"
    assert model.reward_bias.item() == pytest.approx(checkpoint["reward_bias"])
    tokenizer = Tokenizer(str(tmp_path / "out" / "tokenizer.model"))
    encoded, _ = encode_groups(tokenizer, load_groups(str(tmp_path / "demo" / "train.jsonl")), 64)
    rewards = sum(score_encoded(model, encoded, tokenizer.pad_id, 32, "cpu", torch.no_grad()), [])
    assert abs(sum(rewards) / len(rewards)) < 1e-4
    # a second run with the same settings reuses the collected data
    again = run([f"--init_from={base}", f"--out_dir={tmp_path / 'again'}", "--max_iters=1"] + demo)
    assert "collected" not in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("likelihood_weight", [0.0, 1.0])
def test_ctrl_c_checkpoints_and_the_run_resumes_exactly(base, scored_data, tmp_path, likelihood_weight):
    common = [f"--init_from={base}", f"--dataset={scored_data / 'train.jsonl'}",
              f"--eval_dataset={scored_data / 'heldout.jsonl'}", "--eval_interval=100", "--dropout=0.1",
              "--gradient_accumulation_steps=2", "--lr_decay_iters=20", f"--likelihood_weight={likelihood_weight}"]
    split = tmp_path / "split"
    code, output = interrupt_after("train_rm.py", TINY + common + [f"--out_dir={split}", "--max_iters=400"], split)
    assert code == 130 and "stop requested" in output and "Traceback" not in output, output[-3000:]
    stopped = load_checkpoint(str(split / "ckpt.pt"))["iter_num"]
    assert 2 <= stopped == len(losses(split)) < 400  # the checkpoint is where the log ends
    end = max(6, stopped + 2)
    # resuming reads the feature's presence from the checkpoint, not from the command line
    run(common[1:-1] + [f"--out_dir={split}", f"--max_iters={end}", "--init_from=resume"])
    run(common + [f"--out_dir={tmp_path / 'straight'}", f"--max_iters={end}"])
    a, b = losses(tmp_path / "straight"), losses(split)
    assert sorted(a) == sorted(b) == list(range(end))
    for it in range(end):  # dropout is on: RNG states must be restored too
        assert abs(a[it] - b[it]) < 1e-6, (it, a[it], b[it])
    model, _, _, checkpoint = load_model(str(split / "ckpt.pt"), kinds=("reward",))
    assert checkpoint["likelihood_weight"] == likelihood_weight
    assert hasattr(model, "likelihood_weight") == (likelihood_weight > 0)
    if likelihood_weight:  # learned: it moved from where it started
        assert model.likelihood_weight.item() != likelihood_weight


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ranking", "mse"])  # pairwise: the BERT backbone's test below
def test_ddp_two_processes_match_one_process_with_accumulation(base, scored_data, tmp_path, loss):
    common = [f"--init_from={base}", f"--dataset={scored_data / 'train.jsonl'}", f"--loss={loss}",
              "--eval_interval=100", "--max_iters=3", "--gradient_accumulation_steps=2"]
    run(common + [f"--out_dir={tmp_path / 'single'}"])
    run(common + [f"--out_dir={tmp_path / 'ddp'}"], nproc=2)
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == list(range(3))
    for it in range(3):
        assert abs(a[it] - b[it]) < 1e-5, (it, a[it], b[it])


@pytest.mark.slow
def test_mse_trains_on_scores_and_is_refused_on_pairs(base, scored_data, tmp_path, monkeypatch):
    result = run([f"--init_from={base}", f"--dataset={scored_data / 'train.jsonl'}", "--loss=mse", "--max_iters=2",
                  f"--out_dir={tmp_path / 'mse'}"])
    assert "loss=mse" in result.stdout and sorted(losses(tmp_path / "mse")) == [0, 1]
    with pytest.raises(UserError, match="pairs.jsonl:1: loss='mse' needs the scores format"):
        run_in_process("train_rm.py", TINY + [f"--init_from={base}", f"--dataset={scored_data / 'pairs.jsonl'}",
                                              "--loss=mse", f"--out_dir={tmp_path / 'refused'}"], monkeypatch)
    assert not os.path.exists(tmp_path / "refused" / "metrics.jsonl")


@pytest.mark.slow
def test_a_bad_record_stops_the_run_before_training(base, scored_data, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "response": "r"}\n')
    with pytest.raises(UserError, match=re.escape(f"{bad}:2: record matches no reward-data format")):
        run_in_process("train_rm.py", TINY + [f"--init_from={base}", f"--dataset={bad}",
                                              f"--out_dir={tmp_path / 'out'}"], monkeypatch)
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


@pytest.fixture(scope="module")
def bert_base(base):
    """A BERT pretrained by train_pretrain.py (2 iterations) on the prepared data of `base`: the same tokenizer."""
    folder = os.path.dirname(base)
    run_script("train_pretrain.py", ["--model_type=bert", f"--dataset={os.path.join(folder, 'text.txt')}",
                                     f"--data_dir={os.path.join(folder, 'prepared')}",
                                     f"--out_dir={os.path.join(folder, 'bert')}"] + BASE_MODEL)
    return os.path.join(folder, "bert")


@pytest.mark.slow
def test_a_bert_backbone_trains_on_one_and_two_ranks_and_loads_back(base, bert_base, scored_data, tmp_path):
    common = [f"--init_from={base}", f"--backbone={bert_base}", f"--dataset={scored_data / 'pairs.jsonl'}",
              "--loss=pairwise", "--eval_interval=100", "--max_iters=3", "--gradient_accumulation_steps=2"]
    result = run(common + [f"--out_dir={tmp_path / 'single'}"])
    assert "(bert)" in result.stdout
    # DDP: BERT's masked-LM head gets no gradient from a reward loss; it is frozen, so no rank waits for it
    run(common + [f"--out_dir={tmp_path / 'ddp'}"], nproc=2)
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == list(range(3)) and all(abs(a[it] - b[it]) < 1e-5 for it in range(3))
    model, _, _, checkpoint = load_model(str(tmp_path / "single" / "ckpt.pt"), kinds=("reward",))
    assert checkpoint["backbone"] == "bert" and type(model.backbone).__name__ == "BERT"
    bert_state = torch.load(os.path.join(bert_base, "ckpt.pt"), weights_only=True)["model"]
    assert torch.equal(model.backbone.mlm_dense.weight, bert_state["mlm_dense.weight"])  # frozen: unchanged
    assert not torch.equal(model.backbone.blocks[0].attn.c_attn.weight, bert_state["blocks.0.attn.c_attn.weight"])


@pytest.mark.slow
def test_a_gpt_folder_as_the_backbone_is_refused(base, scored_data, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="--model_type=bert out_dir"):
        run_in_process("train_rm.py", TINY + [f"--init_from={base}", f"--backbone={base}", "--loss=pairwise",
                                              f"--dataset={scored_data / 'pairs.jsonl'}", "--max_iters=1",
                                              f"--out_dir={tmp_path / 'out'}"], monkeypatch)


@pytest.mark.slow
def test_a_custom_file_is_split_by_prompt_and_the_model_records_its_training_prompts(base, tmp_path):
    """10 prompts with 3 pairs each: holding out 15% of the records would cut a prompt in two; 15% of the prompts
    (2 of them, every pair of theirs) are held out instead."""
    prompts = [f"What is {i} plus {i}?" for i in range(10)]
    records = [{"prompt": p, "chosen": f"{p[8:-1]} is {2 * i}.", "rejected": wrong}
               for i, p in enumerate(prompts) for wrong in ("I do not know.", "It is 7.", "Blue.")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result = run([f"--init_from={base}", f"--dataset={data}", "--loss=pairwise", "--val_fraction=0.15",
                  "--max_iters=1", f"--out_dir={tmp_path / 'out'}"])
    assert "train: 24 prompts" in result.stdout and "held-out: 6 prompts" in result.stdout  # records of 8 and 2
    checkpoint = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert checkpoint["trained_prompts"] == [[{"role": "user", "content": p}] for p in prompts[:8]]


@pytest.mark.slow
def test_the_demo_with_another_seed_trains_on_no_prompt_that_ppo_holds_out(base, tmp_path):
    demo = ["--demo_prompts=30", "--demo_k=2", "--demo_max_new_tokens=4", f"--data_dir={tmp_path / 'demo'}",
            "--seed=42"]
    run([f"--init_from={base}", f"--out_dir={tmp_path / 'rm'}", "--max_iters=1"] + demo)
    trained = [messages[0]["content"] for messages in load_checkpoint(str(tmp_path / "rm" / "ckpt.pt"))
               ["trained_prompts"]]
    lines = (tmp_path / "demo" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert trained == [json.loads(line)["input"] for line in lines] and len(trained) == 24
    world = World(0)
    for prompt_seed in (1337, 42):  # train_ppo.py's default order and wording, and the reward model's
        held_out = feedback_prompts(world, 160, prompt_seed, "test") + \
            feedback_prompts(world, 160, prompt_seed, "validation")
        assert not set(trained) & set(held_out)
    # and train_ppo.py, which checks exactly that, accepts this reward model
    ppo = ["--batch_size=2", "--minibatch_size=2", "--max_new_tokens=4", "--eval_prompts=2", "--validation_prompts=2",
           "--train_prompts=4", "--eval_samples=1", "--max_iters=1", "--device=cpu", "--dtype=float32"]
    run_script("train_ppo.py", ppo + [f"--init_from={base}", f"--reward_model={tmp_path / 'rm'}",
                                      f"--out_dir={tmp_path / 'ppo'}"])


@pytest.mark.slow
def test_always_save_checkpoint_false_ends_with_the_best_model_not_the_last(base, scored_data, tmp_path):
    """Held-out labels that reverse the training ones: the more the model learns, the worse its held-out loss."""
    reversed_file = tmp_path / "reversed.jsonl"
    lines = (scored_data / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    for record in records:
        for output in record["outputs"]:
            output["score"] = -output["score"]
    reversed_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    run([f"--init_from={base}", f"--dataset={scored_data / 'train.jsonl'}", f"--eval_dataset={reversed_file}",
         "--max_iters=6", "--eval_interval=2", "--always_save_checkpoint=False", f"--out_dir={tmp_path / 'out'}"])
    records = metrics(tmp_path / "out")
    evals = [r for r in records if "val_loss" in r and r.get("phase") != "final"]
    final = next(r for r in records if r.get("phase") == "final")
    best = min(r["val_loss"] for r in evals)
    assert [r["iter"] for r in evals] == [0, 2, 4, 6] and best < evals[-1]["val_loss"] - 1e-3
    assert final["val_loss"] == pytest.approx(best, abs=1e-5)  # the saved, final model is the best one
    model = load_model(str(tmp_path / "out" / "ckpt.pt"), kinds=("reward",)).model
    tokenizer = Tokenizer(str(tmp_path / "out" / "tokenizer.model"))
    groups = load_groups(str(reversed_file))
    encoded, _ = encode_groups(tokenizer, groups, 64)
    rewards = score_encoded(model, encoded, tokenizer.pad_id, 32, "cpu", torch.no_grad())
    assert dataset_loss(rewards, groups, "ranking") == pytest.approx(best, abs=1e-5)


@pytest.mark.slow
def test_a_block_size_that_cuts_most_replies_is_refused_before_training(base, scored_data, tmp_path, monkeypatch):
    import runpy
    import sys

    from nanollm.configurator import UserError

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_rm.py")
    monkeypatch.setattr(sys, "argv", [script] + TINY + [f"--init_from={base}", f"--out_dir={tmp_path / 'out'}",
                                                        f"--dataset={scored_data / 'train.jsonl'}", "--block_size=2"])
    with pytest.raises(UserError, match=r"block_size=2: (\d+) of \1 training prompt \+ response pairs do not fit"):
        runpy.run_path(script, run_name="__main__")  # the script's own checks, in this process
    assert not os.path.exists(tmp_path / "out")
