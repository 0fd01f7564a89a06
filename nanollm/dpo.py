"""Direct preference optimization: the policy learns from preference pairs directly, with no reward model and no
sampling during training; a frozen copy of the SFT model is the reference.

Teaches DPO (Rafailov et al. 2023): the KL-regularized reward maximizer is π* ∝ π_ref·exp(r/β), so r = β·log(π/π_ref)
up to a per-prompt constant, and the Bradley–Terry likelihood of the preferences becomes a loss on log-prob ratios;
and IPO (Azar et al. 2023), which regresses the same log-ratio margin onto a fixed target instead of pushing it to
infinity. Data: the reward model's preference files (nanollm/reward.py), every scored or ranked group made pairs.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanollm.configurator import MissingFileError, UserError, check_ranges
from nanollm.data import batch_seed, pad_sequences
from nanollm.ppo import Rollout, prompts_in, reserved_ids_except_eos, response_logits, response_logprobs, sequence_sum
from nanollm.records import read_json
from nanollm.reward import load_reward_data
from nanollm.tokenizer import encode_content, prompt_ids

LOSSES = ("dpo", "ipo")
PAIR_SELECTIONS = ("all", "best_worst")


# ----------------------------------------------------------------------------- the losses
def log_ratio_margins(logprobs, ref_logprobs):
    """Sequence log-probs (2B,) of B chosen responses followed by their B rejected ones, under the policy and the
    reference -> (B,) h = log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l), and the (B,) chosen and rejected log-ratios."""
    chosen_logratios, rejected_logratios = (logprobs - ref_logprobs).chunk(2)  # (B,) each
    return chosen_logratios - rejected_logratios, chosen_logratios, rejected_logratios


def dpo_loss(margins, beta):
    """(B,) per-pair DPO losses (Rafailov et al. 2023, eq. 7): −log σ(β·h). At h = 0 (policy = reference): log 2.
    d/dh = −β·σ(−β·h) < 0: the loss always pushes the margin up, less and less as the pair is won."""
    return -F.logsigmoid(beta * margins)


def ipo_loss(margins, beta):
    """(B,) per-pair IPO losses (Azar et al. 2023, eq. 17 with τ = β): (h − 1/(2β))². The margin is pulled to
    1/(2β) and no further, so a pair that is always won cannot drive the policy arbitrarily far from the reference."""
    return (margins - 1 / (2 * beta)) ** 2


def preference_loss(logprobs, ref_logprobs, loss, beta):
    """(mean loss, stats) of a batch of pairs laid out as in log_ratio_margins. Stats (floats): the implicit rewards
    r̂ = β·log π/π_ref (Rafailov et al. 2023, section 5): their accuracy (the chosen one higher; a tie counts half)
    and mean margin r̂_w − r̂_l, and the drift of the log-probs from the reference, chosen and rejected."""
    margins, chosen_logratios, rejected_logratios = log_ratio_margins(logprobs, ref_logprobs)
    if loss == "dpo":
        losses = dpo_loss(margins, beta)
    elif loss == "ipo":
        losses = ipo_loss(margins, beta)
    else:
        raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")
    with torch.no_grad():
        stats = {"reward_accuracy": reward_accuracy(margins), "reward_margin": (beta * margins).mean().item(),
                 "chosen_drift": chosen_logratios.mean().item(), "rejected_drift": rejected_logratios.mean().item()}
    return losses.mean(), stats


def reward_accuracy(margins):
    """The fraction of pairs whose implicit reward prefers the chosen response (h > 0), a tie (h = 0) counting 1/2."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()


# ----------------------------------------------------------------------------- pairs and their log-probs
@dataclass
class PreferencePair:
    prompt: list  # chat messages ending on a user turn
    chosen: str
    rejected: str
    source: str  # "file:line"


def pairs_from_groups(groups, selection="all"):
    """reward.py's prompt groups (pairs, rankings, scores) -> preference pairs. 'all': every pair of responses rated
    differently (a ranking or scored group of K gives up to K(K−1)/2; ties make none); 'best_worst': one pair per
    group, a best-rated response against a worst-rated one (the first of each, in file order)."""
    if selection not in PAIR_SELECTIONS:
        raise UserError(f"pairs={selection!r}: expected one of {PAIR_SELECTIONS}")
    pairs = []
    for group in groups:
        if not group.pairs:
            continue
        if selection == "all":
            chosen_rejected = group.pairs
        else:
            preference = group.preference
            chosen_rejected = [(preference.index(max(preference)), preference.index(min(preference)))]
        pairs += [PreferencePair(group.prompt, group.responses[i], group.responses[j], group.source)
                  for i, j in chosen_rejected]
    return pairs


