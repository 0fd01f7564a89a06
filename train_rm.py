"""Train a reward model: the SFT model plus a scalar head, on preferences written by simulated labelers.

After SFT (python train_sft.py writes out-sft/), one process (CPU, one GPU, or Apple MPS):
    python train_rm.py                       # demo: sample 4 replies to 800 world questions from out-sft, label, train
    python train_rm.py --loss=pairwise --margin=0.5 --dataset=prefs.jsonl --eval_dataset=heldout.jsonl
    python train_rm.py --length_bias=0.0     # labelers without the length bias: compare val_length_corr
N processes with DDP (one per GPU; gloo on CPU):
    torchrun --standalone --nproc_per_node=4 train_rm.py
Resume after a crash or Ctrl-C:
    python train_rm.py --init_from=resume
Collect preference data by hand: python -m nanollm.annotators collect --checkpoint=out-sft --out=data/rm_demo
Settings below are plain variables; override them with a config file and/or --key=value.
"""
import filecmp
import json
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nanollm import distributed as dist_utils
from nanollm.annotators import GoldAnnotator, collect_feedback, parse_temperatures
from nanollm.checkpoint import (check_out_dir, load_checkpoint, restore_training_state, save_checkpoint, start_run,
                                unwrap)
from nanollm.configurator import UserError, check_ranges, configure
from nanollm.metrics import pair_accuracy, pearson, ranking_metrics
from nanollm.optim import configure_optimizer, get_lr
from nanollm.reward import (RewardModel, batch_loss, build_backbone, check_groups, dataset_loss, encode_groups,
                            fit_reward_bias, get_reward_batch, load_groups, prompt_key, score_encoded,
                            split_by_prompt, training_items)
from nanollm.tokenizer import Tokenizer, encode_content
from nanollm.training import GracefulStop, GuardedStep
from nanollm.world import World

# ------------------------------------------------------------------------------------------ settings
# I/O
out_dir = "out-rm"  # checkpoints, metrics.jsonl and a copy of the tokenizer go here
init_from = "out-sft"  # an SFT (or pretraining) out_dir with ckpt.pt + tokenizer.model | 'resume' (out_dir/ckpt.pt)
overwrite = False  # True: a fresh run may replace the run already in out_dir (else it refuses)
eval_interval = 50  # held-out loss, pairwise accuracy and correlations (and checkpoint) every this many iterations
log_interval = 10  # write a metrics.jsonl line every this many iterations
tensorboard = False  # also write every metrics.jsonl number as TensorBoard scalars in out_dir/tensorboard/
eval_only = False  # evaluate the starting model once and exit
always_save_checkpoint = True  # checkpoint at every eval; False: only when the held-out loss improves, and the run
# ends with the best model (lowest held-out loss), not the last
# data
dataset = "demo"  # 'demo' (sampled from init_from, judged by nanollm/annotators.py) or .json/.jsonl files/folders
eval_dataset = ""  # held-out files; '' = the demo's held-out prompts, or the last val_fraction of a custom dataset
data_dir = ""  # where the demo files are written; '' = data/rm_demo
val_fraction = 0.1  # of a custom dataset's distinct prompts, held out (with all their records) when eval_dataset=''
world_seed = 0  # the world the gold annotator checks facts against (pretraining uses World(0))
# the demo's feedback collection (K replies per prompt, pure sampling) and its labelers
demo_prompts = 800  # distinct world questions
demo_k = 8  # replies sampled per question (InstructGPT showed labelers 4 to 9)
demo_temperatures = "0.7,1.0,1.3,1.6"  # pure sampling; reply j of each prompt at the j-th temperature (cycled)
demo_max_new_tokens = 32
demo_heldout_fraction = 0.2  # of the prompts, held out for evaluation
labelers = 3  # simulated labelers; each prompt is rated by one of them
labeler_noise = 0.2  # std of their rating noise (points on the 1-5 scale; 0.1-0.3 across the team)
length_bias = 0.1  # their extra points per 10 words of reply (0 = unbiased)
# loss
loss = "ranking"  # 'ranking' (InstructGPT: all K-choose-2 pairs of a prompt) | 'pairwise' (Bradley-Terry) | 'mse'
margin = 0.0  # Bradley-Terry margin: the chosen reward must win by this much (loss='pairwise')
gradient_accumulation_steps = 1  # micro-steps per optimizer step, over all ranks together
batch_size = 8  # per micro-step per rank: prompts (ranking), pairs (pairwise) or scored responses (mse)
block_size = 0  # longest prompt + response in tokens; 0 = the base model's block_size
# model
likelihood_weight = 0.0  # > 0: r += w · mean log p(response) under the trunk's own LM head, w learned from this
# start (SimPO's length-normalized likelihood, Meng et al. 2024): the reward model uses what its LM knows of facts
backbone = "sft"  # the trunk: 'sft' (the init_from GPT) | a train_pretrain.py --model_type=bert out_dir
dropout = 0.0  # replaces the base model's dropout (scoring always runs with dropout off)
attn_impl = "auto"  # 'manual' | 'sdpa' | 'triton' | 'auto' (sdpa)
# optimizer (AdamW) and schedule
learning_rate = 1e-4
max_iters = 200
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables
decay_lr = True  # False keeps learning_rate constant after warmup
lr_schedule = "cosine"  # 'cosine' | 'poly'
warmup_iters = 20
lr_decay_iters = -1  # -1 = max_iters
min_lr = 1e-5
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' (bfloat16 on a GPU that has it, else float32) | 'float32' | 'bfloat16' | 'float16'
backend = "auto"  # DDP backend: 'auto' (nccl on CUDA, gloo on CPU) | 'nccl' | 'gloo'
compile = False  # torch.compile the model
seed = 1337
# ----------------------------------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
check_ranges(config, positive=("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval"),
             non_negative=("max_iters", "block_size", "learning_rate", "min_lr", "warmup_iters", "weight_decay",
                           "grad_clip"), fraction=("dropout",))
