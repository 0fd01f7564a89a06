"""Best-of-N: sample N replies from the SFT model, keep the one the reward model scores highest. No training at all,
and the baseline every RL method must beat at the same KL from the SFT model.

Teaches the analytic KL of best-of-N, KL(π_N ‖ π) = log N − (N − 1)/N (Stiennon et al. 2020, appendix; Gao et al.
2022, "Scaling laws for reward model overoptimization"; an upper bound that is exact when no two replies tie:
Beirami et al. 2024), and how to measure every N from one batch of samples: M replies per prompt, cut into M // N
disjoint blocks of N, each block one best-of-N draw (the first block is the best of the first N).
    python -m nanollm.best_of_n --out_dir=out-sft --reward_model=out-rm --n=1,2,4,8,16,32,64
"""
import filecmp
import json
import math
import os
import sys
import time

import torch

from nanollm.annotators import GoldAnnotator, ppo_prompt_sets
from nanollm.configurator import UserError
from nanollm.loader import load_model
from nanollm.ppo import check_held_out, decode_responses, encode_prompts, reward_scores, rollout
from nanollm.world import World


def best_of_n_kl(n):
    """KL(best-of-n ‖ π) in nats = log n − (n − 1)/n: 0 for n = 1, log 2 − 1/2 ≈ 0.193 for n = 2, ≈ log n − 1 for
    large n (Stiennon et al. 2020; Gao et al. 2022)."""
    return math.log(n) - (n - 1) / n


def best_in_blocks(scores, n):
    """scores (P, M) of M replies per prompt -> (P, M // n) the index (into M) of the highest score in each disjoint
    block of n consecutive replies; column 0 is the best of the first n. Ties go to the earlier reply."""
    prompts, samples = scores.shape
    if not 1 <= n <= samples:
        raise ValueError(f"n={n}: must be between 1 and the {samples} replies sampled per prompt")
    blocks = samples // n
    within = scores[:, :blocks * n].reshape(prompts, blocks, n).argmax(-1)  # (P, blocks) position in its block
    return within + torch.arange(blocks) * n  # (P, blocks) index into the M replies


