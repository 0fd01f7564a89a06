"""GRPO and RLOO: G responses per prompt, each judged against its own group, so no critic is trained.

After SFT (and the reward model for reward='model': python train_sft.py; python train_rm.py), on a CPU or one GPU:
    python train_grpo.py                                          # GRPO on the reward model: out-sft + out-rm -> out-grpo
    python train_grpo.py --baseline=leave_one_out --out_dir=out-rloo   # RLOO: r − the mean of the other G − 1
    python train_grpo.py --reward=arithmetic --reward_model= --out_dir=out-grpo-arith   # verifiable reward, no RM
    python train_grpo.py --prompts=my_prompts.jsonl --reward_model=out-rm-mine   # your prompts, your reward model
    python train_grpo.py --init_from=resume                       # after a crash or Ctrl-C
The pieces (group advantages, the arithmetic check, the loss) are in nanollm/grpo.py; rollout, scoring and the
held-out evaluation are PPO's (nanollm/ppo.py). The policy is saved in the SFT format (python chat.py
--out_dir=out-grpo). Settings below: override with a config file and/or --key=value.
"""
import os
import sys
import time

import torch
from nanollm.annotators import GoldAnnotator, ppo_prompts
from nanollm.checkpoint import read_metrics, restore_training_state, save_checkpoint, start_run
from nanollm.configurator import configure
from nanollm.data import batch_seed
from nanollm.grpo import (arithmetic_prompt_sets, arithmetic_reward, check_settings, group_record, grpo_losses,
                          make_group_experience)
from nanollm.optim import configure_optimizer
from nanollm.ppo import (HeldOutEvaluation, append_samples, before_after_table, decode_responses, encode_prompts,
                         epochs_of_minibatches, mean, pick_prompts, ppo_start, reward_scores, rollout, score_rollout,
                         select, shape_scores)
from nanollm.training import GracefulStop, GuardedStep, evaluation_due, setup_run
from nanollm.world import World

# ------------------------------------------------------------------------------------------ settings
# I/O
out_dir = "out-grpo"  # checkpoints (the policy in the SFT format), metrics.jsonl, samples.txt, tokenizer
init_from = "out-sft"  # the policy's start and the frozen reference: an SFT out_dir | 'resume' (out_dir/ckpt.pt)
overwrite = False  # True: a fresh run may replace the run already in out_dir (else it refuses)
reward = "model"  # 'model': the reward model's score | 'arithmetic': 1 if the reply's number is right, else 0
reward_model = "out-rm"  # train_rm.py's out_dir (frozen); with reward='arithmetic' only measured; '' = none
eval_interval = 5  # held-out gold score, KL (rm score, arithmetic accuracy) and a checkpoint every this many iterations
log_interval = 1  # write a metrics.jsonl line every this many iterations
tensorboard = False  # also write every metrics.jsonl number as TensorBoard scalars in out_dir/tensorboard/
eval_only = False  # evaluate the starting policy once and exit
# prompts: three disjoint sets fixed by what they ask (world.question_split); 'arithmetic': arithmetic questions only
operations = "plus,minus,times"  # reward='arithmetic': the questions' operations ('times': the ones SFT sometimes gets)
prompts = ""  # reward='model': or a file of yours, .jsonl lines {"prompt": ...} or {"messages": [...]}, or a .json list
prompts_heldout_fraction = 0.2  # of a prompts file's distinct prompts, the last held out (eval_), as train_rm.py does
world_seed = 0  # the world the gold annotator checks facts against (pretraining uses World(0))
prompt_seed = 1337  # the questions' order and wording
eval_prompts = 160  # test prompts: the reported held-out result (eval_* metrics); never used to choose settings
validation_prompts = 160  # validation prompts: compare settings on these (val_* metrics)
eval_samples = 4  # responses sampled per held-out prompt (more: a less noisy held-out score)
train_prompts = 640  # training prompts, from the train set
# rollout: batch_size / group_size prompts per iteration, each answered group_size times
batch_size = 256  # responses per iteration (as train_ppo.py, so the two see the same number of samples)
group_size = 8  # G responses per prompt: the baseline of each is its group (GRPO's paper uses 64)
baseline = "group"  # 'group': GRPO, (r − mean) / (std + ε) | 'leave_one_out': RLOO, r − mean of the other G − 1
max_new_tokens = 32  # longest response; one that never emits eos is cut here (and penalized)
temperature = 1.0  # pure sampling from softmax(logits / temperature); the scoring pass uses the same temperature
eval_batch_size = 64  # held-out prompts per generation batch
missing_eos_penalty = 1.0  # subtracted from the reward of a response that never emits eos
# the update
kl_coef = 0.1  # β of the k3 KL to the reference in the loss (GRPO's paper: 0.04); 0 = no KL term
epochs = 2  # passes over each batch of rollouts
minibatch_size = 64  # responses per optimizer step
clip_range = 0.2  # ε of the clipped ratio
max_iters = 20  # iterations (rollout + update)
learning_rate = 2e-5  # AdamW, constant (as train_ppo.py's policy)
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables
attn_impl = "auto"  # 'manual' | 'sdpa' | 'triton' | 'auto' (sdpa); dropout is always 0 (it would make ratio != 1)
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' (bfloat16 on a GPU that has it, else float32) | 'float32' | 'bfloat16' | 'float16'
backend = "auto"  # unused: train_grpo.py runs in one process
seed = 1337  # prompts, samples and minibatch order of every iteration
# ----------------------------------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
runtime = setup_run(config, check_settings)  # settings and out_dir checked before any work; device, precision
ctx = runtime.autocast()