def encode_pairs(tokenizer, pairs, block_size):
    """Pairs -> (prompt ids, chosen ids + eos, rejected ids + eos); a prompt too long for block_size loses its
    beginning (never the responses). A response that cannot fit beside one prompt token is an error."""
    encoded = []
    for pair in pairs:
        chosen, rejected = (encode_content(tokenizer, text) + [tokenizer.eos_id] for text in (pair.chosen, pair.rejected))
        room = block_size - max(len(chosen), len(rejected))
        if room < 1:
            raise UserError(f"{pair.source}: a response of {max(len(chosen), len(rejected))} tokens does not fit "
                            f"block_size={block_size}")
        encoded.append((prompt_ids(tokenizer, pair.prompt)[-room:], chosen, rejected))
    return encoded


def pair_rollout(encoded, eos_id, pad_id, device="cpu", block_size=None):
    """B encoded pairs -> a Rollout of 2B rows, the B chosen responses then the B rejected ones, each after its prompt
    (prompts left-padded, responses right-padded, as PPO lays out its rollouts), so that PPO's scoring functions give
    their log-probs. The ids the sampler bans are banned here too: every log-prob is of the distribution the policy
    samples from. Each pair fits block_size (encode_pairs); if the padded batch does not, the longest prompts lose
    their beginning (every prompt keeps at least its last token, <|assistant|>)."""
    prompts = [prompt for prompt, _, _ in encoded] * 2
    responses = [chosen for _, chosen, _ in encoded] + [rejected for _, _, rejected in encoded]
    prompt_tokens, prompt_mask = pad_sequences(prompts, pad_id, side="left")  # (2B, P)
    response_tokens, response_mask = pad_sequences(responses, pad_id, side="right")  # (2B, R)
    if block_size is not None and prompt_tokens.size(1) + response_tokens.size(1) > block_size:
        cut = prompt_tokens.size(1) + response_tokens.size(1) - block_size  # the longest prompts lose their beginning
        prompt_tokens, prompt_mask = prompt_tokens[:, cut:], prompt_mask[:, cut:]
    return Rollout(torch.cat([prompt_tokens, response_tokens], 1).to(device),
                   torch.cat([prompt_mask, response_mask], 1).to(device), response_mask.to(device),
                   torch.ones(len(responses), dtype=torch.bool, device=device), prompt_tokens.size(1),
                   reserved_ids_except_eos(eos_id))


def sequence_logprobs(model, rollout):
    """(2B,) log π(y | x) = Σ_t log π(y_t | x, y_<t) over each response's tokens, its eos included (temperature 1)."""
    return sequence_sum(response_logprobs(response_logits(model, rollout, 1.0), rollout), rollout.response_mask)


def get_pair_batch(encoded, batch_size, seed, step, micro_step, eos_id, pad_id, block_size, device="cpu"):
    """batch_size random pairs as a Rollout; a pure function of (seed, step, micro_step): DDP ranks and a resumed run
    read the same data."""
    generator = torch.Generator().manual_seed(batch_seed(seed, "dpo", step, micro_step))
    rows = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
    return pair_rollout([encoded[row] for row in rows], eos_id, pad_id, device, block_size)