def parse_sizes(text):
    """'1,2,4' (or '(1, 2, 4)', as a command line may turn it) -> [1, 2, 4], sorted; each an integer >= 1."""
    try:
        sizes = sorted({int(part) for part in str(text).strip("()[] ").split(",") if part.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise UserError(f"n={text!r}: expected comma-separated integers >= 1, e.g. '1,2,4,8'")
    return sizes


@torch.no_grad()
def sample_and_score(policy, reward_model, tokenizer, judge, questions, samples, max_new_tokens, temperature,
                     batch_size, seed):
    """`samples` replies per question by pure sampling (as PPO's rollouts and held-out evaluation: reserved ids
    banned), each scored by the reward model and judged by the gold annotator. Returns (P, M) tensors: reward-model
    scores, gold scores, lengths in tokens (eos included), and the (P, M) nested list of replies."""
    device = next(policy.parameters()).device
    encoded = encode_prompts(tokenizer, questions, policy.config.block_size - max_new_tokens)
    rows = [(p, j) for p in range(len(questions)) for j in range(samples)]  # prompt-major: prompt p's replies together
    generator = torch.Generator(device=device).manual_seed(seed)
    scores, golds, lengths, replies = [], [], [], []
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        generated = rollout(policy, [encoded[p] for p, _ in part], max_new_tokens, temperature, tokenizer.eos_id,
                            tokenizer.pad_id, generator)
        texts = decode_responses(tokenizer, generated)
        scores += reward_scores(reward_model, generated).tolist()
        golds += [judge.judge(questions[p], text).overall for (p, _), text in zip(part, texts)]
        lengths += generated.response_mask.sum(-1).tolist()
        replies += texts
    shape = (len(questions), samples)
    return (torch.tensor(scores).view(shape), torch.tensor(golds, dtype=torch.float).view(shape),
            torch.tensor(lengths, dtype=torch.float).view(shape),
            [replies[p * samples:(p + 1) * samples] for p in range(len(questions))])


def best_of_n_rows(scores, golds, lengths, sizes):
    """One row per n: the mean over prompts of the chosen replies' gold, reward-model score and length (each prompt's
    mean over its M // n blocks), the gold gain over n = 1 (each prompt's mean gold over all M replies: the SFT
    model's expected gold) paired per prompt, its standard error (std / √prompts), and the analytic KL."""
    baseline = golds.mean(1)  # (P,) n = 1
    rows = []
    for n in sizes:
        chosen = best_in_blocks(scores, n)  # (P, blocks)
        pick = lambda values: values.gather(1, chosen).mean(1)  # noqa: E731  (P,) mean over the blocks
        gold, gain = pick(golds), pick(golds) - baseline
        rows.append({"n": n, "blocks": chosen.size(1), "kl": best_of_n_kl(n), "gold": gold.mean().item(),
                     "gold_se": (gold.std() / len(gold) ** 0.5).item(), "gold_gain": gain.mean().item(),
                     "gold_gain_se": (gain.std() / len(gain) ** 0.5).item(), "score": pick(scores).mean().item(),
                     "response_length": pick(lengths).mean().item()})
    return rows


def markdown_table(rows):
    lines = ["| N | KL = log N − (N−1)/N | gold | gain over N = 1 (± SE) | reward-model score | length |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['kl']:.3f} | {r['gold']:.3f} | {r['gold_gain']:+.3f} ± {r['gold_gain_se']:.3f} | "
              f"{r['score']:+.3f} | {r['response_length']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    from nanollm.configurator import configure_command

    settings = dict(
        out_dir="out-sft",  # the model that samples: an SFT (or PPO/DPO) out_dir
        reward_model="out-rm",  # train_rm.py's out_dir: picks the best of each N
        n="1,2,4,8,16,32,64",  # the N to report; max(n) replies are sampled per prompt, once
        prompt_set="test",  # 'test' (reported, as train_ppo.py's eval_) | 'validation' (for choosing settings)
        prompts=160,  # held-out world questions
        prompt_seed=1337,  # the questions' order and wording, as train_ppo.py
        world_seed=0,  # the world the gold annotator checks facts against
        max_new_tokens=32,
        temperature=1.0,  # pure sampling, as PPO's rollouts
        batch_size=256,  # replies per generation batch
        seed=1337,
        device="cpu",
        report_dir="",  # also write best_of_n.json there ('' = print only)
    )
    words = configure_command("python -m nanollm.best_of_n", settings, sys.argv[1:] if argv is None else argv)
    if words:
        raise UserError(f"command line: unexpected argument '{words[0]}' (use --key=value)")
    s, sizes = settings, parse_sizes(settings["n"])
    if s["prompt_set"] not in ("test", "validation"):
        raise UserError(f"prompt_set={s['prompt_set']!r}: expected 'test' or 'validation'")
    t0, cpu0 = time.time(), time.process_time()
    judge = GoldAnnotator(World(s["world_seed"]))
    held_out, _ = ppo_prompt_sets(judge.world, s["prompt_seed"], s["prompts"] if s["prompt_set"] == "test" else 0,
                                  s["prompts"] if s["prompt_set"] == "validation" else 0, 0)
    questions = held_out["eval_" if s["prompt_set"] == "test" else "val_"]
    policy, tokenizer = load_model(s["out_dir"], s["device"], kinds=("sft", "ppo", "dpo", "grpo"))[:2]
    loaded = load_model(s["reward_model"], s["device"], kinds=("reward",))
    check_held_out({"eval_": questions, "val_": []}, s["reward_model"], loaded.checkpoint)
    if not filecmp.cmp(os.path.join(s["out_dir"], "tokenizer.model"), os.path.join(s["reward_model"], "tokenizer.model"),
                       shallow=False):
        raise UserError(f"{s['reward_model']}/tokenizer.model differs from {s['out_dir']}'s: the reward model must "
                        f"read the policy's tokens")
    scores, golds, lengths, replies = sample_and_score(policy, loaded.model, tokenizer, judge, questions, sizes[-1],
                                                       s["max_new_tokens"], s["temperature"], s["batch_size"],
                                                       s["seed"])
    rows = best_of_n_rows(scores, golds, lengths, sizes)
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    print(f"[nanollm] best-of-N on {len(questions)} {s['prompt_set']} prompts x {sizes[-1]} replies from "
          f"{s['out_dir']}, picked by {s['reward_model']}: {wall:.1f} s wall, {cpu:.1f} s CPU\n{markdown_table(rows)}")
    if s["report_dir"]:
        os.makedirs(s["report_dir"], exist_ok=True)
        path = os.path.join(s["report_dir"], "best_of_n.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:  # then renamed: a killed run leaves no half file
            json.dump({"settings": s, "rows": rows, "wall_s": wall, "cpu_s": cpu,
                       "example": {"question": questions[0], "replies": replies[0][:8],
                                   "scores": scores[0, :8].tolist(), "golds": golds[0, :8].tolist()}}, f, indent=1,
                      ensure_ascii=False)
        os.replace(path + ".tmp", path)
        print(f"[nanollm] wrote {path}")


if __name__ == "__main__":
    main()
