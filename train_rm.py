"""Train a reward model: the SFT model plus a scalar head, on preferences written by simulated labelers.

After SFT (python train_sft.py writes out-sft/), one process (CPU, one GPU, or Apple MPS):
    python train_rm.py                       # demo: sample 4 replies to 800 world questions from out-sft, label, train
    python train_rm.py --loss=pairwise --margin=0.5 --dataset=prefs.jsonl --eval_dataset=heldout.jsonl
    python train_rm.py --length_bias=0.0     # labelers without the length bias: compare val_length_corr
N processes with DDP (one per GPU; gloo on CPU):
    torchrun --standalone --nproc_per_node=4 train_rm.py
Resume after a crash or Ctrl-C:
    python train_rm.py --init_from=resume
Collect preference data by hand: python -m nanollm.annotators collect --out_dir=out-sft --data_dir=data/rm_demo
Settings below are plain variables; override them with a config file and/or --key=value.
"""
import os
import sys
import time

import torch
from nanollm import distributed as dist_utils
from nanollm.annotators import GoldAnnotator, demo_feedback
from nanollm.checkpoint import restore_training_state, save_checkpoint, start_run, unwrap
from nanollm.configurator import configure
from nanollm.optim import Schedule, configure_optimizer
from nanollm.reward import (HeldOutScores, RewardModel, batch_loss, build_backbone, check_settings, encode_groups,
                            encode_training_groups, fit_reward_bias, get_reward_batch, load_reward_data, prompt_key,
                            reward_start, training_items)
from nanollm.sft import fit_block_size
from nanollm.training import CheckpointRule, GracefulStop, GuardedStep, evaluation_due, setup_run
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
attn_impl = "auto"  # 'manual' | 'sdpa' | 'triton' | 'auto' (sdpa): how attention runs, not saved with the weights
# optimizer (AdamW) and schedule
learning_rate = 1e-4  # small: the trunk is the SFT model, only the head is new
max_iters = 200  # passes over the collected prompts: reward models overfit fast (InstructGPT: 1 epoch)
weight_decay = 0.0  # the trunk keeps what SFT taught it
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables
decay_lr = True  # False keeps learning_rate constant after warmup
lr_schedule = "cosine"  # 'cosine' | 'poly'
warmup_iters = 20  # the head starts random: small steps first
lr_decay_iters = -1  # -1 = max_iters
min_lr = 1e-5  # learning_rate / 10
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' (bfloat16 on a GPU that has it, else float32) | 'float32' | 'bfloat16' | 'float16'
backend = "auto"  # DDP backend: 'auto' (nccl on CUDA, gloo on CPU) | 'nccl' | 'gloo'
compile = False  # torch.compile the model
seed = 1337  # the head's initialization, the demo's samples and labels, batches
# ----------------------------------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
runtime = setup_run(config, check_settings)  # settings and out_dir checked before any work; device, DDP, precision
master, ctx = runtime.is_master, runtime.autocast()
accum_per_rank = dist_utils.micro_steps_per_rank(gradient_accumulation_steps, runtime)

# ---- the trunk: the SFT GPT, or a BERT reading the same tokens; ours when resuming
start = reward_start(init_from, out_dir, backbone, likelihood_weight, runtime.device)
tokenizer = start.tokenizer
model_args = dict(start.trunk["model_args"], dropout=dropout, attn_impl=attn_impl)
block_size = fit_block_size(block_size, model_args)  # 0 = the trunk's
config.update(init_from=start.source_dir, dtype=runtime.dtype, block_size=block_size)  # saved as resolved

# ---- data: the demo is collected once (rank 0: the SFT model's replies, simulated labelers) or the user's files
if dataset == "demo":
    dataset, eval_dataset = demo_feedback(start.source_dir, data_dir or os.path.join("data", "rm_demo"), runtime,
                                          demo_prompts, demo_k, demo_temperatures, demo_max_new_tokens,
                                          demo_heldout_fraction, labelers, labeler_noise, length_bias, seed,
                                          world_seed, reuse=init_from == "resume")
train_groups, eval_groups = load_reward_data(dataset, eval_dataset, val_fraction, loss)
train_encoded, train_truncated = encode_training_groups(tokenizer, train_groups, block_size)
eval_encoded, _ = encode_groups(tokenizer, eval_groups, block_size)
items = training_items(train_groups, loss)
trained_prompts = list({prompt_key(g.prompt): g.prompt for g in train_groups}.values())  # checked by train_ppo.py
held_out = HeldOutScores(eval_groups, tokenizer, GoldAnnotator(World(world_seed)))  # gold: evaluation only
if master:
    print(f"[nanollm] loss={loss}; train: {len(train_groups)} prompts, {sum(len(g.responses) for g in train_groups)} "
          f"responses, {sum(len(g.pairs) for g in train_groups)} pairs ({sum(g.ties for g in train_groups)} ties "
          f"skipped), {train_truncated} truncated; held-out: {len(eval_groups)} prompts ({len(held_out.judged)} the "
          f"gold annotator can judge), {sum(len(g.pairs) for g in eval_groups)} pairs")

