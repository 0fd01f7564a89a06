"""Supervised fine-tuning (SFT): teach a pretrained GPT to answer in the chat template; loss on assistant tokens only.

After pretraining (python train_pretrain.py writes out/), one process (CPU, one GPU, or Apple MPS):
    python train_sft.py                                   # built-in demo set: out/ -> out-sft/, before/after table
    python train_sft.py --dataset=my_data/ --eval_dataset=my_eval.jsonl --max_iters=1000 --packing=True
N processes with DDP (one per GPU; gloo on CPU), or the model split over them (docs/parallelism.md):
    torchrun --standalone --nproc_per_node=4 train_sft.py
    torchrun --standalone --nproc_per_node=4 train_sft.py --parallelism=fsdp   # or tp
Resume after a crash or Ctrl-C:
    python train_sft.py --init_from=resume
See what is trained on (the loss mask) in any data file:
    python -m nanollm.sft show data/sft_demo/train/chat.jsonl --tokenizer=out/tokenizer.model
Settings below are plain variables; override them with a config file and/or --key=value.
"""
import os
import sys
import time

import torch
from nanollm import distributed as dist_utils
from nanollm.checkpoint import load_checkpoint, read_metrics, restore_training_state, save_checkpoint, start_run, unwrap
from nanollm.configurator import configure
from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig
from nanollm.optim import Schedule, configure_optimizer
from nanollm.sft import (check_settings, check_teacher, distillation_loss_sum, encode_conversations, evaluate,
                         fit_block_size, get_sft_batch, load_sft_data, loss_weight, model_inputs, pack_rows, spread,
                         starting_point, token_loss_sum)
from nanollm.tokenizer import Tokenizer
from nanollm.training import CheckpointRule, GracefulStop, GuardedStep, evaluation_due, setup_run

# ------------------------------------------------------------------------------------------ settings
# I/O
out_dir = "out-sft"  # checkpoints, metrics.jsonl and a copy of the tokenizer go here
init_from = "out"  # a pretraining out_dir (ckpt.pt + tokenizer.model) | 'resume' (out_dir/ckpt.pt)
overwrite = False  # True: a fresh run may replace the run already in out_dir (else it refuses)
eval_interval = 100  # held-out assistant-token loss (and checkpoint) every this many iterations
log_interval = 10  # write a metrics.jsonl line every this many iterations
tensorboard = False  # also write every metrics.jsonl number as TensorBoard scalars in out_dir/tensorboard/
eval_only = False  # evaluate the starting model once (loss and generations) and exit
always_save_checkpoint = True  # checkpoint at every eval, not only when the held-out loss improves
# data
dataset = "demo"  # 'demo' (built from the synthetic world) or .json/.jsonl files or folders, comma-separated
eval_dataset = ""  # held-out files; '' = the demo's held-out set, or a random val_fraction of a custom dataset
data_dir = ""  # where the demo files are written; '' = data/sft_demo
world_seed = 0  # the world of the demo set: must be the pretraining world (build_corpus uses World(0))
val_fraction = 0.05  # held out of a custom dataset when eval_dataset is ''
packing = False  # True: several examples per row (positions restart, no attention across examples)
gradient_accumulation_steps = 1  # micro-steps per optimizer step, over all ranks together
batch_size = 32  # rows per micro-step per rank
block_size = 0  # longest example in tokens; 0 = the base model's block_size (longer examples are truncated)
# model
dropout = 0.0  # replaces the base model's dropout
attn_impl = "auto"  # 'manual' | 'sdpa' | 'triton' | 'auto' (sdpa): how attention runs, not saved with the weights
# optimizer and schedule
optimizer = "adamw"  # 'adamw' | 'lamb' | 'lars' | 'muon' (nanollm/optim.py)
learning_rate = 5e-4  # a quarter of pretraining's: learn the format without overwriting what the model knows
max_iters = 200  # a short fine-tune: the demo set is small
weight_decay = 0.0  # no pull of the pretrained weights towards 0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables
decay_lr = True  # False keeps learning_rate constant after warmup
lr_schedule = "cosine"  # 'cosine' | 'poly'
warmup_iters = 20  # warmup again: the optimizer's moments start from zero
lr_decay_iters = -1  # -1 = max_iters
min_lr = 5e-5  # learning_rate / 10
# distillation (Hinton et al. 2015): loss = α·CE + (1−α)·T²·KL(teacher ‖ student) on the assistant tokens
teacher = ""  # '' = none; else a model on the same tokenizer (e.g. a larger SFT out_dir) whose distributions to match
distill_alpha = 0.5  # α, the weight of the cross-entropy with the reference tokens
distill_temperature = 2.0  # T: both distributions softened by it, so the teacher's ranking of wrong tokens shows
# evaluation (before and after training): greedy replies to the held-out questions
eval_examples = 240  # held-out conversations generated and scored (0 = none; the loss still uses all)
max_new_tokens = 32  # longest generated reply
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' (bfloat16 on a GPU that has it, else float32) | 'float32' | 'bfloat16' | 'float16'
backend = "auto"  # DDP backend: 'auto' (nccl on CUDA, gloo on CPU) | 'nccl' | 'gloo'
compile = False  # torch.compile the model
parallelism = "ddp"  # 'ddp' (a whole copy per process) | 'fsdp' (sharded) | 'tp' (matrices split): nanollm/parallel.py
seed = 1337  # batches, the held-out split of a custom dataset, dropout
# ----------------------------------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
runtime = setup_run(config, check_settings)  # settings and out_dir checked before any work; device, DDP, precision
master, ctx = runtime.is_master, runtime.autocast()
accum_per_rank = dist_utils.micro_steps_per_rank(gradient_accumulation_steps, runtime)

