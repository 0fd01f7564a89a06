"""The reward model: a transformer read out by a scalar head at the last real token, trained on preferences.

Teaches RLHF's second step (Christiano et al. 2017; Stiennon et al. 2020; Ouyang et al. 2022, InstructGPT):
r(x, y) = w·h_last + b, h_last the final hidden state at the eos that closes prompt + response. Losses: MSE on
scores; Bradley–Terry −log σ(r_chosen − r_rejected − margin) (Bradley & Terry 1952; margin as in Llama 2, Touvron
et al. 2023); InstructGPT's ranking loss over all K-choose-2 pairs of a prompt, one forward pass per response.
Data: {"input", "outputs": [{"response", "score"}]}, {"prompt", "chosen", "rejected"}, {"prompt", "ranking": [...]}.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollm.configurator import UserError
from nanollm.data import batch_seed, last_token_index, pad_sequences
from nanollm.metrics import preference_pairs
from nanollm.metrics import pair_accuracy, pearson, ranking_metrics  # noqa: F401  (old import path, for now)
from nanollm.sft import list_sft_files, read_records
from nanollm.tokenizer import Tokenizer, encode_content, prompt_ids

FORMATS = ('scores: {"input", "outputs": [{"response", "score"}, ...]}', 'pairwise: {"prompt", "chosen", "rejected"}',
           'ranked: {"prompt", "ranking": [best, ..., worst]} (an item may be a list of tied responses)')
LOSSES = ("mse", "pairwise", "ranking")


# ----------------------------------------------------------------------------- the model
def response_logprob_running_mean(lm, hidden, idx, attention_mask):
    """(B, T): at position t, the mean over the response tokens at positions ≤ t of log p(token | everything before
    it) under lm's head (0 before the response starts). Response = the real tokens after the last <|assistant|>
    token, eos included. Read at the last real token, it is the whole response's mean (response_logprob_mean)."""
    logprobs = F.log_softmax(lm.lm_head(hidden[:, :-1]).float(), dim=-1)  # (B, T-1, V): position t predicts t+1
    token_logprobs = torch.gather(logprobs, -1, idx[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    is_assistant = (idx == Tokenizer.assistant_id).long()  # the response starts right after it
    after_assistant = is_assistant.flip(-1).cumsum(-1).flip(-1) == 0  # no <|assistant|> at or after this position
    in_response = (after_assistant & attention_mask.bool())[:, 1:].float()  # (B, T-1) the predicted token's mask
    sums = F.pad((token_logprobs * in_response).cumsum(-1), (1, 0))  # (B, T) Σ over response tokens at ≤ t
    counts = F.pad(in_response.cumsum(-1), (1, 0))  # (B, T)
    return sums / counts.clamp(min=1)


def response_logprob_mean(lm, hidden, idx, attention_mask):
    """(B,) mean over response tokens of log p(token | everything before it) under lm's head: the length-normalized
    likelihood that SimPO uses as its reward (Meng et al. 2024)."""
    running = response_logprob_running_mean(lm, hidden, idx, attention_mask)  # (B, T)
    return running[torch.arange(idx.size(0), device=idx.device), last_token_index(attention_mask)]


class RewardModel(nn.Module):
    """A GPT (or BERT) backbone, its LM head unused, + Linear(n_embd, 1) read at the last real token."""

    def __init__(self, backbone, likelihood_weight=0.0):
        super().__init__()
        self.backbone = backbone
        n_embd = backbone.config.n_embd
        self.head = nn.Linear(n_embd, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(n_embd + 1))  # as Stiennon et al. 2020
        nn.init.zeros_(self.head.bias)
        self.likelihood = likelihood_weight != 0
        if self.likelihood:  # r += w · mean log p(response | prompt) under the trunk's own LM head; w learned
            from nanollm.model import GPT
            if not isinstance(backbone, GPT):
                raise ValueError("the likelihood feature needs a causal trunk with an LM head (backbone 'sft')")
            self.likelihood_weight = nn.Parameter(torch.full((), float(likelihood_weight)))
        # fitted after training so the mean reward on the SFT model's responses is 0; saved in the state dict
        self.register_buffer("reward_bias", torch.zeros(()))

    def hidden_states(self, idx, attention_mask):
        """(B, T) ids and mask -> (B, T, C) final hidden states of the GPT backbone (positions from the mask)."""
        return self.backbone.hidden_states(idx, attention_mask)

    def forward(self, idx, attention_mask):
        """(B,) rewards, read at each row's last real token (the eos that ends the response)."""
        hidden = self.hidden_states(idx, attention_mask)  # (B, T, C)
        last = last_token_index(attention_mask)  # (B,)
        hidden_last = hidden[torch.arange(idx.size(0), device=idx.device), last]  # (B, C)
        rewards = self.head(hidden_last).squeeze(-1).float() + self.reward_bias  # r = w·h_last + b + fitted bias
        if self.likelihood:
            rewards = rewards + self.likelihood_weight * response_logprob_mean(self.backbone, hidden, idx,
                                                                               attention_mask)
        return rewards

    @torch.no_grad()
    def score(self, idx, attention_mask):
        """Rewards with dropout off (eval mode), no gradient; the previous mode is restored."""
        was_training = self.training
        self.eval()
        rewards = self(idx, attention_mask)
        self.train(was_training)
        return rewards


BACKBONES = ("gpt", "bert")


def build_backbone(kind, model_args):
    """The reward model's trunk: 'gpt' (causal, e.g. the SFT model) or 'bert' (bidirectional encoder, bert.py).
    BERT's masked-LM head gets no gradient from a reward loss, so it is frozen (DDP would wait for its gradients)."""
    from nanollm.bert import BERT, BertConfig
    from nanollm.model import GPT, GPTConfig

    if kind == "gpt":
        return GPT(GPTConfig(**model_args))
    if kind == "bert":
        backbone = BERT(BertConfig(**dict(model_args, n_classes=0)))
        for module in (backbone.mlm_dense, backbone.mlm_ln):
            module.requires_grad_(False)
        if backbone.lm_head.bias is not None:
            backbone.lm_head.bias.requires_grad_(False)
        return backbone
    raise UserError(f"backbone={kind!r}: expected one of {BACKBONES}")


# ----------------------------------------------------------------------------- losses
def mse_loss(rewards, scores):
    """mean (r − s)²: regression on the labelers' scores."""
    return F.mse_loss(rewards, scores)


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=0.0):
    """mean −log σ(r_chosen − r_rejected − margin); ln 2 when the rewards are equal and margin is 0."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()


def ranking_loss(rewards, better, worse, group):
    """InstructGPT: per prompt, the mean of −log σ(r_better − r_worse) over its pairs; then the mean over prompts.
    rewards (N,) of every response in the batch; better, worse, group (P,): the pairs and the prompt each is from."""
    pair_losses = -F.logsigmoid(rewards[better] - rewards[worse])  # (P,)
    counts = torch.bincount(group)  # (G,) pairs per prompt
    per_group = torch.zeros(len(counts), device=rewards.device).index_add(0, group, pair_losses)  # (G,) Σ per prompt
    return (per_group[counts > 0] / counts[counts > 0]).mean()  # mean over prompts of the mean over their pairs


# ----------------------------------------------------------------------------- data
@dataclass
class PromptGroup:
    """One prompt with its responses and what the labelers said about them."""
    prompt: list  # chat messages ending on a user turn
    responses: list  # strings
    preference: list  # per response, higher is better: the score, or −place in a ranking, or 1/0 for a pair
    pairs: list  # (better, worse) response indices; never from equal preference (ties make no pair)
    has_scores: bool  # True for the scores format (MSE can train on it)
    source: str  # "file:line"
    ties: int = 0  # pairs skipped because the two responses were rated equal


def _string(value, where, field):
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _prompt(value, where, field):
    """A prompt is text (one user turn) or chat messages [{role, content}, ...] ending on a user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                           for m in value):
        raise UserError(f"{where}: field '{field}' must be a string or a list of {{role, content}} messages")
    if value[-1]["role"] != "user":
        raise UserError(f"{where}: field '{field}': the last message must be from the user, not {value[-1]['role']!r}")
    return [{"role": m["role"], "content": _string(m["content"], where, f"{field}.content")} for m in value]


