"""DPO and IPO: the losses and their gradients on given log-probs against hand-computed values, the implicit-reward
statistics, pairs from rankings and scores, sequence log-probs against a plain forward pass, the held-out checks, and
one short train_dpo.py run (a checkpoint the loader opens; resume is exact)."""
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from nanollm.annotators import feedback_prompts
from nanollm.configurator import MissingFileError, UserError
from nanollm.dpo import (check_settings, dpo_loss, encode_pairs, ipo_loss, load_preference_pairs, pair_rollout,
                         pairs_from_groups, preference_files, preference_loss, reward_accuracy, sequence_logprobs)
from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig
from nanollm.reward import RewardModel, parse_record
from nanollm.tokenizer import Tokenizer, encode_content, prompt_ids, train_tokenizer
from nanollm.world import World
from script_runner import run_script
from test_train_ppo import write_checkpoint

# two pairs: policy and reference log-probs of the chosen responses, then of the rejected ones (the batch layout)
POLICY = [-3.0, -5.0, -4.0, -2.0]
REFERENCE = [-3.5, -5.0, -3.5, -2.5]
# h = (π_w − ref_w) − (π_l − ref_l): pair 1 (0.5) − (−0.5) = 1.0; pair 2 (0.0) − (0.5) = −0.5


def test_dpo_loss_matches_hand_values_and_raises_chosen_lowers_rejected():
    logprobs = torch.tensor(POLICY, requires_grad=True)
    loss, stats = preference_loss(logprobs, torch.tensor(REFERENCE), "dpo", beta=0.5)
    # −log σ(β h) = log(1 + e^{−β h}): β h = 0.5 and −0.25
    assert loss.item() == pytest.approx((math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.25))) / 2, abs=1e-6)
    loss.backward()
    # dL/dh_i = −β σ(−β h_i) / 2; h rises with the chosen log-prob and falls with the rejected one
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected_chosen = [-0.5 * sigmoid(-0.5) / 2, -0.5 * sigmoid(0.25) / 2]
    assert logprobs.grad[:2].tolist() == pytest.approx(expected_chosen, abs=1e-6)
    assert logprobs.grad[2:].tolist() == pytest.approx([-g for g in expected_chosen], abs=1e-6)
    assert (logprobs.grad[:2] < 0).all() and (logprobs.grad[2:] > 0).all()  # a descent step: chosen up, rejected down
    assert dpo_loss(torch.zeros(3), 0.1).tolist() == pytest.approx([math.log(2)] * 3)  # policy = reference


def test_ipo_loss_pulls_the_margin_to_its_target_from_both_sides():
    logprobs = torch.tensor(POLICY, requires_grad=True)
    loss, _ = preference_loss(logprobs, torch.tensor(REFERENCE), "ipo", beta=0.5)
    # (h − 1/(2β))² with 1/(2β) = 1: pair 1 sits on the target (0), pair 2 is 1.5 below it (2.25)
    assert loss.item() == pytest.approx((0.0 + 2.25) / 2, abs=1e-6)
    loss.backward()
    # dL/dh_i = 2 (h_i − 1) / 2: 0 and −1.5
    assert logprobs.grad.tolist() == pytest.approx([0.0, -1.5, 0.0, 1.5], abs=1e-6)
    # past the target IPO pushes back (DPO never does): chosen down, rejected up
    margins = torch.tensor([3.0], requires_grad=True)
    ipo_loss(margins, 0.5).sum().backward()
    assert margins.grad.item() == pytest.approx(2 * (3.0 - 1.0))
    assert ipo_loss(torch.tensor([1.0]), 0.5).item() == 0.0


def test_implicit_reward_accuracy_margin_and_drift():
    assert reward_accuracy(torch.tensor([1.0, -0.5, 0.0])) == pytest.approx(0.5)  # won, lost, a tie counts half
    _, stats = preference_loss(torch.tensor(POLICY), torch.tensor(REFERENCE), "dpo", beta=0.5)
    assert stats["reward_accuracy"] == pytest.approx(0.5)  # h = 1.0 wins, h = −0.5 loses
    assert stats["reward_margin"] == pytest.approx(0.5 * (1.0 - 0.5) / 2)  # β · mean h
    assert stats["chosen_drift"] == pytest.approx((0.5 + 0.0) / 2)  # mean log π/π_ref of the chosen
    assert stats["rejected_drift"] == pytest.approx((-0.5 + 0.5) / 2)


