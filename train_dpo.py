"""DPO / IPO: the SFT model learns from preference pairs directly, against a frozen copy of itself; no reward model in
the loss and no sampling while training.

After SFT and the reward model (python train_sft.py; python train_rm.py, whose demo writes the preference data), on a
CPU, one GPU or Apple MPS:
    python train_dpo.py                                      # out-sft + data/rm_demo -> out-dpo, held-out gold score
    python train_dpo.py --loss=ipo --beta=0.5 --out_dir=out-ipo   # IPO (Azar et al. 2023)
    python train_dpo.py --pairs=best_worst                   # one pair per prompt: its best against its worst reply
    python train_dpo.py --dataset=prefs.jsonl --eval_dataset=heldout.jsonl   # any file train_rm.py reads
    torchrun --standalone --nproc_per_node=4 train_dpo.py    # DDP
    python train_dpo.py --init_from=resume                   # after a crash or Ctrl-C
The reward model (out-rm) only scores held-out replies for the log. The losses and the data are in nanollm/dpo.py;
this file is the loop. The policy is saved in the SFT format (python chat.py --out_dir=out-dpo).
"""
import os
import sys
import time

import torch
from nanollm import distributed as dist_utils
from nanollm.annotators import GoldAnnotator, ppo_prompt_sets
from nanollm.checkpoint import read_metrics, save_checkpoint, start_run, restore_training_state
from nanollm.configurator import configure
from nanollm.dpo import (HeldOutPairs, check_settings, encode_pairs, get_pair_batch, load_preference_pairs,
                         preference_files, preference_loss, sequence_logprobs)
from nanollm.optim import Schedule, configure_optimizer
from nanollm.ppo import HeldOutEvaluation, append_samples, before_after_table, evaluating, ppo_start
from nanollm.sft import fit_block_size
from nanollm.training import GracefulStop, GuardedStep, evaluation_due, setup_run
from nanollm.world import World

# ------------------------------------------------------------------------------------------ settings
# I/O
out_dir = "out-dpo"  # checkpoints (the policy in the SFT format), metrics.jsonl, samples.txt, tokenizer
init_from = "out-sft"  # the policy's start and the frozen reference: an SFT out_dir | 'resume' (out_dir/ckpt.pt)
overwrite = False  # True: a fresh run may replace the run already in out_dir (else it refuses)
reward_model = "out-rm"  # train_rm.py's out_dir: scores held-out replies for the log only (never in the loss)
eval_interval = 40  # held-out pairs, held-out generations (gold, KL, rm score) and a checkpoint every this many
log_interval = 5  # write a metrics.jsonl line every this many iterations
tensorboard = False  # also write every metrics.jsonl number as TensorBoard scalars in out_dir/tensorboard/
eval_only = False  # evaluate the starting policy once and exit
# preference data: any file train_rm.py reads (pairs; rankings and scores become pairs)
dataset = "demo"  # 'demo' (the feedback train_rm.py's demo wrote in data_dir) | .json/.jsonl files or folders
eval_dataset = ""  # held-out files; '' = the demo's held-out prompts, or the last val_fraction of a custom dataset
data_dir = ""  # the demo's folder; '' = data/rm_demo (train_rm.py's default)
val_fraction = 0.1  # of a custom dataset's distinct prompts, held out (with all their records) when eval_dataset=''
pairs = "all"  # 'all': every pair of replies rated differently | 'best_worst': one pair per prompt
eval_pairs = 1024  # held-out pairs for the implicit-reward accuracy and margin (the first this many)
block_size = 0  # longest prompt + response in tokens; 0 = the SFT model's block_size
# held-out generations, as train_ppo.py: test prompts (reported) and validation prompts (for choosing settings)
world_seed = 0  # the world the gold annotator checks facts against (pretraining uses World(0))
prompt_seed = 1337  # the questions' order and wording
eval_prompts = 160  # test prompts: the reported result (eval_* metrics); never used to choose settings
validation_prompts = 160  # validation prompts: compare settings on these (val_* metrics)
eval_samples = 4  # responses sampled per held-out prompt
max_new_tokens = 32  # longest sampled response
temperature = 1.0  # pure sampling at this temperature (the KL is measured at it too)
eval_batch_size = 64  # held-out prompts per generation batch
# loss
loss = "dpo"  # 'dpo': −log σ(β·h) (Rafailov et al. 2023) | 'ipo': (h − 1/(2β))² (Azar et al. 2023)
beta = 0.1  # β: the strength of the implicit KL constraint (larger: closer to the reference)
# optimizer (AdamW) and schedule
batch_size = 32  # pairs per micro-step per rank
gradient_accumulation_steps = 1  # micro-steps per optimizer step, over all ranks together
max_iters = 80  # optimizer steps (80 x 32 = 2,560 of the demo's 14,596 pairs)
learning_rate = 2e-5  # chosen on the validation prompts: 1e-4 drifts further (KL 2.4) for less gold (docs/alignment.md)
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables
decay_lr = False  # True: cosine decay to min_lr after warmup
warmup_iters = 10
min_lr = 1e-5
attn_impl = "auto"  # 'manual' | 'sdpa' | 'triton' | 'auto' (sdpa); dropout is always 0 (log-probs must not be noisy)
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' (bfloat16 on a GPU that has it, else float32) | 'float32' | 'bfloat16' | 'float16'
backend = "auto"  # DDP backend: 'auto' (nccl on CUDA, gloo on CPU) | 'nccl' | 'gloo'
compile = False  # torch.compile the policy
seed = 1337  # batches and the held-out samples
# ----------------------------------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
runtime = setup_run(config, check_settings)  # settings and out_dir checked before any work; device, DDP, precision
master, ctx = runtime.is_master, runtime.autocast()
accum_per_rank = dist_utils.micro_steps_per_rank(gradient_accumulation_steps, runtime)