class HeldOutPairs:
    """The loss, implicit-reward accuracy and margin, and chosen/rejected log-prob drift on held-out pairs (the
    reference's log-probs computed once: it is frozen)."""

    def __init__(self, encoded, reference, tokenizer, batch_size, block_size, ctx):
        self.encoded, self.tokenizer, self.batch_size, self.block_size, self.ctx = \
            encoded, tokenizer, batch_size, block_size, ctx
        self.ref_logprobs = self.logprobs(reference)  # list of (2b,) tensors, one per batch

    @torch.no_grad()
    def logprobs(self, model):
        was_training, device, batches = model.training, next(model.parameters()).device, []
        model.eval()
        for start in range(0, len(self.encoded), self.batch_size):
            rollout = pair_rollout(self.encoded[start:start + self.batch_size], self.tokenizer.eos_id,
                                   self.tokenizer.pad_id, device, self.block_size)
            with self.ctx:
                batches.append(sequence_logprobs(model, rollout).float())
        model.train(was_training)
        return batches

    def __call__(self, policy, loss, beta):
        """{'heldout_loss', 'heldout_reward_accuracy', 'heldout_reward_margin', 'heldout_chosen_drift',
        'heldout_rejected_drift'} over every held-out pair."""
        logprobs = self.logprobs(policy)
        chosen = torch.cat([batch.chunk(2)[0] for batch in logprobs])
        rejected = torch.cat([batch.chunk(2)[1] for batch in logprobs])
        ref_chosen = torch.cat([batch.chunk(2)[0] for batch in self.ref_logprobs])
        ref_rejected = torch.cat([batch.chunk(2)[1] for batch in self.ref_logprobs])
        value, stats = preference_loss(torch.cat([chosen, rejected]), torch.cat([ref_chosen, ref_rejected]), loss,
                                       beta)
        return {"heldout_loss": value.item(), **{f"heldout_{key}": number for key, number in stats.items()}}


# ----------------------------------------------------------------------------- train_dpo.py's set-up
def check_settings(settings):
    """train_dpo.py's settings, before any work: one line naming the first wrong one."""
    s = settings
    check_ranges(s, positive=("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval", "beta",
                              "max_new_tokens", "eval_batch_size", "eval_samples", "eval_prompts",
                              "validation_prompts", "eval_pairs"),
                 non_negative=("max_iters", "block_size", "learning_rate", "min_lr", "warmup_iters", "weight_decay",
                               "grad_clip"), fraction=("val_fraction",))
    if s["loss"] not in LOSSES:
        raise UserError(f"loss={s['loss']!r}: expected one of {LOSSES}")
    if s["pairs"] not in PAIR_SELECTIONS:
        raise UserError(f"pairs={s['pairs']!r}: expected one of {PAIR_SELECTIONS}")
    if s["temperature"] <= 0:
        raise UserError(f"temperature={s['temperature']}: the held-out evaluation samples, so it must be > 0")


def preference_files(dataset, eval_dataset, data_dir, sft_dir):
    """(training files, held-out files, a note or None). dataset='demo': the feedback that train_rm.py's demo wrote in
    data_dir ('' = data/rm_demo), with a note when it was sampled from another SFT model than sft_dir."""
    if dataset != "demo":
        return dataset, eval_dataset, None
    data_dir = data_dir or os.path.join("data", "rm_demo")
    train, held_out = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "heldout.jsonl")
    for path in (train, held_out):
        if not os.path.isfile(path):
            raise MissingFileError(f"{path} not found: dataset='demo' reads the feedback train_rm.py collects (run "
                                   f"python train_rm.py first, or set data_dir= to its data_dir)")
    note, meta_path = None, os.path.join(data_dir, "meta.json")
    if os.path.isfile(meta_path):
        sampled_from = read_json(meta_path).get("checkpoint")
        if sampled_from and os.path.abspath(sft_dir) != sampled_from:
            note = f"the feedback in {data_dir} was sampled from {sampled_from}, not from {os.path.abspath(sft_dir)}"
    return train, eval_dataset or held_out, note


def load_preference_pairs(dataset, eval_dataset, val_fraction, selection, held_out_prompts):
    """(training pairs, held-out pairs) from reward.py's files (without eval_dataset, the last val_fraction of the
    prompts is held out, every record of a prompt on one side). Held out means held out: no training pair may ask a
    prompt of held_out_prompts (the generation evaluation's test and validation questions)."""
    train_groups, eval_groups = load_reward_data(dataset, eval_dataset, val_fraction, "pairwise")
    seen = prompts_in(held_out_prompts, [group.prompt for group in train_groups])
    if seen:
        raise UserError(f"{dataset}: {len(seen)} training prompts are held-out evaluation prompts (e.g. {seen[0]!r}); "
                        f"drop them from the data")
    return pairs_from_groups(train_groups, selection), pairs_from_groups(eval_groups, selection)