def _pairs_from_preference(preference):
    """All (i, j) with preference[i] > preference[j], and how many pairs were skipped as ties."""
    k = len(preference)
    ties = sum(1 for i in range(k) for j in range(i + 1, k) if preference[i] == preference[j])
    return preference_pairs(preference), ties


def parse_record(record, where="<record>"):
    """One record of any reward-data format -> a PromptGroup; ValueError naming `where` for anything else."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if {"input", "outputs"} <= keys:
        outputs = record["outputs"]
        if not isinstance(outputs, list) or not outputs:
            raise UserError(f"{where}: field 'outputs' must be a non-empty list of {{response, score}}")
        responses, scores = [], []
        for index, output in enumerate(outputs):
            if not isinstance(output, dict) or not {"response", "score"} <= set(output):
                seen = sorted(output) if isinstance(output, dict) else type(output).__name__
                raise UserError(f"{where}: outputs[{index}] must have 'response' and 'score', saw {seen}")
            score = output["score"]
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise UserError(f"{where}: outputs[{index}].score must be a finite number, got {score!r}")
            responses.append(_string(output["response"], where, f"outputs[{index}].response"))
            scores.append(float(score))
        pairs, ties = _pairs_from_preference(scores)
        return PromptGroup(_prompt(record["input"], where, "input"), responses, scores, pairs, True, where, ties)
    if {"prompt", "chosen", "rejected"} <= keys:
        chosen, rejected = _string(record["chosen"], where, "chosen"), _string(record["rejected"], where, "rejected")
        if chosen == rejected:
            raise UserError(f"{where}: 'chosen' and 'rejected' are the same text: a tie is not a preference")
        return PromptGroup(_prompt(record["prompt"], where, "prompt"), [chosen, rejected], [1.0, 0.0], [(0, 1)],
                           False, where)
    if {"prompt", "ranking"} <= keys:
        ranking = record["ranking"]
        if not isinstance(ranking, list) or len(ranking) < 2:
            raise UserError(f"{where}: field 'ranking' must list at least 2 places, best first")
        responses, preference = [], []
        for place, item in enumerate(ranking):
            tied = item if isinstance(item, list) else [item]  # a list at one place = responses rated equal
            if not tied:
                raise UserError(f"{where}: ranking[{place}] is an empty list")
            responses += [_string(text, where, f"ranking[{place}]") for text in tied]
            preference += [-float(place)] * len(tied)
        pairs, ties = _pairs_from_preference(preference)
        return PromptGroup(_prompt(record["prompt"], where, "prompt"), responses, preference, pairs, False, where, ties)
    raise UserError(f"{where}: record matches no reward-data format; keys seen: {sorted(keys)}; "
                     f"expected one of: {'; '.join(FORMATS)}")


def load_groups(dataset):
    """Every record of every file ('a.jsonl,folder/'), parsed; all files are checked before training starts."""
    return [parse_record(record, where) for path in list_sft_files(dataset) for record, where in read_records(path)]


def prompt_key(prompt):
    """A prompt (text, or chat messages) as a hashable key: the same conversation gives the same key."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tuple((message["role"], message["content"]) for message in messages)