# ---- prompts: three disjoint sets (world.question_split), or a file split by prompt; the gold annotator judges
# replies (never in a loss) where every prompt is a world question (None otherwise)
if reward == "arithmetic":
    gold = GoldAnnotator(World(world_seed))
    held_out, train_questions = arithmetic_prompt_sets(gold.world, prompt_seed, eval_prompts, validation_prompts,
                                                       train_prompts, operations.split(","))
else:
    held_out, train_questions, gold = ppo_prompts(prompts, prompts_heldout_fraction, world_seed, prompt_seed,
                                                  eval_prompts, validation_prompts, train_prompts,
                                                  batch_size // group_size)

# ---- the models: policy and frozen reference from the SFT model; the frozen reward model; no critic
start = ppo_start(init_from, out_dir, reward_model, held_out, attn_impl, runtime.device, critic=False)
config.update(init_from=start.sft_dir, reward_model=start.reward_dir, dtype=runtime.dtype)  # what a resume reloads
tokenizer, model_args, policy, reference, reward_net = (start.tokenizer, start.model_args, start.policy,
                                                        start.reference, start.reward_model)
scaler = runtime.grad_scaler()
optimizer = configure_optimizer(policy, weight_decay, learning_rate, (beta1, beta2), runtime.device_type, True)
iter_num = restore_training_state(start.checkpoint, policy, optimizer, scaler, runtime)[0] \
    if init_from == "resume" else 0
print(f"[nanollm] {'GRPO' if baseline == 'group' else 'RLOO'} on the {reward} reward: policy from {start.sft_dir} "
      f"({policy.num_parameters() / 1e6:.2f} M), iteration {iter_num}; {len(train_questions)} prompts; gold judge: "
      + ("the world's gold annotator" if gold else "not available for user prompts"))

# ---- prompts, encoded; the held-out evaluation (each held-out prompt eval_samples times, a fixed seed)
reward_block = start.critic_args["block_size"] if start.critic_args else model_args["block_size"]
max_prompt_tokens = min(model_args["block_size"], reward_block) - max_new_tokens
start = None  # free memory
train_encoded = encode_prompts(tokenizer, train_questions, max_prompt_tokens)
evaluate = HeldOutEvaluation(held_out, tokenizer, max_prompt_tokens, eval_samples, reference, reward_net, gold,
                             max_new_tokens, temperature, eval_batch_size, seed, ctx,
                             verifier=arithmetic_reward if reward == "arithmetic" else None)


def save(iter_num):  # the policy in the SFT format, with the optimizer for an exact resume
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), runtime, policy, optimizer, scaler, iter_num, None, config,
                    model_args, stage="grpo")


# ---- the training loop
log = start_run(out_dir, runtime, init_from == "resume", iter_num, tokenizer.model_path, tensorboard,
                max_iters if not eval_only else 0, log_interval)  # out_dir is written from here on
