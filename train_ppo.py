"""RLHF with PPO: the SFT model learns to please the reward model while a KL penalty keeps it near the SFT model.

After SFT and the reward model (python train_sft.py; python train_rm.py), on a CPU, one GPU or Apple MPS:
    python train_ppo.py                                         # out-sft + out-rm -> out-ppo, held-out gold score
    python train_ppo.py --init_kl_coef=0.0 --out_dir=out-ppo-b0  # no KL penalty: watch the reward model get hacked
    python train_ppo.py --target_kl=0.5                         # adaptive beta (Ziegler et al. 2019)
    torchrun --standalone --nproc_per_node=4 train_ppo.py --batch_size=64   # DDP: 4 x 64 = 256 responses per iteration
    python train_ppo.py --init_from=resume                      # after a crash or Ctrl-C
    python train_ppo.py --prompts=my_prompts.jsonl --reward_model=out-rm-mine   # your prompts, your reward model
The pieces (rollout, scoring, rewards, GAE, losses) are in nanollm/ppo.py; this file is the loop. The policy is saved
in the SFT format (python chat.py --out_dir=out-ppo). Settings below: override with a config file and/or --key=value.
"""
import os
import sys
import time

import torch
from nanollm import distributed as dist_utils
from nanollm.annotators import ppo_prompts
from nanollm.checkpoint import read_metrics, start_run
from nanollm.configurator import configure
from nanollm.data import batch_seed
from nanollm.optim import configure_optimizer
from nanollm.ppo import (HeldOutEvaluation, append_samples, batch_record, before_after_table, check_settings,
                         decode_responses, encode_prompts, epochs_of_minibatches, kl_controller, make_experience,
                         mean, pick_prompts, ppo_losses, ppo_start, restore_ppo, reward_scores, rollout, save_ppo,
                         score_rollout, select, sequence_sum, shape_scores)
from nanollm.training import GracefulStop, GuardedStep, evaluation_due, setup_run