check_out_dir(out_dir, init_from == "resume", overwrite)  # nothing in out_dir changes before the loop starts

# ---- setup: device, DDP, precision, seeds
runtime = dist_utils.setup(device, backend)
master = runtime.is_master
dtype = dist_utils.resolve_dtype(dtype, runtime.device_type)
accum_per_rank = dist_utils.micro_steps_per_rank(gradient_accumulation_steps, runtime)
demo_temperatures = ",".join(str(t) for t in parse_temperatures(demo_temperatures))  # checked before any work
lr_decay_iters = max_iters if lr_decay_iters < 0 else lr_decay_iters
if master:
    print(f"[nanollm] device={runtime.device} dtype={dtype} world_size={runtime.world_size} loss={loss}")
ctx = dist_utils.autocast(runtime.device_type, dtype)

# ---- the starting model: an SFT checkpoint, or our own reward-model checkpoint when resuming
checkpoint = load_checkpoint(os.path.join(out_dir if init_from == "resume" else init_from, "ckpt.pt"), runtime.device)
if init_from == "resume":
    source_dir, tokenizer_path = checkpoint["config"]["init_from"], os.path.join(out_dir, "tokenizer.model")
else:
    if checkpoint.get("stage") == "reward":
        raise UserError(f"init_from={init_from!r} holds a reward model; start from an SFT out_dir or use 'resume'")
    source_dir, tokenizer_path = init_from, os.path.join(init_from, "tokenizer.model")
    config["init_from"] = init_from
tokenizer = Tokenizer(tokenizer_path)
if attn_impl == "auto":
    attn_impl = "sdpa"
# the trunk: the SFT GPT itself, or a pretrained BERT reading the same tokens (replies still come from the GPT)
if init_from == "resume":
    backbone_kind, trunk_checkpoint = checkpoint.get("backbone", "gpt"), checkpoint
    likelihood_weight = checkpoint.get("likelihood_weight", 0.0)  # the saved model's shape, whatever was passed
elif backbone == "sft":
    backbone_kind, trunk_checkpoint = "gpt", checkpoint
else:
    trunk_checkpoint = load_checkpoint(os.path.join(backbone, "ckpt.pt"), runtime.device)
    if trunk_checkpoint["config"].get("model_type") != "bert":
        raise UserError(f"backbone={backbone!r}: expected 'sft' or a train_pretrain.py --model_type=bert out_dir, "
                         f"found model_type={trunk_checkpoint['config'].get('model_type', 'gpt')!r}")
    if not filecmp.cmp(os.path.join(backbone, "tokenizer.model"), tokenizer_path, shallow=False):
        raise UserError(f"backbone={backbone!r}: its tokenizer.model differs from {tokenizer_path}; pretrain the BERT "
                         f"on the same prepared data (--data_dir) as the SFT model's base")
    backbone_kind = "bert"
model_args = dict(trunk_checkpoint["model_args"], dropout=dropout, attn_impl=attn_impl)
block_size = block_size or model_args["block_size"]
if block_size > model_args["block_size"]:
    raise UserError(f"block_size={block_size} exceeds the base model's block_size={model_args['block_size']}")