def split_by_prompt(groups, fraction):
    """(train, held-out): every record of the last `fraction` of the distinct prompts (in file order) is held out, so
    no prompt is on both sides (a pairwise file has one record per pair, and pairs of one prompt are alike)."""
    prompts = list(dict.fromkeys(prompt_key(group.prompt) for group in groups))
    held_out = set(prompts[len(prompts) - max(1, round(len(prompts) * fraction)):])
    return ([group for group in groups if prompt_key(group.prompt) not in held_out],
            [group for group in groups if prompt_key(group.prompt) in held_out])


def check_groups(groups, loss, what="dataset"):
    """Raise early if the data cannot train `loss`: MSE needs scores; the others need at least one pair."""
    if loss not in LOSSES:
        raise UserError(f"loss={loss!r}: expected one of {LOSSES}")
    if not groups:
        raise UserError(f"{what}: no records")
    if loss == "mse":
        unscored = [g.source for g in groups if not g.has_scores]
        if unscored:
            raise UserError(f"{unscored[0]}: loss='mse' needs the scores format ({FORMATS[0]})")
    elif not any(g.pairs for g in groups):
        raise UserError(f"{what}: no pair with different scores, so nothing for loss={loss!r} to learn")


def encode_response(tokenizer, prompt, response, block_size):
    """prompt + response in the chat template, closed by eos (where the reward is read); an overlong sequence loses
    its beginning, never its eos. Returns (ids, truncated)."""
    ids = prompt_ids(tokenizer, prompt) + encode_content(tokenizer, response) + [tokenizer.eos_id]
    return ids[-block_size:], len(ids) > block_size


def encode_groups(tokenizer, groups, block_size):
    """Per group, per response: token ids. Returns (list of lists of ids, number truncated)."""
    encoded, truncated = [], 0
    for group in groups:
        rows = [encode_response(tokenizer, group.prompt, response, block_size) for response in group.responses]
        encoded.append([ids for ids, _ in rows])
        truncated += sum(cut for _, cut in rows)
    return encoded, truncated


@dataclass
class RewardBatch:
    input_ids: torch.Tensor  # (N, T) every response forwarded once
    attention_mask: torch.Tensor  # (N, T)
    better: torch.Tensor  # (P,) row of the better response of each pair
    worse: torch.Tensor  # (P,)
    group: torch.Tensor  # (P,) which prompt of the batch each pair is from
    scores: torch.Tensor  # (N,) labeler scores (MSE); zeros when the data has none

    def to(self, device):
        return RewardBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.better, self.worse,
                                                    self.group, self.scores)))


