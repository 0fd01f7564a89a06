"""The reward model: a transformer read out by a scalar head at the last real token, trained on preferences.

Teaches RLHF's second step (Christiano et al. 2017; Stiennon et al. 2020; Ouyang et al. 2022, InstructGPT):
r(x, y) = w·h_last + b, h_last the final hidden state at the eos that closes prompt + response. Losses: MSE on
scores; Bradley–Terry −log σ(r_chosen − r_rejected − margin) (Bradley & Terry 1952; margin as in Llama 2, Touvron
et al. 2023); InstructGPT's ranking loss over all K-choose-2 pairs of a prompt, one forward pass per response.
Data: {"input", "outputs": [{"response", "score"}]}, {"prompt", "chosen", "rejected"}, {"prompt", "ranking": [...]},
and human feedback {"input", "outputs": [texts], "scores": {dimension: [1-5 each]}, "ranking": [1-based, best first]}.
"""
import filecmp
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollm.checkpoint import load_checkpoint
from nanollm.configurator import UserError, check_ranges
from nanollm.data import batch_seed, last_token_index, pad_sequences
from nanollm.metrics import pair_accuracy, pearson, preference_pairs, ranking_metrics
from nanollm.sft import language, list_sft_files, read_records
from nanollm.tokenizer import Tokenizer, encode_content, prompt_ids

FORMATS = ('scores: {"input", "outputs": [{"response", "score"}, ...]}', 'pairwise: {"prompt", "chosen", "rejected"}',
           'ranked: {"prompt", "ranking": [best, ..., worst]} (an item may be a list of tied responses)',
           'feedback: {"input", "outputs": [texts], "scores": {dimension: [a score per output]}, "ranking"?: [1-based '
           'output numbers, best first]}')
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


def freeze_unused_lm_head(backbone, used):
    """An untied LM head that no loss reads (a reward model or critic without the likelihood feature) is frozen: it
    would get no gradient, and DDP waits for every trainable parameter's. A tied head is the token embedding: kept."""
    head = getattr(backbone, "lm_head", None)
    if head is not None and not used and not backbone.config.tie_embeddings:
        head.weight.requires_grad_(False)


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
        freeze_unused_lm_head(backbone, used=self.likelihood)
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


def _number(value, where, field):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: {field} must be a finite number, got {value!r}")
    return float(value)


def _ranking_pairs(ranking, k, where):
    """A ranking of 1-based output numbers, best first ([1, 3, 2]: 1 > 3 > 2) -> its (better, worse) index pairs."""
    if not isinstance(ranking, list) or sorted(r for r in ranking if isinstance(r, int)) != list(range(1, k + 1)):
        raise UserError(f"{where}: field 'ranking' must list the output numbers 1..{k}, each once, best first; got "
                        f"{ranking!r}")
    return [(ranking[i] - 1, ranking[j] - 1) for i in range(k) for j in range(i + 1, k)]


def _feedback_group(record, where):
    """Human feedback (the labeling page's dimensions, the design document's examples): outputs as texts, 1-5 scores
    per dimension, a ranking. Preference = the mean of a reply's dimension scores; pairs from the ranking if given."""
    responses = [_string(output, where, f"outputs[{index}]") for index, output in enumerate(record["outputs"])]
    scores = record.get("scores")
    if not isinstance(scores, dict) or not scores:
        raise UserError(f"{where}: outputs given as texts need 'scores': {{dimension: [a score per output]}}")
    for name, values in scores.items():
        if not isinstance(values, list) or len(values) != len(responses):
            raise UserError(f"{where}: scores[{name!r}] must list {len(responses)} scores, one per output")
    preference = [sum(_number(values[i], where, f"scores[{name!r}][{i}]") for name, values in scores.items()) /
                  len(scores) for i in range(len(responses))]
    pairs, ties = _pairs_from_preference(preference)
    if "ranking" in record:
        pairs, ties = _ranking_pairs(record["ranking"], len(responses), where), 0
    return PromptGroup(_prompt(record["input"], where, "input"), responses, preference, pairs, True, where, ties)


def parse_record(record, where="<record>"):
    """One record of any reward-data format -> a PromptGroup; ValueError naming `where` for anything else. A scores
    record may carry a "ranking" (as the labeling page writes): its pairs then come from the ranking."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if {"input", "outputs"} <= keys and isinstance(record["outputs"], list) and record["outputs"] and \
            all(isinstance(output, str) for output in record["outputs"]):
        return _feedback_group(record, where)
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
        if "ranking" in record:
            pairs, ties = _ranking_pairs(record["ranking"], len(responses), where), 0
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


# ----------------------------------------------------------------------------- train_rm.py's set-up
def check_settings(settings):
    """train_rm.py's settings, before any work: one line naming the first wrong one."""
    check_ranges(settings, positive=("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval"),
                 non_negative=("max_iters", "block_size", "learning_rate", "min_lr", "warmup_iters", "weight_decay",
                               "grad_clip"), fraction=("dropout", "val_fraction"))
    if settings["loss"] not in LOSSES:
        raise UserError(f"loss={settings['loss']!r}: expected one of {LOSSES}")


