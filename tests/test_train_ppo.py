"""End-to-end checks of train_ppo.py, run as a user runs it (subprocesses, CPU) on a tiny SFT checkpoint and a tiny
reward-model checkpoint written here in the formats train_sft.py and train_rm.py save."""
import dataclasses
import json
import os
import runpy
import shutil
import sys

import pytest
import torch

from nanollm.annotators import feedback_prompts
from nanollm.checkpoint import load_checkpoint
from nanollm.configurator import UserError
from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig
from nanollm.reward import RewardModel
from nanollm.tokenizer import train_tokenizer
from nanollm.world import World
from script_runner import REPO, interrupt_after, run_script

TINY = ["--batch_size=4", "--minibatch_size=2", "--ppo_epochs=2", "--max_new_tokens=8", "--eval_prompts=4",
        "--validation_prompts=3", "--train_prompts=12", "--eval_batch_size=4", "--learning_rate=1e-3", "--critic_learning_rate=1e-3",
        "--dtype=float32", "--device=cpu"]
TRAINING_KEYS = {"iter", "score", "gold", "kl", "beta", "objective", "entropy", "clip_frac", "value_clip_frac",
                 "approx_kl", "ratio_mean", "policy_loss", "value_loss", "explained_variance", "response_length",
                 "eos_rate", "rollout_s", "update_s", "minibatches", "grad_norm", "critic_grad_norm", "early_stop"}
EVAL_KEYS = {"iter", "phase"} | {f"{prefix}{key}" for prefix in ("eval_", "val_")  # test and validation prompts
                                 for key in ("score", "gold", "gold_se", "gold_gain", "gold_gain_se", "kl",
                                             "response_length", "eos_rate")}
LANGUAGE_KEYS = {f"{prefix}{key}_{language}" for prefix in ("eval_", "val_") for key in ("score", "gold")
                 for language in ("en", "zh")}  # per language of the prompts, for the languages a set has


def run(args, nproc=0, check=True):
    return run_script("train_ppo.py", TINY + args, nproc, check)