# ---- held-out prompts (the world's test and validation questions); the gold annotator judges replies, never trains
gold = GoldAnnotator(World(world_seed))
held_out, _ = ppo_prompt_sets(gold.world, prompt_seed, eval_prompts, validation_prompts, 0)

# ---- the models: policy and frozen reference from the SFT model; the reward model for the log only
start = ppo_start(init_from, out_dir, reward_model, held_out, attn_impl, runtime.device, critic=False)
config.update(init_from=start.sft_dir, reward_model=start.reward_dir, dtype=runtime.dtype)  # what a resume reloads
tokenizer, model_args, policy, reference = start.tokenizer, start.model_args, start.policy, start.reference
block_size = fit_block_size(block_size, model_args)
config.update(block_size=block_size)

# ---- preference pairs: training, and held out (by prompt); none may ask a held-out generation prompt
train_files, eval_files, note = preference_files(dataset, eval_dataset, data_dir, start.sft_dir)
train_pairs, eval_pair_list = load_preference_pairs(train_files, eval_files, val_fraction, pairs,
                                                    held_out["eval_"] + held_out["val_"])
train_encoded = encode_pairs(tokenizer, train_pairs, block_size)
eval_encoded = encode_pairs(tokenizer, eval_pair_list[:eval_pairs], block_size)
if master:
    print(f"[nanollm] loss={loss}, beta={beta}; {len(train_pairs)} training pairs from {train_files}, "
          f"{len(eval_encoded)} held-out pairs" + (f"\n[nanollm] note: {note}" if note else ""))

scaler = runtime.grad_scaler()
optimizer = configure_optimizer(policy, weight_decay, learning_rate, (beta1, beta2), runtime.device_type, master)
schedule = Schedule(learning_rate, warmup_iters, -1, max_iters, min_lr, "cosine" if decay_lr else "constant")
iter_num = restore_training_state(start.checkpoint, policy, optimizer, scaler, runtime)[0] \
    if init_from == "resume" else 0
if master:
    print(f"[nanollm] policy from {start.sft_dir} ({policy.num_parameters() / 1e6:.2f} M), iteration {iter_num}")
reward_net, start = start.reward_model, None
raw_policy = policy
policy = runtime.wrap(torch.compile(policy) if compile else policy)

# ---- held-out evaluations: the pairs (reference log-probs once) and generations on the test/validation prompts
pair_scores = HeldOutPairs(eval_encoded, reference, tokenizer, batch_size * 4, block_size, ctx)
evaluate = HeldOutEvaluation(held_out, tokenizer, model_args["block_size"] - max_new_tokens, eval_samples, reference,
                             reward_net, gold, max_new_tokens, temperature, eval_batch_size, seed, ctx)