@dataclass
class RewardStart:
    """Where train_rm.py starts: the SFT model's folder and tokenizer, the trunk ('gpt' = the SFT GPT, or a BERT)
    and its weights, and the run's own checkpoint when resuming."""
    source_dir: str  # the SFT out_dir (replies for the demo data come from it)
    tokenizer_path: str
    tokenizer: Tokenizer
    backbone: str  # 'gpt' | 'bert'
    trunk: dict  # the checkpoint whose weights and model_args make the trunk
    resumed: dict = None  # our own checkpoint, when resuming
    likelihood_weight: float = 0.0


def reward_start(init_from, out_dir, backbone, likelihood_weight, device):
    """Load and check what train_rm.py starts from: an SFT out_dir (trunk 'sft') or a BERT trunk on the same tokens,
    or the run in out_dir when resuming (its shape, whatever the settings say)."""
    if init_from == "resume":
        checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), device)
        tokenizer_path = os.path.join(out_dir, "tokenizer.model")
        return RewardStart(checkpoint["config"]["init_from"], tokenizer_path, Tokenizer(tokenizer_path),
                           checkpoint.get("backbone", "gpt"), checkpoint, checkpoint,
                           checkpoint.get("likelihood_weight", 0.0))
    checkpoint = load_checkpoint(os.path.join(init_from, "ckpt.pt"), device)
    if checkpoint.get("stage") == "reward":
        raise UserError(f"init_from={init_from!r} holds a reward model; start from an SFT out_dir or use 'resume'")
    tokenizer_path = os.path.join(init_from, "tokenizer.model")
    if backbone == "sft":
        return RewardStart(init_from, tokenizer_path, Tokenizer(tokenizer_path), "gpt", checkpoint,
                           likelihood_weight=likelihood_weight)
    trunk = load_checkpoint(os.path.join(backbone, "ckpt.pt"), device)
    if trunk["config"].get("model_type") != "bert":
        raise UserError(f"backbone={backbone!r}: expected 'sft' or a train_pretrain.py --model_type=bert out_dir, "
                        f"found model_type={trunk['config'].get('model_type', 'gpt')!r}")
    if not filecmp.cmp(os.path.join(backbone, "tokenizer.model"), tokenizer_path, shallow=False):
        raise UserError(f"backbone={backbone!r}: its tokenizer.model differs from {tokenizer_path}; pretrain the BERT "
                        f"on the same prepared data (--data_dir) as the SFT model's base")
    return RewardStart(init_from, tokenizer_path, Tokenizer(tokenizer_path), "bert", trunk,
                       likelihood_weight=likelihood_weight)


def load_reward_data(dataset, eval_dataset, val_fraction, loss):
    """(training groups, held-out groups), checked for the loss; without eval_dataset the last val_fraction of the
    dataset's prompts (file order, so the split never changes) is held out, all responses of a prompt together."""
    train_groups = load_groups(dataset)
    if eval_dataset:
        eval_groups = load_groups(eval_dataset)
    else:
        train_groups, eval_groups = split_by_prompt(train_groups, val_fraction)
    check_groups(train_groups, loss, "training data")
    check_groups(eval_groups, loss, "held-out data")
    return train_groups, eval_groups


def encode_training_groups(tokenizer, groups, block_size):
    """encode_groups, refusing a block_size that would cut most prompt + response pairs (they lose their beginning)."""
    encoded, truncated = encode_groups(tokenizer, groups, block_size)
    n_responses = sum(len(g.responses) for g in groups)
    if truncated * 2 > n_responses:
        raise UserError(f"block_size={block_size}: {truncated} of {n_responses} training prompt + response pairs do "
                        f"not fit; raise it (0 = the base model's)")
    return encoded, truncated