# ---- data: the demo is collected once (rank 0) and reused while its settings stay the same
if dataset == "demo":
    demo_dir = data_dir or os.path.join("data", "rm_demo")
    wanted = dict(checkpoint=os.path.abspath(source_dir), n_prompts=demo_prompts, k=demo_k,
                  temperatures=demo_temperatures, max_new_tokens=demo_max_new_tokens,
                  heldout_fraction=demo_heldout_fraction, n_labelers=labelers, noise=labeler_noise,
                  length_bias=length_bias, seed=seed, world_seed=world_seed,
                  prompt_splits="validation,train")  # held-out prompts from the validation set, training from train
    meta_path = os.path.join(demo_dir, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    fresh = init_from == "resume" or all(meta.get(k) == v for k, v in wanted.items())
    if master and not (fresh and meta):
        t0 = time.time()
        meta = collect_feedback(source_dir, demo_dir, demo_prompts, demo_k, demo_temperatures, demo_max_new_tokens,
                                demo_heldout_fraction, labelers, labeler_noise, length_bias, "scores", seed,
                                world_seed, runtime.device)
        print(f"[nanollm] collected {demo_prompts} x {demo_k} replies from {source_dir} in {time.time() - t0:.1f} s "
              f"-> {demo_dir}")
    dist_utils.barrier(runtime)
    meta = json.load(open(meta_path))
    if master:
        print(f"[nanollm] labelers agree with the gold annotator on {meta['labeler_gold_agreement']:.1%} of "
              f"{meta['gold_pairs']} pairs; corr(rating - gold, length) = {meta['rating_excess_length_corr']:+.3f}")
    dataset, eval_dataset = os.path.join(demo_dir, "train.jsonl"), os.path.join(demo_dir, "heldout.jsonl")
train_groups = load_groups(dataset)
if eval_dataset:
    eval_groups = load_groups(eval_dataset)
else:  # the last val_fraction of a custom dataset's prompts (file order: the split never changes), by prompt
    train_groups, eval_groups = split_by_prompt(train_groups, val_fraction)
check_groups(train_groups, loss, "training data")
check_groups(eval_groups, loss, "held-out data")
train_encoded, train_truncated = encode_groups(tokenizer, train_groups, block_size)
eval_encoded, eval_truncated = encode_groups(tokenizer, eval_groups, block_size)
n_responses = sum(len(g.responses) for g in train_groups)
if train_truncated * 2 > n_responses:  # an overlong prompt + response loses its beginning: most would be cut
    raise UserError(f"block_size={block_size}: {train_truncated} of {n_responses} training prompt + response pairs do "
                    f"not fit; raise it (0 = the base model's {model_args['block_size']})")
items = training_items(train_groups, loss)
# saved with the model, so that a later stage can check its held-out prompts are new to the reward model
trained_prompts = list({prompt_key(group.prompt): group.prompt for group in train_groups}.values())
# the truth, for evaluation only: the gold annotator's overall score of every held-out response it can judge
gold = GoldAnnotator(World(world_seed))
judged = [g for g, group in enumerate(eval_groups) if gold.question(group.prompt) is not None]
gold_judgements = [[gold.judge(eval_groups[g].prompt, r) for r in eval_groups[g].responses] for g in judged]
gold_preference = [[judgement.overall for judgement in group] for group in gold_judgements]
eval_lengths = [[len(encode_content(tokenizer, r)) for r in group.responses] for group in eval_groups]
flat_lengths = [n for group in eval_lengths for n in group]
length_reference = {"val_label_length_corr": pearson([p for g in eval_groups for p in g.preference], flat_lengths)}
if len(judged) == len(eval_groups):
    length_reference["val_gold_length_corr"] = pearson([s for group in gold_preference for s in group], flat_lengths)
if master:
    n_pairs = sum(len(g.pairs) for g in train_groups)
    print(f"[nanollm] train: {len(train_groups)} prompts, {sum(len(g.responses) for g in train_groups)} responses, "
          f"{n_pairs} pairs ({sum(g.ties for g in train_groups)} ties skipped), {train_truncated} truncated; "
          f"held-out: {len(eval_groups)} prompts ({len(judged)} the gold annotator can judge), "
          f"{sum(len(g.pairs) for g in eval_groups)} pairs")

# ---- model
torch.manual_seed(seed)  # the same head initialization on every rank
model = RewardModel(build_backbone(backbone_kind, model_args), likelihood_weight).to(runtime.device)
scaler = dist_utils.grad_scaler(runtime.device_type, dtype)
optimizer = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), runtime.device_type, master)
iter_num, best_val_loss = 0, float("inf")
if init_from == "resume":
    iter_num, best_val_loss = restore_training_state(checkpoint, model, optimizer, scaler, runtime)
    if master:
        print(f"[nanollm] resumed from {out_dir}/ckpt.pt at iteration {iter_num}")