def test_pairs_from_rankings_scores_and_pairwise_records():
    ranked = parse_record({"prompt": "q1", "ranking": ["a", ["b", "c"], "d"]})  # b and c tied: no pair
    scored = parse_record({"input": "q2", "outputs": [{"response": "x", "score": 2}, {"response": "y", "score": 5},
                                                      {"response": "z", "score": 2}]})
    pairwise = parse_record({"prompt": "q3", "chosen": "good", "rejected": "bad"})
    every = {(p.prompt[0]["content"], p.chosen, p.rejected) for p in pairs_from_groups([ranked, scored, pairwise])}
    assert every == {("q1", "a", "b"), ("q1", "a", "c"), ("q1", "a", "d"), ("q1", "b", "d"), ("q1", "c", "d"),
                     ("q2", "y", "x"), ("q2", "y", "z"), ("q3", "good", "bad")}
    extremes = [(p.chosen, p.rejected) for p in pairs_from_groups([ranked, scored, pairwise], "best_worst")]
    assert extremes == [("a", "d"), ("y", "x"), ("good", "bad")]  # the first best against the first worst
    with pytest.raises(UserError, match="pairs='random'"):
        pairs_from_groups([ranked], "random")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, tokenizer path, model_args): a 600-piece tokenizer of world questions and answers."""
    folder = tmp_path_factory.mktemp("dpo")
    texts = [f"{p.question} {p.answer}" for p in World(0).qa_pairs(0)]
    tokenizer_path = train_tokenizer(texts, str(folder / "tok"), vocab_size=600)
    model_args = dataclasses.asdict(GPTConfig(vocab_size=600, block_size=48, n_layer=1, n_head=2, n_embd=32))
    return folder, tokenizer_path, model_args


def test_sequence_logprobs_match_a_plain_forward_and_ignore_padding(tiny):
    _, tokenizer_path, model_args = tiny
    tokenizer = Tokenizer(tokenizer_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args)).eval()
    pairs = [dataclasses.replace(p, source="t") for p in pairs_from_groups(
        [parse_record({"prompt": "Where does Ana live?", "chosen": "Ana lives in Bo.", "rejected": "No."}),
         parse_record({"prompt": "How old is the long-named Videl Guvar today?", "chosen": "40.",
                       "rejected": "Videl Guvar is forty years old."})])]
    encoded = encode_pairs(tokenizer, pairs, 48)
    with torch.no_grad():
        together = sequence_logprobs(model, pair_rollout(encoded, tokenizer.eos_id, tokenizer.pad_id))  # (4,)
        alone = torch.cat([sequence_logprobs(model, pair_rollout([pair], tokenizer.eos_id, tokenizer.pad_id))
                           for pair in encoded])  # (2 pairs x [chosen, rejected])
        # a plain forward pass of prompt + response, no padding; reserved ids other than eos banned as in sampling
        prompt, chosen = prompt_ids(tokenizer, pairs[0].prompt), encode_content(tokenizer, "Ana lives in Bo.")
        ids = torch.tensor([prompt + chosen + [tokenizer.eos_id]])
        logits = model(ids)[0][0, :-1]  # (T-1, V): position t predicts token t+1
        logits[:, [i for i in range(8) if i != tokenizer.eos_id]] = float("-inf")
        plain = F.log_softmax(logits, -1)[torch.arange(len(prompt) - 1, ids.size(1) - 1), ids[0, len(prompt):]].sum()
    assert together[0].item() == pytest.approx(plain.item(), abs=1e-4)
    assert torch.allclose(together, alone[[0, 2, 1, 3]], atol=1e-4)  # batch layout: chosen, chosen, rejected, rejected


def write_preferences(path, questions, seed):
    """A scores-format file: 3 replies per question with distinct scores (3 pairs each)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, question in enumerate(questions):
            replies = [f"The answer is {seed + i}.", "I do not know.", f"{question} {question}"]
            f.write(json.dumps({"input": question, "outputs": [{"response": r, "score": s} for r, s in
                                                               zip(replies, (4.5, 3.0, 1.5))]}) + "\n")


def test_training_pairs_must_not_ask_a_held_out_prompt(tmp_path):
    train, test = feedback_prompts(World(0), 4, 1337, "train"), feedback_prompts(World(0), 2, 1337, "test")
    write_preferences(tmp_path / "a.jsonl", test[:1] + train, 0)
    with pytest.raises(UserError, match="1 training prompts are held-out evaluation prompts"):
        load_preference_pairs(str(tmp_path / "a.jsonl"), "", 0.25, "all", test)
    write_preferences(tmp_path / "b.jsonl", train, 0)
    train_pairs, held_out_pairs = load_preference_pairs(str(tmp_path / "b.jsonl"), "", 0.25, "all", test)
    assert len(train_pairs) == 9 and len(held_out_pairs) == 3  # the last of 4 prompts held out, 3 pairs each
    assert {p.prompt[0]["content"] for p in held_out_pairs} == {train[3]}