# ------------------------------------------------------------------------------------------ settings
# I/O
out_dir = "out-ppo"  # checkpoints (policy in the SFT format + critic), metrics.jsonl, samples.txt, tokenizer
init_from = "out-sft"  # the policy's start and the frozen reference: an SFT out_dir | 'resume' (out_dir/ckpt.pt)
overwrite = False  # True: a fresh run may replace the run already in out_dir (else it refuses)
reward_model = "out-rm"  # train_rm.py's out_dir: the reward model (frozen) and the critic's starting point
eval_interval = 5  # held-out rm score, gold score, KL, a few samples (and a checkpoint) every this many iterations
log_interval = 1  # write a metrics.jsonl line every this many iterations
tensorboard = False  # also write every metrics.jsonl number as TensorBoard scalars in out_dir/tensorboard/
eval_only = False  # evaluate the starting policy once and exit
# prompts: world questions, never their answers, from three disjoint sets fixed by what they ask (world.question_split)
prompts = ""  # or a file of yours: .jsonl lines {"prompt": ...} or {"messages": [...]}, or a .json list of them
prompts_heldout_fraction = 0.2  # of a prompts file's distinct prompts, the last held out (eval_), as train_rm.py does
world_seed = 0  # the world the gold annotator checks facts against (pretraining uses World(0))
prompt_seed = 1337  # the questions' order and wording
eval_prompts = 160  # test prompts: the reported held-out result (eval_* metrics); never used to choose settings
validation_prompts = 160  # validation prompts: compare settings on these (val_* metrics), not on the test prompts
eval_samples = 4  # responses sampled per held-out prompt (more: a less noisy held-out gold score)
train_prompts = 640  # training prompts, from the train set (the reward model trains on the same set)
# rollout
batch_size = 256  # responses per iteration per rank; large: with 32 the policy drifts on noise (docs/rlhf.md)
samples_per_prompt = 1  # responses sampled per prompt (batch_size / this prompts per iteration)
score_baseline = "none"  # 'none' | 'others_mean': score − the mean of the prompt's other scores (the critic stays)
max_new_tokens = 32  # longest response; one that never emits eos is cut here (and penalized)
temperature = 1.0  # pure sampling from softmax(logits / temperature); the scoring pass uses the same temperature
eval_batch_size = 64  # held-out prompts per generation batch
# reward: score at eos − β·KL per token
kl_estimator = "k1"  # the per-token KL in the reward: 'k1' = log π − log π_ref only (k3 there biases the gradient)
init_kl_coef = 0.2  # β (its start, if adaptive); 0 = no KL penalty
target_kl = 0.0  # > 0: adaptive β towards this KL per response in nats (Ziegler et al. 2019); 0: β fixed
kl_horizon = 1000  # adaptive β: over this many responses, β changes by at most about ±20%
missing_eos_penalty = 1.0  # subtracted from the score of a response that never emits eos
score_clip = 0.0  # clip reward-model scores to ±this; 0 = off
whiten_rewards = False  # scale per-token rewards to unit variance over the batch (mean kept)
# PPO update
ppo_epochs = 2  # passes over each batch of rollouts
minibatch_size = 64  # responses per optimizer step (per rank)
gamma = 1.0  # discount (1: the episode is one short response)
lam = 0.95  # GAE λ: 0 = one-step TD error, 1 = Monte-Carlo return − V
clip_range = 0.2  # ε of the clipped ratio
value_clip_range = 0.2  # ε of the clipped value loss; 0 = unclipped
entropy_coef = 0.0  # entropy bonus coefficient
whiten_advantages = True  # normalize advantages over the batch's valid tokens
early_stop_kl = 0.0  # end the update at the first minibatch whose approx KL(π_old‖π) exceeds this; 0 = never
critic_warmup_iters = 0  # the first this many iterations train the critic only (the policy waits for good values)
max_iters = 20  # PPO iterations (rollout + update)
learning_rate = 2e-5  # policy (AdamW, constant)
critic_learning_rate = 1e-4  # critic (AdamW, constant)
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip each network's global gradient norm to this; 0 disables
attn_impl = "auto"  # 'manual' | 'sdpa' | 'triton' | 'auto' (sdpa); dropout is always 0 (it would make ratio != 1)
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' (bfloat16 on a GPU that has it, else float32) | 'float32' | 'bfloat16' | 'float16'
backend = "auto"  # DDP backend: 'auto' (nccl on CUDA, gloo on CPU) | 'nccl' | 'gloo'
compile = False  # torch.compile the policy and critic for the update (rollouts use the plain modules)
seed = 1337  # prompts, samples and minibatch order of every iteration
# ----------------------------------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
runtime = setup_run(config, check_settings)  # settings and out_dir checked before any work; device, DDP, precision
master, ctx = runtime.is_master, runtime.autocast()