else:
    model.backbone.load_state_dict(trunk_checkpoint["model"])
    torch.manual_seed(seed + runtime.rank)  # dropout differs per rank
    if master:
        trunk_from = init_from if backbone == "sft" else backbone
        print(f"[nanollm] reward model from {trunk_from}/ckpt.pt ({backbone_kind}): "
              f"{model.backbone.num_parameters() / 1e6:.2f} M backbone parameters + a "
              f"{model.head.weight.numel() + 1}-parameter head")
checkpoint = trunk_checkpoint = None  # free memory
if compile:
    print("[nanollm] compiling the model with torch.compile")
    model = torch.compile(model)
if runtime.ddp:  # every trainable parameter takes part in every loss (GPT's lm_head is tied to wte; BERT's MLM
    # head is frozen by build_backbone), so DDP waits for no missing gradient
    model = DDP(model, device_ids=[runtime.local_rank] if runtime.device_type == "cuda" else None)
raw_model = unwrap(model)


def evaluate():
    """Held-out loss, agreement with the labels and with the gold annotator, reward statistics (dropout off)."""
    rewards = score_encoded(raw_model, eval_encoded, tokenizer.pad_id, batch_size * 8, runtime.device, ctx)
    flat = torch.tensor([r for group in rewards for r in group])
    scores = {"val_loss": dataset_loss(rewards, eval_groups, loss, margin),
              **ranking_metrics(rewards, [g.preference for g in eval_groups], "val_")}
    if judged:
        judged_rewards = [rewards[g] for g in judged]
        scores.update(ranking_metrics(judged_rewards, gold_preference, "val_gold_"))
        same_facts = lambda g, i, j: gold_judgements[g][i].accuracy == gold_judgements[g][j].accuracy  # noqa: E731
        # gold pairs split: replies that differ in factual accuracy, and replies equally accurate that differ in form
        scores["val_gold_fact_pair_acc"] = pair_accuracy(judged_rewards, gold_preference,
                                                         lambda g, i, j: not same_facts(g, i, j))[0]
        scores["val_gold_form_pair_acc"] = pair_accuracy(judged_rewards, gold_preference, same_facts)[0]
    # the length bias: corr(reward, length) against the same for the labels and for the truth
    scores.update(reward_mean=flat.mean().item(), reward_std=flat.std().item(),
                  val_length_corr=pearson(flat.tolist(), flat_lengths), **length_reference)
    return scores, rewards


def save(iter_num):
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), runtime, model, optimizer, scaler, iter_num, best_val_loss,
                    config, model_args, stage="reward", loss=loss, reward_bias=float(raw_model.reward_bias),
                    backbone=backbone_kind, likelihood_weight=likelihood_weight, trained_prompts=trained_prompts)


def describe(scores):
    text = f"val loss {scores['val_loss']:.4f}, pair acc vs labelers {scores['val_pair_acc']:.1%}"
    if "val_gold_pair_acc" in scores:
        text += (f", vs gold {scores['val_gold_pair_acc']:.1%} (facts {scores['val_gold_fact_pair_acc']:.1%}, "
                 f"form {scores['val_gold_form_pair_acc']:.1%}; kendall {scores['val_gold_kendall']:+.3f})")
    text += (f"; corr with length: reward {scores['val_length_corr']:+.3f}, "
             f"labels {scores['val_label_length_corr']:+.3f}")
    return text + (f", gold {scores['val_gold_length_corr']:+.3f}" if "val_gold_length_corr" in scores else "")