# ---- the starting model: a pretraining out_dir, or ours when resuming
start_dir, tokenizer_path = starting_point(init_from, out_dir)
checkpoint = load_checkpoint(os.path.join(start_dir, "ckpt.pt"), runtime.device)
tokenizer = Tokenizer(tokenizer_path)
model_args = dict(checkpoint["model_args"], dropout=dropout, attn_impl=attn_impl)
block_size = fit_block_size(block_size, model_args)  # 0 = the base model's
config.update(dtype=runtime.dtype, block_size=block_size)  # saved as resolved

# ---- data: every record normalized to the chat template, checked in full before training starts
train_conversations, heldout_conversations = load_sft_data(dataset, eval_dataset, data_dir, world_seed, val_fraction,
                                                           seed, runtime)
train_examples, train_stats = encode_conversations(tokenizer, train_conversations, block_size)
heldout_examples, eval_stats = encode_conversations(tokenizer, heldout_conversations, block_size)
rows = pack_rows(train_examples, block_size, packing, seed)
generation_set = spread(heldout_conversations, eval_examples)  # greedy replies scored before and after
if master:
    print(f"[nanollm] train: {train_stats}\n[nanollm] held-out: {eval_stats}")
    print(f"[nanollm] {'packing' if packing else 'padding'}: {len(rows)} rows from {len(train_examples)} examples")

# ---- model
model = GPT(GPTConfig(**model_args)).to(runtime.device)
if init_from != "resume":
    model.load_state_dict(checkpoint["model"])  # the base model, loaded whole before it is wrapped or split
model = runtime.wrap(torch.compile(model) if compile else model)  # DDP, or split in place (fsdp, tp)
raw_model = unwrap(model)
scaler = runtime.grad_scaler()
optimizer = configure_optimizer(raw_model, weight_decay, learning_rate, (beta1, beta2), runtime.device_type, master,
                                name=optimizer)  # the setting names the optimizer built here
schedule = Schedule(learning_rate, warmup_iters, lr_decay_iters, max_iters, min_lr, lr_schedule if decay_lr else
                    "constant")  # warmup, then cosine (or polynomial) decay to min_lr
iter_num, best_val_loss = 0, float("inf")
if init_from == "resume":
    iter_num, best_val_loss = restore_training_state(checkpoint, model, optimizer, scaler, runtime)
else:
    torch.manual_seed(seed + runtime.data_rank)  # dropout differs per rank (tensor-parallel ranks agree)
if master:
    print(f"[nanollm] from {start_dir}/ckpt.pt at iteration {iter_num} ({raw_model.num_parameters() / 1e6:.2f} M)")
checkpoint = None  # free memory
teacher_model = None
if teacher:  # frozen, in eval mode: its next-token distributions on the same batches are the soft targets
    teacher_model, teacher_tokenizer, _, _ = load_model(teacher, runtime.device, attn_impl)
    check_teacher(teacher_model, teacher_tokenizer, tokenizer, block_size, teacher)


def run_evaluation(with_generation):
    """Held-out assistant-token loss/perplexity, plus greedy replies scored against the references (rank 0)."""
    conversations = generation_set if with_generation else []
    scores, replies = evaluate(raw_model, tokenizer, conversations, heldout_examples, max_new_tokens,
                               batch_size, ctx)
    return scores, list(zip(conversations, replies))


def save(iter_num):
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), runtime, model, optimizer, scaler, iter_num, should_save.best,
                    config, model_args, stage="sft")


# ---- before training: the base model on the held-out set (skipped on resume: it is in metrics.jsonl)
log = start_run(out_dir, runtime, init_from == "resume", iter_num, tokenizer_path, tensorboard, max_iters,
                log_interval)  # out_dir is written from here on