class HeldOutScores:
    """A reward model's held-out numbers: loss, agreement with the labels (pairwise accuracy, rank correlations) and,
    where a judge knows the prompts (the world's gold annotator), with the truth, split into fact pairs (replies that
    differ in factual accuracy) and form pairs; and the length bias: corr(reward, length) against the same for the
    labels and for the truth. judge: an object with question(prompt) and judge(prompt, reply).overall/.accuracy.
    The pairwise accuracy vs the labels is also given per language of the prompt (val_pair_acc_zh, _en)."""

    def __init__(self, groups, tokenizer, judge=None):
        self.groups = groups
        self.languages = [language(" ".join(m["content"] for m in g.prompt if m["role"] == "user")) for g in groups]
        self.judged = [g for g, group in enumerate(groups) if judge is not None and judge.question(group.prompt) is not None]
        self.judgements = [[judge.judge(groups[g].prompt, r) for r in groups[g].responses] for g in self.judged]
        self.gold = [[judgement.overall for judgement in group] for group in self.judgements]
        self.lengths = [[len(encode_content(tokenizer, r)) for r in group.responses] for group in groups]
        flat_lengths = [n for group in self.lengths for n in group]
        self.reference = {"val_label_length_corr": pearson([p for g in groups for p in g.preference], flat_lengths)}
        if self.judged and len(self.judged) == len(groups):
            self.reference["val_gold_length_corr"] = pearson([s for group in self.gold for s in group], flat_lengths)

    def evaluate(self, model, encoded, pad_id, batch_size, device, ctx, loss, margin=0.0):
        """Score every held-out response with the model (dropout off): (scores, rewards per group)."""
        rewards = score_encoded(model, encoded, pad_id, batch_size, device, ctx)
        return self(rewards, loss, margin), rewards

    def __call__(self, rewards, loss, margin=0.0):
        """rewards: per group, per response (score_encoded's output) -> the held-out scores."""
        flat = torch.tensor([r for group in rewards for r in group])
        scores = {"val_loss": dataset_loss(rewards, self.groups, loss, margin),
                  **ranking_metrics(rewards, [g.preference for g in self.groups], "val_")}
        for name in sorted(set(self.languages)):  # agreement with the labels per language of the prompt: _zh, _en
            rows = [g for g, group_language in enumerate(self.languages) if group_language == name]
            scores[f"val_pair_acc_{name}"] = pair_accuracy([rewards[g] for g in rows],
                                                           [self.groups[g].preference for g in rows])[0]
        if self.judged:
            judged_rewards = [rewards[g] for g in self.judged]
            scores.update(ranking_metrics(judged_rewards, self.gold, "val_gold_"))
            same_facts = lambda g, i, j: self.judgements[g][i].accuracy == self.judgements[g][j].accuracy  # noqa
            scores["val_gold_fact_pair_acc"] = pair_accuracy(judged_rewards, self.gold,
                                                             lambda g, i, j: not same_facts(g, i, j))[0]
            scores["val_gold_form_pair_acc"] = pair_accuracy(judged_rewards, self.gold, same_facts)[0]
        scores.update(reward_mean=flat.mean().item(), reward_std=flat.std().item(),
                      val_length_corr=pearson(flat.tolist(), [n for group in self.lengths for n in group]),
                      **self.reference)
        return scores

    @staticmethod
    def describe(scores):
        text = f"val loss {scores['val_loss']:.4f}, pair acc vs labelers {scores['val_pair_acc']:.1%}"
        if "val_gold_pair_acc" in scores:
            text += (f", vs gold {scores['val_gold_pair_acc']:.1%} (facts {scores['val_gold_fact_pair_acc']:.1%}, "
                     f"form {scores['val_gold_form_pair_acc']:.1%}; kendall {scores['val_gold_kendall']:+.3f})")
        text += (f"; corr with length: reward {scores['val_length_corr']:+.3f}, "
                 f"labels {scores['val_label_length_corr']:+.3f}")
        return text + (f", gold {scores['val_gold_length_corr']:+.3f}" if "val_gold_length_corr" in scores else "")

    def length_table(self, rewards):
        """The bias made visible: held-out responses in length quarters, with their mean reward, label and gold."""
        gold_of = dict(zip(self.judged, self.gold))
        rows = sorted((self.lengths[g][i], rewards[g][i], group.preference[i], gold_of[g][i] if g in gold_of else None)
                      for g, group in enumerate(self.groups) for i in range(len(group.responses)))
        mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
        lines = ["| response length (tokens) | responses | mean reward | mean label | mean gold |",
                 "|---|---|---|---|---|"]
        for quarter in range(4):
            part = rows[quarter * len(rows) // 4:(quarter + 1) * len(rows) // 4]
            if not part:  # fewer than 4 held-out responses
                continue
            golds = [row[3] for row in part if row[3] is not None]
            lines.append(f"| {part[0][0]}-{part[-1][0]} | {len(part)} | {mean([r[1] for r in part]):+.3f} | "
                         f"{mean([r[2] for r in part]):.3f} | {mean(golds):.3f} |")
        return "\n".join(lines)