def print_length_table(rewards):
    """The bias made visible: held-out responses in length quarters, with their mean reward, label and gold score."""
    gold_of = dict(zip(judged, gold_preference))
    rows = sorted((eval_lengths[g][i], rewards[g][i], group.preference[i], gold_of[g][i] if g in gold_of else None)
                  for g, group in enumerate(eval_groups) for i in range(len(group.responses)))
    print("| response length (tokens) | responses | mean reward | mean label | mean gold |\n|---|---|---|---|---|")
    for quarter in range(4):
        part = rows[quarter * len(rows) // 4:(quarter + 1) * len(rows) // 4]
        golds = [row[3] for row in part if row[3] is not None]
        mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
        print(f"| {part[0][0]}-{part[-1][0]} | {len(part)} | {mean([r[1] for r in part]):+.3f} | "
              f"{mean([r[2] for r in part]):.3f} | {mean(golds):.3f} |")


# ---- the training loop
log = start_run(out_dir, runtime, init_from == "resume", iter_num, tokenizer_path,
                tensorboard=tensorboard)  # out_dir is written from here on
progress = tqdm(total=max_iters, initial=iter_num, disable=not master or eval_only, dynamic_ncols=True)
stop = GracefulStop()  # Ctrl-C: finish the step, checkpoint, exit
step = GuardedStep(optimizer, scaler, grad_clip, runtime, dtype)  # clip; skip non-finite steps
stopped = False
best_weights = None  # always_save_checkpoint=False: the weights of the lowest held-out loss so far (rank 0)
t_start = time.time()
while True:
    if stop.requested(runtime):
        stopped = True
        if master:
            tqdm.write(f"[nanollm] stop requested: checkpoint at iteration {iter_num}; resume with --init_from=resume")
        save(iter_num)
        break

    # evaluate and checkpoint (iteration 0 shows the untrained head: about 50% pairwise accuracy)
    if iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only:
        if master:
            scores, _ = evaluate()
            tqdm.write(f"iter {iter_num}: {describe(scores)}")
            log.write({"iter": iter_num, **scores})
            improved = scores["val_loss"] < best_val_loss
            best_val_loss = min(best_val_loss, scores["val_loss"])
            if improved and not always_save_checkpoint:  # the run ends with these weights unless a better one comes
                best_weights = {k: v.detach().to("cpu", copy=True) for k, v in raw_model.state_dict().items()}
                best_iter = iter_num
        save_now = dist_utils.any_rank(master and iter_num > 0 and (improved or always_save_checkpoint), runtime)
        if save_now and not eval_only and iter_num < max_iters:  # the last checkpoint comes with the fitted bias
            save(iter_num)
        dist_utils.barrier(runtime)
    if iter_num >= max_iters or eval_only:
        break

    # learning rate for this iteration
    lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr, lr_schedule if decay_lr else "constant")
    for group in optimizer.param_groups:
        group["lr"] = lr

    # forward/backward over micro-batches; each response is forwarded once, the loss looks at its pairs
    t0 = time.time()
    loss_sum = 0.0
    for micro in range(accum_per_rank):
        batch = get_reward_batch(train_groups, train_encoded, items, loss, batch_size, tokenizer.pad_id, seed,
                                 iter_num, runtime.rank * accum_per_rank + micro, runtime.device)
        with dist_utils.no_sync_unless(model, sync=(micro == accum_per_rank - 1)):
            with ctx:
                rewards = model(batch.input_ids, batch.attention_mask)  # (N,)
            micro_loss = batch_loss(rewards, batch, loss, margin)
            scaler.scale(micro_loss / accum_per_rank).backward()  # mean over the global batch (DDP averages ranks)
        loss_sum += micro_loss.item()
    loss_mean = dist_utils.all_reduce_mean(loss_sum / accum_per_rank, runtime)

    grad_norm = step(model, loss_mean, iter_num)  # unscale, clip to grad_clip, optimizer step (or skip)

    # log
    dt = time.time() - t0
    if master:
        progress.update(1)
        progress.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}")
        if iter_num % log_interval == 0:
            log.write({"iter": iter_num, "loss": loss_mean, "lr": lr, "grad_norm": grad_norm, "dt_ms": dt * 1000})
    iter_num += 1
progress.close()

# ---- the end: fit the bias (mean reward 0 on the SFT model's responses), save, and show what was learned
if not eval_only and not stopped:
    if master and best_weights is not None:  # always_save_checkpoint=False: keep the best model, not the last
        raw_model.load_state_dict(best_weights)
        print(f"[nanollm] kept the model of iteration {best_iter} (lowest held-out loss {best_val_loss:.4f})")
    if master:
        bias = fit_reward_bias(raw_model, train_encoded, tokenizer.pad_id, batch_size * 8, runtime.device, ctx)
    save(iter_num)
    if master:
        scores, rewards = evaluate()
        log.write({"iter": iter_num, "phase": "final", "reward_bias": bias, **scores})
        print(f"[nanollm] trained {max_iters} iterations in {time.time() - t_start:.1f} s; reward bias {bias:+.4f} "
              f"(mean reward on the {sum(len(g.responses) for g in train_groups)} training responses is now 0)")
        print(f"[nanollm] final: {describe(scores)}")
        print_length_table(rewards)
dist_utils.teardown(runtime)
stop.exit_if(stopped)