def test_the_demo_reads_the_feedback_train_rm_wrote(tmp_path):
    with pytest.raises(MissingFileError, match="run python train_rm.py first"):
        preference_files("demo", "", str(tmp_path), "out-sft")
    for name in ("train.jsonl", "heldout.jsonl"):
        (tmp_path / name).write_text("")
    (tmp_path / "meta.json").write_text(json.dumps({"checkpoint": os.path.abspath("out-sft")}))
    assert preference_files("demo", "", str(tmp_path), "out-sft") == (str(tmp_path / "train.jsonl"),
                                                                      str(tmp_path / "heldout.jsonl"), None)
    assert "sampled from" in preference_files("demo", "", str(tmp_path), "other-sft")[2]  # another SFT model's replies
    assert preference_files("a.jsonl", "b.jsonl", str(tmp_path), "out-sft") == ("a.jsonl", "b.jsonl", None)


def test_bad_settings_are_one_line_errors():
    settings = dict(batch_size=2, gradient_accumulation_steps=1, eval_interval=1, log_interval=1, beta=0.1,
                    max_new_tokens=8, eval_batch_size=4, eval_samples=1, eval_prompts=2, validation_prompts=2,
                    eval_pairs=4, max_iters=1, block_size=0, learning_rate=1e-4, min_lr=0, warmup_iters=0,
                    weight_decay=0, grad_clip=1, val_fraction=0.1, loss="dpo", pairs="all", temperature=1.0)
    check_settings(settings)
    for key, value, message in (("loss", "kto", "loss='kto'"), ("beta", 0.0, "beta=0.0"),
                                ("pairs", "some", "pairs='some'"), ("temperature", 0.0, "temperature=0.0")):
        with pytest.raises(UserError, match=message):
            check_settings(dict(settings, **{key: value}))


@pytest.mark.slow
def test_train_dpo_writes_a_loadable_policy_and_resumes_exactly(tiny, tmp_path):
    folder, tokenizer_path, model_args = tiny
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "sft", GPT(GPTConfig(**model_args)), model_args, tokenizer_path, stage="sft")
    train_questions = feedback_prompts(World(0), 6, 1337, "train")
    write_checkpoint(tmp_path / "rm", RewardModel(GPT(GPTConfig(**model_args))), model_args, tokenizer_path,
                     stage="reward", loss="ranking", reward_bias=0.0,
                     trained_prompts=[[{"role": "user", "content": q}] for q in train_questions])
    write_preferences(tmp_path / "train.jsonl", train_questions, 0)
    write_preferences(tmp_path / "heldout.jsonl", feedback_prompts(World(0), 2, 1337, "validation"), 7)
    common = [f"--init_from={tmp_path / 'sft'}", f"--reward_model={tmp_path / 'rm'}", "--eval_interval=2",
              f"--dataset={tmp_path / 'train.jsonl'}", f"--eval_dataset={tmp_path / 'heldout.jsonl'}",
              "--batch_size=4", "--max_new_tokens=6", "--eval_prompts=2", "--validation_prompts=2", "--eval_samples=1",
              "--learning_rate=1e-3", "--warmup_iters=0", "--log_interval=1", "--device=cpu", "--dtype=float32"]
    result = run_script("train_dpo.py", common + [f"--out_dir={tmp_path / 'straight'}", "--max_iters=4"])
    assert "| eval_gold |" in result.stdout
    run_script("train_dpo.py", common + [f"--out_dir={tmp_path / 'split'}", "--max_iters=2"])
    run_script("train_dpo.py", common + [f"--out_dir={tmp_path / 'split'}", "--max_iters=4", "--init_from=resume"])
    loaded = load_model(str(tmp_path / "straight"))
    assert loaded.kind == "dpo" and isinstance(loaded.model, GPT) and loaded.tokenizer is not None
    records = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("straight", "split")]
    training = [[r for r in run if "phase" not in r] for run in records]
    assert [r["iter"] for r in training[0]] == [r["iter"] for r in training[1]] == [0, 1, 2, 3]
    assert training[0][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at the first step
    for a, b in zip(*training):
        for key in ("loss", "reward_accuracy", "reward_margin", "chosen_drift", "rejected_drift"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["iter"], key)
    evals = [r for r in records[0] if r.get("phase") == "eval"]
    assert [r["iter"] for r in evals] == [0, 2, 4] and evals[0]["eval_kl"] == 0.0
    assert evals[0]["heldout_reward_accuracy"] == 0.5 and evals[-1]["heldout_loss"] < evals[0]["heldout_loss"]
    straight = load_model(str(tmp_path / "straight")).model.state_dict()
    split = load_model(str(tmp_path / "split")).model.state_dict()
    assert all(torch.allclose(straight[name], split[name], atol=1e-6) for name in straight)
