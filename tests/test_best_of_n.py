"""Best-of-N: the analytic KL against hand values, the best of each block of N (the first block: the best of the
first N), the table's numbers on a hand-made example, and the command on a tiny model."""
import dataclasses
import json
import math

import pytest
import torch

from nanollm.annotators import feedback_prompts
from nanollm.best_of_n import best_in_blocks, best_of_n_kl, best_of_n_rows, main, parse_sizes
from nanollm.configurator import UserError
from nanollm.model import GPT, GPTConfig
from nanollm.reward import RewardModel
from nanollm.tokenizer import train_tokenizer
from nanollm.world import World
from test_train_ppo import write_checkpoint


def test_kl_formula_against_hand_values():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert best_of_n_kl(4) == pytest.approx(1.3862944 - 0.75, abs=1e-6)
    assert best_of_n_kl(64) == pytest.approx(4.1588831 - 63 / 64, abs=1e-6)


def test_best_in_blocks_takes_the_best_of_each_block_of_n():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.5, 0.2, 0.8, 0.7, 0.4],
                           [0.6, 0.1, 0.2, 0.3, 0.9, 0.0, 0.0, 0.5]])
    assert best_in_blocks(scores, 1).tolist() == [list(range(8))] * 2
    assert best_in_blocks(scores, 2).tolist() == [[1, 3, 5, 6], [0, 3, 4, 7]]
    assert best_in_blocks(scores, 4).tolist() == [[1, 5], [0, 4]]
    assert best_in_blocks(scores, 8).tolist() == [[1], [4]]  # the best of the first 8
    assert best_in_blocks(scores, 3).tolist() == [[1, 5], [0, 4]]  # 2 whole blocks of 3; replies 6, 7 unused
    assert best_in_blocks(torch.tensor([[0.5, 0.5]]), 2).tolist() == [[0]]  # a tie goes to the earlier reply
    with pytest.raises(ValueError, match="n=9"):
        best_in_blocks(scores, 9)


def test_rows_on_a_hand_example():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])  # prompt 0: later is better; 1: earlier
    golds = torch.tensor([[1.0, 2.0, 3.0, 5.0], [4.0, 4.0, 2.0, 2.0]])
    lengths = torch.tensor([[4.0, 6.0, 8.0, 10.0], [5.0, 5.0, 5.0, 5.0]])
    one, two, four = best_of_n_rows(scores, golds, lengths, [1, 2, 4])
    # N = 1: each prompt's mean gold (2.75, 3.0), gain 0
    assert one["gold"] == pytest.approx((2.75 + 3.0) / 2) and one["gold_gain"] == 0.0 and one["kl"] == 0.0
    # N = 2: prompt 0 picks replies 1 and 3 (gold 2, 5: mean 3.5), prompt 1 picks 0 and 2 (4, 2: mean 3.0)
    assert two["gold"] == pytest.approx((3.5 + 3.0) / 2) and two["blocks"] == 2
    gains = torch.tensor([3.5 - 2.75, 3.0 - 3.0])
    assert two["gold_gain"] == pytest.approx(gains.mean().item())
    assert two["gold_gain_se"] == pytest.approx((gains.std() / math.sqrt(2)).item())
    assert two["score"] == pytest.approx(((1.0 + 3.0) / 2 + (3.0 + 1.0) / 2) / 2) and two["response_length"] == pytest.approx((8 + 5) / 2)
    # N = 4: replies 3 and 0 (gold 5 and 4)
    assert four["gold"] == pytest.approx(4.5) and four["kl"] == pytest.approx(math.log(4) - 0.75)


def test_sizes_parse_from_the_command_line():
    assert parse_sizes("4,1,2") == [1, 2, 4] and parse_sizes("(1, 2, 64)") == [1, 2, 64]
    for bad in ("0,2", "two", ""):
        with pytest.raises(UserError, match="n="):
            parse_sizes(bad)


def test_command_samples_once_and_reports_every_n(tmp_path, capsys):
    texts = [f"{p.question} {p.answer}" for p in World(0).qa_pairs(0)]
    tokenizer_path = train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=600)
    model_args = dataclasses.asdict(GPTConfig(vocab_size=600, block_size=48, n_layer=1, n_head=2, n_embd=32))
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "sft", GPT(GPTConfig(**model_args)), model_args, tokenizer_path, stage="sft")
    trained = [[{"role": "user", "content": q}] for q in feedback_prompts(World(0), 4, 1337, "train")]
    write_checkpoint(tmp_path / "rm", RewardModel(GPT(GPTConfig(**model_args))), model_args, tokenizer_path,
                     stage="reward", loss="ranking", reward_bias=0.0, trained_prompts=trained)
    main([f"--out_dir={tmp_path / 'sft'}", f"--reward_model={tmp_path / 'rm'}", "--prompts=3", "--n=1,2,4,8",
          "--max_new_tokens=6", f"--report_dir={tmp_path / 'report'}"])
    assert "| 8 | 1.204 |" in capsys.readouterr().out
    rows = json.load(open(tmp_path / "report" / "best_of_n.json"))["rows"]
    assert [row["n"] for row in rows] == [1, 2, 4, 8] and [row["blocks"] for row in rows] == [8, 4, 2, 1]
    # a block of 2n holds two blocks of n: its best scores at least their mean, so the score never falls with n
    assert all(a["score"] <= b["score"] + 1e-6 for a, b in zip(rows, rows[1:]))
    assert rows[0]["gold_gain"] == pytest.approx(0.0, abs=1e-6) and 1.0 <= rows[-1]["gold"] <= 5.0
    seen = [[{"role": "user", "content": feedback_prompts(World(0), 1, 1337, "test")[0]}]]
    write_checkpoint(tmp_path / "rm2", RewardModel(GPT(GPTConfig(**model_args))), model_args, tokenizer_path,
                     stage="reward", trained_prompts=seen)
    with pytest.raises(UserError, match="trained on 1 of"):  # the reward model saw a test prompt: refused
        main([f"--out_dir={tmp_path / 'sft'}", f"--reward_model={tmp_path / 'rm2'}", "--prompts=3", "--n=1,2"])