def make_batch(groups, encoded, items, loss, pad_id):
    """items: for 'ranking' group indices (all responses and pairs of each); for 'pairwise' (group, pair) indices
    (chosen and rejected); for 'mse' (group, response) indices."""
    sequences, scores, better, worse, pair_group = [], [], [], [], []
    for slot, item in enumerate(items):
        if loss == "ranking":
            g = item
            offset = len(sequences)
            sequences += encoded[g]
            scores += groups[g].preference
            better += [offset + i for i, _ in groups[g].pairs]
            worse += [offset + j for _, j in groups[g].pairs]
            pair_group += [slot] * len(groups[g].pairs)
        elif loss == "pairwise":
            g, p = item
            i, j = groups[g].pairs[p]
            better.append(len(sequences))  # the chosen response goes first, the rejected one right after
            worse.append(len(sequences) + 1)
            pair_group.append(slot)
            sequences += [encoded[g][i], encoded[g][j]]
            scores += [groups[g].preference[i], groups[g].preference[j]]
        else:
            g, r = item
            sequences.append(encoded[g][r])
            scores.append(groups[g].preference[r])
    input_ids, attention_mask = pad_sequences(sequences, pad_id)
    long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return RewardBatch(input_ids, attention_mask, long(better), long(worse), long(pair_group),
                       torch.tensor(scores, dtype=torch.float))


def training_items(groups, loss):
    """What one batch element is: a prompt with pairs (ranking), one pair (pairwise), one scored response (mse)."""
    if loss == "ranking":
        return [g for g, group in enumerate(groups) if group.pairs]
    if loss == "pairwise":
        return [(g, p) for g, group in enumerate(groups) for p in range(len(group.pairs))]
    return [(g, r) for g, group in enumerate(groups) for r in range(len(group.responses))]


def get_reward_batch(groups, encoded, items, loss, batch_size, pad_id, seed, step, micro_step, device="cpu"):
    """batch_size random items; a pure function of (seed, step, micro_step), so DDP and resume read the same data."""
    generator = torch.Generator().manual_seed(batch_seed(seed, "reward", step, micro_step))
    chosen = torch.randint(len(items), (batch_size,), generator=generator).tolist()
    return make_batch(groups, encoded, [items[i] for i in chosen], loss, pad_id).to(device)


def batch_loss(rewards, batch, loss, margin=0.0):
    """The selected loss on one batch's rewards (N,)."""
    if loss == "mse":
        return mse_loss(rewards, batch.scores)
    if loss == "pairwise":
        return bradley_terry_loss(rewards[batch.better], rewards[batch.worse], margin)
    return ranking_loss(rewards, batch.better, batch.worse, batch.group)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def score_encoded(model, encoded, pad_id, batch_size, device, ctx):
    """Rewards (dropout off) for lists of ids per group -> lists of floats per group."""
    flat = [ids for group in encoded for ids in group]
    rewards = []
    for start in range(0, len(flat), batch_size):
        input_ids, attention_mask = pad_sequences(flat[start:start + batch_size], pad_id)
        with ctx:
            rewards += model.score(input_ids.to(device), attention_mask.to(device)).tolist()
    out, start = [], 0
    for group in encoded:
        out.append(rewards[start:start + len(group)])
        start += len(group)
    return out


def fit_reward_bias(model, encoded, pad_id, batch_size, device, ctx):
    """Set model.reward_bias so the mean reward over `encoded` (the SFT model's responses) is 0; returns it."""
    model.reward_bias.zero_()
    rewards = [r for group in score_encoded(model, encoded, pad_id, batch_size, device, ctx) for r in group]
    model.reward_bias.fill_(-sum(rewards) / len(rewards))  # r' = r − mean(r)
    return float(model.reward_bias)


def dataset_loss(rewards, groups, loss, margin=0.0):
    """The training loss over a whole evaluation set, from per-group reward lists (each group one ranking example;
    for 'pairwise' every pair one example; for 'mse' every scored response)."""
    flat = torch.tensor([r for group in rewards for r in group])  # (N,)
    offsets = torch.tensor([0] + [len(group) for group in rewards]).cumsum(0).tolist()
    if loss == "mse":
        return mse_loss(flat, torch.tensor([p for g in groups for p in g.preference])).item()
    better, worse, group_index = [], [], []
    for g, group in enumerate(groups):
        better += [offsets[g] + i for i, _ in group.pairs]
        worse += [offsets[g] + j for _, j in group.pairs]
        group_index += [g] * len(group.pairs)
    better, worse = torch.tensor(better), torch.tensor(worse)
    if loss == "pairwise":
        return bradley_terry_loss(flat[better], flat[worse], margin).item()
    return ranking_loss(flat, better, worse, torch.tensor(group_index)).item()