# ---- prompts: world questions from three disjoint sets, or a file split by prompt; gold: evaluation only, never in a
# loss, and only where every prompt is a world question (None otherwise: the reward model's score is the only one)
held_out, train_questions, gold = ppo_prompts(prompts, prompts_heldout_fraction, world_seed, prompt_seed, eval_prompts,
                                              validation_prompts, train_prompts,
                                              batch_size // samples_per_prompt * runtime.world_size)

# ---- the models: policy and frozen reference from the SFT model; frozen reward model and critic from train_rm.py's
start = ppo_start(init_from, out_dir, reward_model, held_out, attn_impl, runtime.device)
config.update(init_from=start.sft_dir, reward_model=start.reward_dir, dtype=runtime.dtype)  # what a resume reloads
tokenizer, model_args, critic_args = start.tokenizer, start.model_args, start.critic_args
policy, reference, critic, reward_net = start.policy, start.reference, start.critic, start.reward_model
scaler, critic_scaler = runtime.grad_scaler(), runtime.grad_scaler()
optimizer = configure_optimizer(policy, weight_decay, learning_rate, (beta1, beta2), runtime.device_type, master)
critic_optimizer = configure_optimizer(critic, weight_decay, critic_learning_rate, (beta1, beta2), runtime.device_type)
controller = kl_controller(init_kl_coef, target_kl, kl_horizon)  # β: fixed, or adaptive towards target_kl
iter_num = restore_ppo(start.checkpoint, runtime, policy, critic, optimizer, critic_optimizer, scaler, critic_scaler,
                       controller) if init_from == "resume" else 0
if master:
    print(f"[nanollm] policy from {start.sft_dir} ({policy.num_parameters() / 1e6:.2f} M), critic from "
          f"{start.reward_dir}; iteration {iter_num}, beta {controller.beta:.4f}; {len(train_questions)} prompts\n"
          f"[nanollm] gold judge: " + ("the world's gold annotator" if gold else "not available for user prompts"))
start = None  # free memory
raw_policy, raw_critic = policy, critic  # rollouts use the plain modules; DDP (every parameter in each loss)
policy, critic = (runtime.wrap(torch.compile(m) if compile else m) for m in (policy, critic))

# ---- prompts, encoded; the held-out evaluation (each held-out prompt eval_samples times, a fixed seed)
max_prompt_tokens = min(model_args["block_size"], critic_args["block_size"]) - max_new_tokens
train_encoded = encode_prompts(tokenizer, train_questions, max_prompt_tokens)
evaluate = HeldOutEvaluation(held_out, tokenizer, max_prompt_tokens, eval_samples, reference, reward_net, gold,
                             max_new_tokens, temperature, eval_batch_size, seed, ctx)


def save(iter_num):  # the policy (in the SFT format), the critic, both optimizers and β
    save_ppo(os.path.join(out_dir, "ckpt.pt"), runtime, policy, critic, optimizer, critic_optimizer, scaler,
             critic_scaler, controller, iter_num, config, model_args, critic_args)


# ---- the training loop
log = start_run(out_dir, runtime, init_from == "resume", iter_num, tokenizer.model_path, tensorboard,
                max_iters if not eval_only else 0, log_interval)  # out_dir is written from here on
stop = GracefulStop()  # Ctrl-C: finish the iteration, checkpoint, exit
policy_step = GuardedStep(optimizer, scaler, grad_clip, runtime)  # clip; skip non-finite steps
critic_step = GuardedStep(critic_optimizer, critic_scaler, grad_clip, runtime)
t_start = time.time()
while not stop.requested(runtime, iter_num):
    # held-out evaluation (iteration 0: the SFT model itself), samples, checkpoint
    if evaluation_due(iter_num, eval_interval, max_iters, eval_only):
        if master:
            scores, samples = evaluate(raw_policy, is_reference=iter_num == 0)  # test prompts first: the result
            log.write({"iter": iter_num, "phase": "eval", **scores})
            append_samples(os.path.join(out_dir, "samples.txt"), iter_num, samples)
            log.say(f"iter {iter_num}: {evaluate.describe(scores)}")
        if iter_num > 0 and not eval_only:
            save(iter_num)
        dist_utils.barrier(runtime)
    if iter_num >= max_iters or eval_only:
        break

    # 1. rollout: this rank's prompts and samples, a pure function of (seed, iteration, rank): resume is exact
    t0 = time.time()
    picked, sampler = pick_prompts(len(train_encoded), batch_size // samples_per_prompt, samples_per_prompt, seed,
                                   iter_num, runtime.rank, runtime.device)
    generated = rollout(raw_policy, [train_encoded[i] for i in picked], max_new_tokens, temperature,
                        tokenizer.eos_id, tokenizer.pad_id, sampler)
    # 2. scoring pass (dropout off): old log-probs, reference log-probs, values, reward-model scores
    scored = score_rollout(raw_policy, reference, raw_critic, generated, temperature, ctx)
    raw_scores = reward_scores(reward_net, generated, ctx)  # (B,)
    scores = shape_scores(raw_scores, generated.ended, missing_eos_penalty, score_clip,
                          samples_per_prompt if score_baseline == "others_mean" else 0)
    # 3. rewards (score at eos − β·kl_t), GAE advantages and returns
    beta = controller.beta
    experience = make_experience(generated, scored["logprobs"], scored["ref_logprobs"], scored["values"], scores,
                                 beta, kl_estimator, gamma, lam, whiten_rewards, whiten_advantages)
    gold_scores = [gold.judge(train_questions[i], reply).overall  # logged only, never in a loss
                   for i, reply in zip(picked, decode_responses(tokenizer, generated))] if gold else []
    rollout_time = time.time() - t0

    # 4. the update: ppo_epochs passes over shuffled minibatches; each network steps on its own loss
    t1 = time.time()
    policy.train(), critic.train()
    update_stats, steps, early_stop = [], 0, False
    shuffle_seed = batch_seed(seed, "ppo-shuffle", iter_num, runtime.rank)
    for rows in epochs_of_minibatches(batch_size, minibatch_size, ppo_epochs, shuffle_seed):
        batch, part = select(experience, rows.to(runtime.device), generated.prompt_length)
        with ctx:  # clipped surrogate −E[min(ρA, clip(ρ, 1±ε)A)], clipped value loss, entropy (Schulman et al. 2017)
            policy_objective, critic_loss, stats = ppo_losses(policy, critic, batch, part, temperature, clip_range,
                                                              value_clip_range, entropy_coef)
        # approx KL(π_old‖π), measured BEFORE the step: past the limit the update ends here, on every rank
        early_stop = early_stop_kl > 0 and dist_utils.any_rank(stats["approx_kl"] > early_stop_kl, runtime)
        if early_stop:
            update_stats = update_stats or [dict(stats, grad_norm=0.0, critic_grad_norm=0.0)]  # what was measured
            break
        # during the critic's warm-up the policy takes no step
        stats["grad_norm"] = policy_step.minimize(policy, policy_objective, iter_num) \
            if iter_num >= critic_warmup_iters else 0.0
        stats["critic_grad_norm"] = critic_step.minimize(critic, critic_loss, iter_num)
        update_stats.append(stats)
        steps += 1
    update_time = time.time() - t1

    # 5. β for the next iteration, from the KL per response averaged over all ranks
    sequence_kl = sequence_sum(experience["kl"], generated.response_mask)  # (B,) Σ_t kl_t
    kl_mean = dist_utils.all_reduce_mean(sequence_kl.mean().item(), runtime)
    controller.update(kl_mean, batch_size * runtime.world_size)

    # log (means over this rank's batch, then over ranks)
    record = {**batch_record(generated, scored, experience, raw_scores, scores, sequence_kl, beta),
              **({"gold": mean(gold_scores)} if gold else {}), "minibatches": steps, "rollout_s": rollout_time,
              "update_s": update_time,
              **{key: mean([stats[key] for stats in update_stats]) for key in update_stats[0]}}
    record = {key: dist_utils.all_reduce_mean(value, runtime) for key, value in record.items()}
    log.step(iter_num, {**record, "kl": kl_mean, "beta": beta, "early_stop": early_stop},
             shown=("score", "gold", "kl") if gold else ("score", "kl"))
    iter_num += 1
log.close()
if stop.stopped:  # Ctrl-C: the checkpoint a resumed run starts from
    save(iter_num)
elif master and not eval_only:  # the end: the held-out sets before and after, and where the samples are
    print(f"[nanollm] {max_iters} PPO iterations in {time.time() - t_start:.1f} s; final beta {controller.beta:.4f}; "
          f"samples in {out_dir}/samples.txt\n{before_after_table(read_metrics(log.path))}")
dist_utils.end_run(runtime, stop.exit_code)  # a multi-process run exits here (with the stop's code)
stop.exit_if_stopped()