def write_checkpoint(folder, model, model_args, tokenizer_path, **extra):
    """ckpt.pt with the keys train_sft.py / train_rm.py save, and a copy of the tokenizer."""
    os.makedirs(folder, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": None, "scaler": None, "iter_num": 10,
                "best_val_loss": 1.0, "config": {}, "model_args": model_args,
                "rng_states": [{"python": None, "torch": torch.get_rng_state()}], **extra},
               os.path.join(folder, "ckpt.pt"))
    shutil.copyfile(tokenizer_path, os.path.join(folder, "tokenizer.model"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(SFT out_dir, reward-model out_dir): a random 1-layer GPT over a 600-piece tokenizer of world questions, and a
    random reward model on the same tokenizer."""
    folder = tmp_path_factory.mktemp("ppo")
    texts = [f"{p.question} {p.answer}" for p in World(0).qa_pairs(0)]
    tokenizer_path = train_tokenizer(texts, str(folder / "tok"), vocab_size=600)
    model_args = dataclasses.asdict(GPTConfig(vocab_size=600, block_size=48, n_layer=1, n_head=2, n_embd=32))
    torch.manual_seed(0)
    write_checkpoint(folder / "sft", GPT(GPTConfig(**model_args)), model_args, tokenizer_path, stage="sft")
    reward_model = RewardModel(GPT(GPTConfig(**model_args)))
    train_questions = feedback_prompts(World(0), 20, 1337, "train")  # what train_rm.py's demo would train on
    write_checkpoint(folder / "rm", reward_model, model_args, tokenizer_path, stage="reward", loss="ranking",
                     reward_bias=0.0, trained_prompts=[[{"role": "user", "content": q}] for q in train_questions])
    return str(folder / "sft"), str(folder / "rm")


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_run_logs_every_metric_and_saves_a_policy_in_the_sft_format(checkpoints, tmp_path):
    sft, rm = checkpoints
    out = tmp_path / "out"
    result = run([f"--init_from={sft}", f"--reward_model={rm}", f"--out_dir={out}", "--max_iters=2",
                  "--eval_interval=1", "--target_kl=0.5"])
    assert "| eval_gold |" in result.stdout
    records = metrics(out)
    evals = [r for r in records if r.get("phase") == "eval"]
    training = [r for r in records if "phase" not in r]
    assert [r["iter"] for r in evals] == [0, 1, 2] and [r["iter"] for r in training] == [0, 1]
    assert all(EVAL_KEYS < set(r) <= EVAL_KEYS | LANGUAGE_KEYS for r in evals)
    assert all(set(r) == TRAINING_KEYS for r in training)
    assert evals[0]["eval_kl"] == 0.0  # the policy starts as the reference
    assert training[0]["minibatches"] == 4 and 1 <= training[0]["response_length"] <= 8
    assert 1.0 <= training[0]["gold"] <= 5.0 and 1.0 <= evals[-1]["eval_gold"] <= 5.0
    assert training[1]["beta"] != training[0]["beta"]  # adaptive
    assert "=== iteration 2: held-out prompts ===" in (out / "samples.txt").read_text(encoding="utf-8")
    # the policy loads like an SFT checkpoint (sample.py, chat.py) and has moved; the critic is saved beside it
    checkpoint = load_checkpoint(str(out / "ckpt.pt"))
    assert checkpoint["stage"] == "ppo" and checkpoint["iter_num"] == 2 and "critic" in checkpoint
    policy = load_model(str(out)).model
    start = load_model(sft).model
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), start.parameters()))
    assert os.path.exists(out / "tokenizer.model")


@pytest.mark.slow
def test_the_critic_warms_up_alone_and_groups_of_samples_share_a_prompt(checkpoints, tmp_path):
    sft, rm = checkpoints
    out = tmp_path / "warmup"
    run([f"--init_from={sft}", f"--reward_model={rm}", f"--out_dir={out}", "--max_iters=1", "--eval_interval=1",
         "--critic_warmup_iters=1", "--samples_per_prompt=2", "--score_baseline=others_mean",
         "--eval_samples=3"])
    checkpoint = load_checkpoint(str(out / "ckpt.pt"))
    start = load_checkpoint(os.path.join(sft, "ckpt.pt"))
    critic_start = load_checkpoint(os.path.join(rm, "ckpt.pt"))["model"]
    # warm-up iteration: the policy is the SFT model bit for bit, the critic has learned
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in start["model"].items())
    assert any(not torch.equal(checkpoint["critic"][k], critic_start[k]) for k in checkpoint["critic"])
    training = [r for r in metrics(out) if "phase" not in r]
    assert training[0]["grad_norm"] == 0.0 and training[0]["critic_grad_norm"] > 0
    evals = [r for r in metrics(out) if r.get("phase") == "eval"]
    assert evals[1]["eval_kl"] == 0.0 and evals[1]["eval_gold"] == evals[0]["eval_gold"]  # same policy, same seed
    assert evals[0]["eval_gold_se"] >= 0
    samples = (out / "samples.txt").read_text(encoding="utf-8").split("=== iteration 1")[0]
    assert samples.count("Q: ") == 6  # 4 prompts x 3 samples; the first 6 written, the 4 prompts first


@pytest.mark.slow
def test_resume_and_ctrl_c_continue_exactly_samples_included(checkpoints, tmp_path):
    """A run to iteration 2 (evaluated there), resumed and stopped with Ctrl-C, then resumed to the end, equals a
    straight run: training records, evaluations, and samples.txt (no evaluation written twice)."""
    sft, rm = checkpoints
    common = [f"--reward_model={rm}", "--eval_interval=2", "--target_kl=0.5"]
    split = tmp_path / "split"
    run(common + [f"--init_from={sft}", f"--out_dir={split}", "--max_iters=2"])
    code, output = interrupt_after("train_ppo.py", TINY + common + ["--init_from=resume", f"--out_dir={split}",
                                                                    "--max_iters=400"], split, '"score"', records=3)
    assert code == 130 and "stop requested" in output and "Traceback" not in output, output[-3000:]
    stopped = load_checkpoint(str(split / "ckpt.pt"))["iter_num"]
    assert 3 <= stopped == len([r for r in metrics(split) if "phase" not in r]) < 400
    end = max(4, stopped + 1)
    run(common + ["--init_from=resume", f"--out_dir={split}", f"--max_iters={end}"])
    run(common + [f"--init_from={sft}", f"--out_dir={tmp_path / 'straight'}", f"--max_iters={end}"])
    a = [r for r in metrics(tmp_path / "straight") if "phase" not in r]
    b = [r for r in metrics(split) if "phase" not in r]
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == list(range(end))
    for x, y in zip(a, b):
        for key in ("score", "kl", "beta", "policy_loss", "value_loss", "approx_kl"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["iter"], key)
    evals = [[(r["iter"], r["eval_gold"], r["eval_score"]) for r in metrics(out) if r.get("phase") == "eval"]
             for out in (tmp_path / "straight", split)]
    assert evals[0] == evals[1] and [it for it, _, _ in evals[0]] == sorted({*range(0, end, 2), end})
    assert (split / "samples.txt").read_text(encoding="utf-8") == \
        (tmp_path / "straight" / "samples.txt").read_text(encoding="utf-8")


DISAGREEING_RANKS = """
import atexit, json, os, runpy, sys
sys.path.insert(0, {repo!r})
import nanollm.ppo

real_ppo_losses, rank, measured = nanollm.ppo.ppo_losses, int(os.environ["RANK"]), []


def ppo_losses(*args, **kwargs):  # rank 0 reports an approx KL of 0: its own measure never crosses the limit
    policy_objective, critic_loss, stats = real_ppo_losses(*args, **kwargs)
    measured.append(stats["approx_kl"])
    return policy_objective, critic_loss, dict(stats, approx_kl=0.0) if rank == 0 else stats


nanollm.ppo.ppo_losses = ppo_losses
import nanollm.distributed  # the script's end_run exits a multi-process run; return instead, to save its state below
nanollm.distributed.end_run = lambda runtime, exit_code=0: nanollm.distributed.teardown(runtime)
atexit.register(lambda: json.dump(measured, open(os.path.join({out!r}, f"approx_kl_rank{{rank}}.json"), "w")))
sys.argv[0] = {script!r}
finished = runpy.run_path({script!r}, run_name="__main__")  # the script's globals at its end
import torch
torch.save({{"policy": finished["raw_policy"].state_dict(), "critic": finished["raw_critic"].state_dict(),
            "beta": finished["controller"].beta, "kl": finished["kl_mean"]}}, os.path.join({out!r}, f"rank{{rank}}.pt"))
"""


@pytest.mark.slow
def test_ddp_ranks_stop_the_epochs_together_on_approx_kl_without_stepping_past_it(checkpoints, tmp_path):
    """The ranks disagree: only rank 1's approx KL crosses the limit (rank 0 is made to report 0), yet both stop
    before the step of the same minibatch. A per-rank decision would let rank 0 step on (and DDP hang or diverge).
    At the end both ranks hold the same policy and critic (the checkpoint's), the same β and the same KL."""
    sft, rm = checkpoints
    out = tmp_path / "ddp"
    wrapper = tmp_path / "disagreeing_ranks.py"
    script = os.path.join(REPO, "train_ppo.py")
    wrapper.write_text(DISAGREEING_RANKS.format(repo=REPO, out=str(tmp_path), script=script))
    run_script(str(wrapper), TINY + [f"--init_from={sft}", f"--reward_model={rm}", f"--out_dir={out}", "--max_iters=1",
                                     "--eval_interval=5", "--early_stop_kl=1e-9", "--target_kl=0.5"], nproc=2,
               timeout=180)
    measured = [json.loads((tmp_path / f"approx_kl_rank{rank}.json").read_text()) for rank in (0, 1)]
    # each rank measured 2 minibatches: the first before any step (approx KL 0), which steps; the second, where
    # rank 1 is over the limit and rank 0 (as it reports) is not: both end the update there
    assert [len(values) for values in measured] == [2, 2] and measured[1][0] == 0.0 and measured[1][1] > 1e-9
    training = [r for r in metrics(out) if "phase" not in r]
    assert training[0]["minibatches"] == 1 and training[0]["early_stop"] is True  # means over ranks: 1 on each
    checkpoint = load_checkpoint(str(out / "ckpt.pt"))  # rank 0's optimizers: exactly one step each
    for optimizer in (checkpoint["optimizer"], checkpoint["critic_optimizer"]):
        assert {int(state["step"]) for state in optimizer["state"].values()} == {1}
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for network, saved in (("policy", checkpoint["model"]), ("critic", checkpoint["critic"])):
        for name, value in ranks[0][network].items():  # in sync with each other and with what was saved
            assert torch.equal(value, ranks[1][network][name]) and torch.equal(value, saved[name]), (network, name)
    start = load_checkpoint(os.path.join(sft, "ckpt.pt"))["model"]
    assert any(not torch.equal(value, start[name]) for name, value in ranks[0]["policy"].items())  # it stepped
    assert ranks[0]["beta"] == ranks[1]["beta"] == checkpoint["beta"] != 0.2  # adapted, from the all-reduced KL
    assert ranks[0]["kl"] == ranks[1]["kl"] == pytest.approx(training[0]["kl"])


@pytest.mark.slow
def test_a_bad_setting_is_one_line_and_exit_code_2(checkpoints, tmp_path):
    sft, rm = checkpoints
    k3 = run([f"--init_from={sft}", f"--reward_model={rm}", f"--out_dir={tmp_path / 'b3'}", "--kl_estimator=k3"],
             check=False)
    assert k3.returncode == 2 and "k3 belongs in a loss" in k3.stderr and "Traceback" not in k3.stderr


@pytest.mark.parametrize("settings, message", [
    (["--no_such_setting=1"], "unknown setting 'no_such_setting'"),
    (["--kl_estimator=k2"], "kl_estimator='k2'"),
    (["--samples_per_prompt=3"], "must be a multiple of samples_per_prompt=3"),
    (["--score_baseline=others_mean"], "samples_per_prompt >= 2"),
    (["--score_baseline=leave_one_out", "--samples_per_prompt=2"], "is now 'others_mean'.*not RLOO"),
    (["--swapped"], "holds a reward model"),  # the reward model given as the SFT model
], ids=["unknown", "k2", "multiple", "lonely", "renamed", "swapped"])
def test_bad_settings_fail_before_any_work(checkpoints, tmp_path, monkeypatch, settings, message):
    """In this process (each fails before the loop, as the subprocess above shows for one): no file is written."""
    sft, rm = checkpoints
    start = [f"--init_from={rm}"] if settings == ["--swapped"] else [f"--init_from={sft}"] + settings
    script = os.path.join(REPO, "train_ppo.py")
    monkeypatch.setattr(sys, "argv", [script] + TINY + start + [f"--reward_model={rm}", f"--out_dir={tmp_path}"])
    with pytest.raises(UserError, match=message):
        runpy.run_path(script, run_name="__main__")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_reward_model_that_trained_on_a_test_or_validation_prompt_is_refused(checkpoints, tmp_path):
    sft, rm = checkpoints
    model, checkpoint = load_model(sft).model, load_checkpoint(os.path.join(rm, "ckpt.pt"))
    world = World(0)
    for split in ("test", "validation"):
        leaked = feedback_prompts(world, 3, 1337, split)[2]  # one of PPO's held-out prompts (4 test, 3 validation)
        folder = tmp_path / f"rm-{split}"
        write_checkpoint(folder, RewardModel(model), checkpoint["model_args"], os.path.join(rm, "tokenizer.model"),
                         stage="reward", reward_bias=0.0,
                         trained_prompts=checkpoint["trained_prompts"] + [[{"role": "user", "content": leaked}]])
        result = run([f"--init_from={sft}", f"--reward_model={folder}", f"--out_dir={tmp_path / split}"], check=False)
        assert result.returncode == 2 and "trained on 1 of the 4 test + 3 validation prompts" in result.stderr
        assert leaked in result.stderr and "Traceback" not in result.stderr
        assert not os.path.exists(tmp_path / split / "metrics.jsonl")
    folder = tmp_path / "rm-old"  # a reward model that does not say what it trained on
    write_checkpoint(folder, RewardModel(model), checkpoint["model_args"], os.path.join(rm, "tokenizer.model"),
                     stage="reward", reward_bias=0.0)
    result = run([f"--init_from={sft}", f"--reward_model={folder}", f"--out_dir={tmp_path / 'old'}"], check=False)
    assert result.returncode == 2 and "does not record the prompts the reward model trained on" in result.stderr