# ---- model
torch.manual_seed(seed)  # the same head initialization on every rank
model = RewardModel(build_backbone(start.backbone, model_args), start.likelihood_weight).to(runtime.device)
scaler = runtime.grad_scaler()
optimizer = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), runtime.device_type, master)
schedule = Schedule(learning_rate, warmup_iters, lr_decay_iters, max_iters, min_lr, lr_schedule if decay_lr else
                    "constant")  # warmup, then cosine (or polynomial) decay to min_lr
iter_num, best_val_loss = 0, float("inf")
if start.resumed is not None:
    iter_num, best_val_loss = restore_training_state(start.resumed, model, optimizer, scaler, runtime)
else:
    model.backbone.load_state_dict(start.trunk["model"])
    torch.manual_seed(seed + runtime.rank)  # dropout differs per rank
if master:
    print(f"[nanollm] reward model at iteration {iter_num}: a trunk ({start.backbone}) of "
          f"{model.backbone.num_parameters() / 1e6:.2f} M parameters + a {model.head.weight.numel() + 1}-parameter head")
start.trunk = start.resumed = None  # free memory
model = runtime.wrap(torch.compile(model) if compile else model)  # DDP: every trainable parameter is in every loss
raw_model = unwrap(model)


def evaluate():  # held-out loss, agreement with the labels and the gold annotator, length bias (dropout off)
    return held_out.evaluate(raw_model, eval_encoded, tokenizer.pad_id, batch_size * 8, runtime.device, ctx, loss,
                             margin)


def save(iter_num):
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), runtime, model, optimizer, scaler, iter_num, should_save.best,
                    config, model_args, stage="reward", loss=loss, reward_bias=float(raw_model.reward_bias),
                    backbone=start.backbone, likelihood_weight=start.likelihood_weight, trained_prompts=trained_prompts)


# ---- the training loop
log = start_run(out_dir, runtime, init_from == "resume", iter_num, start.tokenizer_path, tensorboard,
                max_iters if not eval_only else 0, log_interval)  # out_dir is written from here on
stop = GracefulStop()  # Ctrl-C: finish the step, checkpoint, exit
step = GuardedStep(optimizer, scaler, grad_clip, runtime)  # clip; skip non-finite steps
should_save = CheckpointRule(always_save_checkpoint, best_val_loss, keep=raw_model)  # (and the best weights)
t_start = time.time()
while not stop.requested(runtime, iter_num):
    # evaluate and checkpoint (iteration 0 shows the untrained head: about 50% pairwise accuracy)
    if evaluation_due(iter_num, eval_interval, max_iters, eval_only):
        scores = evaluate()[0] if master else {}
        if master:
            log.say(f"iter {iter_num}: {held_out.describe(scores)}")
            log.write({"iter": iter_num, **scores})
        if should_save(scores.get("val_loss"), runtime, iter_num) and 0 < iter_num < max_iters and not eval_only:
            save(iter_num)  # (the last checkpoint comes with the fitted bias)
        dist_utils.barrier(runtime)
    if iter_num >= max_iters or eval_only:
        break

    lr = schedule.set(optimizer, iter_num)  # this iteration's learning rate

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

    log.step(iter_num, {"loss": loss_mean, "lr": lr, "grad_norm": grad_norm, "dt_ms": (time.time() - t0) * 1000})
    iter_num += 1
log.close()
if stop.stopped:  # Ctrl-C: the checkpoint a resumed run starts from
    save(iter_num)
elif not eval_only:  # the end: fit the bias (mean reward 0 on the SFT model's responses), save, show what was learned
    if master and should_save.restore_best() is not None:  # always_save_checkpoint=False: the best, not the last
        print(f"[nanollm] kept the model of iteration {should_save.best_iter} (held-out loss {should_save.best:.4f})")
    if master:
        bias = fit_reward_bias(raw_model, train_encoded, tokenizer.pad_id, batch_size * 8, runtime.device, ctx)
    save(iter_num)
    if master:
        scores, rewards = evaluate()
        log.write({"iter": iter_num, "phase": "final", "reward_bias": bias, **scores})
        print(f"[nanollm] trained {max_iters} iterations in {time.time() - t_start:.1f} s; reward bias {bias:+.4f} "
              f"(the mean reward on the training responses is now 0)\n[nanollm] final: {held_out.describe(scores)}\n"
              f"{held_out.length_table(rewards)}")
dist_utils.end_run(runtime, stop.exit_code)  # a multi-process run exits here (with the stop's code)
stop.exit_if_stopped()