def save(iter_num):  # the policy in the SFT format (chat.py, evaluate.py read it), the optimizer: resume is exact
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), runtime, policy, optimizer, scaler, iter_num, None, config,
                    model_args, stage="dpo")


# ---- the training loop
log = start_run(out_dir, runtime, init_from == "resume", iter_num, tokenizer.model_path, tensorboard,
                max_iters if not eval_only else 0, log_interval)  # out_dir is written from here on
stop = GracefulStop()  # Ctrl-C: finish the step, checkpoint, exit
step = GuardedStep(optimizer, scaler, grad_clip, runtime)  # clip; skip non-finite steps
t_start, train_time, train_cpu = time.time(), 0.0, 0.0  # wall and process CPU seconds in training steps
while not stop.requested(runtime, iter_num):
    # held-out pairs and generations (iteration 0: the SFT model itself), samples, checkpoint
    if evaluation_due(iter_num, eval_interval, max_iters, eval_only):
        if master:
            scores, samples = evaluate(raw_policy, is_reference=iter_num == 0)  # test prompts first: the result
            scores.update(pair_scores(raw_policy, loss, beta))
            log.write({"iter": iter_num, "phase": "eval", **scores, "train_s": train_time, "train_cpu_s": train_cpu})
            append_samples(os.path.join(out_dir, "samples.txt"), iter_num, samples)
            log.say(f"iter {iter_num}: {evaluate.describe(scores)}; held-out pairs: accuracy "
                    f"{scores['heldout_reward_accuracy']:.1%}, margin {scores['heldout_reward_margin']:+.3f}")
        if iter_num > 0 and not eval_only:
            save(iter_num)
        dist_utils.barrier(runtime)
    if iter_num >= max_iters or eval_only:
        break

    lr = schedule.set(optimizer, iter_num)
    t0, cpu0 = time.time(), time.process_time()
    policy.train()
    loss_sum, stats_sum = 0.0, {}
    for micro in range(accum_per_rank):
        batch = get_pair_batch(train_encoded, batch_size, seed, iter_num, runtime.rank * accum_per_rank + micro,
                               tokenizer.eos_id, tokenizer.pad_id, block_size, runtime.device)  # 2B rows
        with torch.no_grad(), evaluating(reference), ctx:
            ref_logprobs = sequence_logprobs(reference, batch).float()  # (2B,) log π_ref(y | x), frozen
        with dist_utils.no_sync_unless(policy, sync=(micro == accum_per_rank - 1)):
            with ctx:
                logprobs = sequence_logprobs(policy, batch).float()  # (2B,) log π(y | x)
            micro_loss, stats = preference_loss(logprobs, ref_logprobs, loss, beta)
            scaler.scale(micro_loss / accum_per_rank).backward()  # mean over the global batch (DDP averages ranks)
        loss_sum += micro_loss.item()
        stats_sum = {key: stats_sum.get(key, 0.0) + value / accum_per_rank for key, value in stats.items()}
    loss_mean = dist_utils.all_reduce_mean(loss_sum / accum_per_rank, runtime)
    grad_norm = step(policy, loss_mean, iter_num)  # unscale, clip to grad_clip, optimizer step (or skip)
    train_time, train_cpu = train_time + time.time() - t0, train_cpu + time.process_time() - cpu0

    record = {key: dist_utils.all_reduce_mean(value, runtime) for key, value in stats_sum.items()}
    log.step(iter_num, {"loss": loss_mean, **record, "lr": lr, "grad_norm": grad_norm,
                        "dt_ms": (time.time() - t0) * 1000}, shown=("loss", "reward_accuracy", "reward_margin"))
    iter_num += 1
log.close()
if stop.stopped:  # Ctrl-C: the checkpoint a resumed run starts from
    save(iter_num)
elif master and not eval_only:  # the end: the held-out sets before and after, and where the samples are
    print(f"[nanollm] {max_iters} {loss.upper()} iterations in {time.time() - t_start:.1f} s ({train_time:.1f} s "
          f"training); samples in {out_dir}/samples.txt\n{before_after_table(read_metrics(log.path))}")
dist_utils.end_run(runtime, stop.exit_code)  # a multi-process run exits here (with the stop's code)
stop.exit_if_stopped()