if runtime.evaluates and (iter_num == 0 or eval_only):  # rank 0, or every rank of a split model
    before, _ = run_evaluation(with_generation=eval_examples > 0)
    log.write({"iter": iter_num, "phase": "before", **before})
    log.say("[nanollm] before SFT: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))

# ---- the training loop
stop = GracefulStop()  # Ctrl-C: finish the step, checkpoint, exit
step = GuardedStep(optimizer, scaler, grad_clip, runtime)  # clip; skip non-finite steps
should_save = CheckpointRule(always_save_checkpoint, best_val_loss)  # after an evaluation
t_start = time.time()
while not eval_only and not stop.requested(runtime, iter_num):
    # held-out loss and checkpoint (the first evaluation was the "before" one)
    if iter_num > 0 and evaluation_due(iter_num, eval_interval, max_iters):
        scores = run_evaluation(with_generation=False)[0] if runtime.evaluates else {}
        log.say(f"iter {iter_num}: held-out assistant tokens: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        log.write({"iter": iter_num, **scores})
        if should_save(scores.get("val_loss"), runtime):
            save(iter_num)
        dist_utils.barrier(runtime)
    if iter_num >= max_iters:
        break

    lr = schedule.set(optimizer, iter_num)  # this iteration's learning rate

    # this rank's micro-batches; the loss is a mean over every target token of the global batch
    t0 = time.time()
    batches = [get_sft_batch(train_examples, rows, batch_size, tokenizer.pad_id, seed, iter_num,
                             runtime.data_rank * accum_per_rank + micro, runtime.device)
               for micro in range(accum_per_rank)]
    n_targets = dist_utils.all_reduce_mean(sum(b.n_targets for b in batches), runtime) * runtime.world_size
    loss_sum = 0.0
    for micro, batch in enumerate(batches):
        with dist_utils.no_sync_unless(model, sync=(micro == accum_per_rank - 1)):
            with ctx:
                logits, _ = model(batch.input_ids, **model_inputs(batch))
                token_losses = token_loss_sum(logits, batch.targets)  # Σ CE over this micro-batch's targets
                if teacher_model is not None:  # α·Σ CE + (1−α)·Σ T²·KL(teacher ‖ student), same tokens
                    with torch.no_grad():
                        teacher_logits, _ = teacher_model(batch.input_ids, **model_inputs(batch))
                    token_losses = distill_alpha * token_losses + (1 - distill_alpha) * distillation_loss_sum(
                        logits, teacher_logits, batch.targets, distill_temperature)
            # loss = Σ CE / n_targets(global); × world_size because DDP averages gradients over ranks
            scaler.scale(token_losses * loss_weight(n_targets, runtime.world_size)).backward()
        loss_sum += token_losses.item()
    loss_mean = dist_utils.all_reduce_mean(loss_sum, runtime) * loss_weight(n_targets, runtime.world_size)

    grad_norm = step(model, loss_mean, iter_num)  # unscale, clip to grad_clip, optimizer step (or skip)

    dt = time.time() - t0
    log.step(iter_num, {"loss": loss_mean, "lr": lr, "grad_norm": grad_norm, "dt_ms": dt * 1000,
                        "targets": int(n_targets), "tokens_per_sec": int(n_targets) / dt})  # progress bar, metrics
    iter_num += 1
log.close()
if stop.stopped:  # Ctrl-C: the checkpoint a resumed run starts from
    save(iter_num)
elif master and not eval_only:  # the end: held-out metrics before and after, and a few replies
    elapsed = time.time() - t_start
    after, samples = run_evaluation(with_generation=eval_examples > 0)
    log.write({"iter": iter_num, "phase": "after", **after})
    before = next(r for r in read_metrics(log.path) if r.get("phase") == "before")
    print(f"[nanollm] trained {max_iters} iterations in {elapsed:.1f} s. Held-out set: {eval_stats.conversations} "
          f"conversations (loss), {len(generation_set)} generated (greedy)")
    print("| metric | before SFT | after SFT |\n|---|---|---|")
    for key in after:
        print(f"| {key} | {before.get(key, float('nan')):.4f} | {after[key]:.4f} |")
    for conversation, reply in samples[:: max(1, len(samples) // 6)][:6]:
        print(f"  Q: {conversation.messages[-2]['content']}\n  A: {reply}\n  (reference: "
              f"{conversation.messages[-1]['content']})")
elif runtime.evaluates and not eval_only:  # the other ranks of a split model take part in rank 0's evaluation
    run_evaluation(with_generation=eval_examples > 0)
dist_utils.end_run(runtime, stop.exit_code)  # a multi-process run exits here (with the stop's code)
stop.exit_if_stopped()