stop = GracefulStop()  # Ctrl-C: finish the iteration, checkpoint, exit
policy_step = GuardedStep(optimizer, scaler, grad_clip, runtime)  # clip; skip non-finite steps
t_start, cpu_start, first_iter = time.time(), time.process_time(), iter_num
while not stop.requested(runtime, iter_num):
    # held-out evaluation (iteration 0: the SFT model itself), samples, checkpoint
    if evaluation_due(iter_num, eval_interval, max_iters, eval_only):
        scores, samples = evaluate(policy, is_reference=iter_num == 0)  # test prompts first: the result
        log.write({"iter": iter_num, "phase": "eval", **scores})
        append_samples(os.path.join(out_dir, "samples.txt"), iter_num, samples)
        log.say(f"iter {iter_num}: {evaluate.describe(scores)}")
        if iter_num > 0 and not eval_only:
            save(iter_num)
    if iter_num >= max_iters or eval_only:
        break

    # 1. rollout: batch_size / group_size prompts, each group_size times in a row (a pure function of seed, iteration)
    t0 = time.time()
    picked, sampler = pick_prompts(len(train_encoded), batch_size // group_size, group_size, seed, iter_num, 0,
                                   runtime.device)
    generated = rollout(policy, [train_encoded[i] for i in picked], max_new_tokens, temperature, tokenizer.eos_id,
                        tokenizer.pad_id, sampler)
    replies = decode_responses(tokenizer, generated)
    # 2. scoring pass (dropout off): old and reference log-probs; the rewards (B,)
    scored = score_rollout(policy, reference, None, generated, temperature, ctx)
    if reward == "model":
        raw_rewards = reward_scores(reward_net, generated, ctx)
    else:  # verifiable: the reply's number checked against the question's answer
        raw_rewards = torch.tensor([arithmetic_reward(train_questions[i], reply) for i, reply in zip(picked, replies)],
                                   device=runtime.device)
    rewards = shape_scores(raw_rewards, generated.ended, missing_eos_penalty)  # minus the penalty for no eos
    # 3. advantages from the group: GRPO (r − mean) / (std + ε), or RLOO r − mean of the others; on every token
    experience = make_group_experience(generated, scored, rewards, group_size, baseline)
    gold_scores = [gold.judge(train_questions[i], reply).overall  # logged only, never in a loss
                   for i, reply in zip(picked, replies)] if gold else []
    rollout_time = time.time() - t0

    # 4. the update: epochs passes over shuffled minibatches of the clipped surrogate + β·k3 KL
    t1 = time.time()
    policy.train()
    update_stats = []
    for rows in epochs_of_minibatches(batch_size, minibatch_size, epochs, batch_seed(seed, "grpo-shuffle", iter_num, 0)):
        batch, part = select(experience, rows.to(runtime.device), generated.prompt_length)
        with ctx:
            loss, stats = grpo_losses(policy, batch, part, temperature, clip_range, kl_coef)
        stats["grad_norm"] = policy_step.minimize(policy, loss, iter_num)
        update_stats.append(stats)
    update_time = time.time() - t1

    record = {**group_record(generated, scored, rewards, group_size), "raw_reward": raw_rewards.mean().item(),
              "gold": mean(gold_scores), "rollout_s": rollout_time, "update_s": update_time,
              **{key: mean([stats[key] for stats in update_stats]) for key in update_stats[0]}}
    log.step(iter_num, record, shown=("reward", "gold", "kl"))
    iter_num += 1
log.close()
if stop.stopped:  # Ctrl-C: the checkpoint a resumed run starts from
    save(iter_num)
elif not eval_only:  # the end: the held-out sets before and after, the time this run took
    keys = (("eval_score",) if reward_net is not None else ()) + (
        ("eval_accuracy", "val_accuracy") if reward == "arithmetic" else ()) + (
        "eval_gold", "eval_gold_gain", "eval_kl", "eval_response_length", "eval_eos_rate", "val_gold", "val_gold_gain",
        "val_kl")
    print(f"[nanollm] {max_iters - first_iter} iterations in {time.time() - t_start:.1f} s wall, "
          f"{time.process_time() - cpu_start:.1f} s CPU; samples in {out_dir}/samples.txt\n"
          f"{before_after_table(read_metrics(log.path), keys)}")
stop.exit_if_stopped()
