"""RLHF with PPO: the SFT model learns to please the reward model while a KL penalty keeps it near the SFT model.

After SFT and the reward model (python train_sft.py; python train_rm.py), one process (CPU, one GPU, or Apple MPS):
    python train_ppo.py                                         # out-sft + out-rm -> out-ppo, held-out gold score
    python train_ppo.py --init_kl_coef=0.0 --out_dir=out-ppo-b0  # no KL penalty: watch the reward model get hacked
    python train_ppo.py --target_kl=0.5                         # adaptive beta (Ziegler et al. 2019)
N processes with DDP (each rank samples its own prompts; one per GPU, gloo on CPU):
    torchrun --standalone --nproc_per_node=4 train_ppo.py --batch_size=64   # the same 256 responses per iteration
Resume after a crash or Ctrl-C:
    python train_ppo.py --init_from=resume
Talk to the result: python chat.py --out_dir=out-ppo (the policy is saved in the SFT checkpoint format).
The pieces (rollout, scoring, rewards, GAE, losses) are in nanollm/ppo.py; this file is the loop.
Settings below are plain variables; override them with a config file and/or --key=value.
"""
import filecmp
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nanollm import distributed as dist_utils
from nanollm.annotators import GoldAnnotator, feedback_prompts
from nanollm.checkpoint import (check_out_dir, load_checkpoint, read_metrics, restore_training_state, save_checkpoint,
                                start_run)
from nanollm.configurator import UserError, check_ranges, configure
from nanollm.data import batch_seed
from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig
from nanollm.optim import configure_optimizer
from nanollm.ppo import (REWARD_KL_ESTIMATORS, AdaptiveKLController, Critic, FixedKLController, decode_responses,
                         encode_prompts, explained_variance, kl_estimate, leave_one_out, make_experience, mean,
                         minibatches, ppo_losses, prompts_in, reward_scores, rollout, score_rollout, select,
                         sequence_sum, shape_scores)
from nanollm.tokenizer import Tokenizer
from nanollm.training import GracefulStop, GuardedStep
from nanollm.world import World

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
world_seed = 0  # the world the gold annotator checks facts against (pretraining uses World(0))
prompt_seed = 1337  # the questions' order and wording
eval_prompts = 160  # test prompts: the reported held-out result (eval_* metrics); never used to choose settings
validation_prompts = 160  # validation prompts: compare settings on these (val_* metrics), not on the test prompts
eval_samples = 4  # responses sampled per held-out prompt (more: a less noisy held-out gold score)
train_prompts = 640  # training prompts, from the train set (the reward model trains on the same set)
# rollout
batch_size = 256  # responses per iteration per rank; large: with 32 the policy drifts on noise (README, stage 4)
samples_per_prompt = 1  # responses sampled per prompt (batch_size / this prompts per iteration)
score_baseline = "none"  # 'none' | 'others_mean': score − the mean score of the prompt's other responses (centres
# each prompt's scores; the critic stays, so this is not RLOO, which replaces the critic by that baseline)
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
early_stop_kl = 0.0  # end the update at the first minibatch whose approx KL(π_old‖π) exceeds this, without its
# step (minibatches = the steps taken); 0 = never
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
seed = 1337
# ----------------------------------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
check_ranges(config, positive=("batch_size", "minibatch_size", "ppo_epochs", "eval_interval", "log_interval",
                               "max_new_tokens", "eval_batch_size", "eval_samples", "train_prompts", "eval_prompts",
                               "validation_prompts"),
             non_negative=("max_iters", "learning_rate", "critic_learning_rate", "weight_decay", "grad_clip",
                           "init_kl_coef"))
check_out_dir(out_dir, init_from == "resume", overwrite)  # nothing in out_dir changes before the loop starts

# ---- setup: device, DDP, precision; settings checked before any work
runtime = dist_utils.setup(device, backend)
master = runtime.is_master
dtype = dist_utils.resolve_dtype(dtype, runtime.device_type)
if kl_estimator not in REWARD_KL_ESTIMATORS:
    raise UserError(f"kl_estimator={kl_estimator!r}: the reward's KL must be one of {REWARD_KL_ESTIMATORS}" +
                    (" (k3's value is unbiased, its policy gradient is not; k3 belongs in a loss: ppo.k3_kl_loss)"
                     if kl_estimator == "k3" else ""))
if temperature <= 0:
    raise UserError(f"temperature={temperature}: PPO samples, so it must be > 0")
if samples_per_prompt < 1 or batch_size % samples_per_prompt:
    raise UserError(f"batch_size={batch_size} must be a multiple of samples_per_prompt={samples_per_prompt}")
if score_baseline == "leave_one_out":
    raise UserError("score_baseline='leave_one_out' is now 'others_mean': it centres scores on the prompt's other "
                    "responses while the critic stays, which is not RLOO")
if score_baseline not in ("none", "others_mean") or (score_baseline != "none" and samples_per_prompt < 2):
    raise UserError(f"score_baseline={score_baseline!r}: expected 'none', or 'others_mean' with "
                     f"samples_per_prompt >= 2 (got {samples_per_prompt})")
if not 1 <= minibatch_size <= batch_size:
    raise UserError(f"minibatch_size={minibatch_size} must be between 1 and batch_size={batch_size}")
if batch_size // samples_per_prompt * runtime.world_size > train_prompts:
    raise UserError(f"batch_size={batch_size} / samples_per_prompt={samples_per_prompt} x {runtime.world_size} "
                     f"rank(s) prompts per iteration exceed train_prompts={train_prompts}")
if master:
    print(f"[nanollm] device={runtime.device} dtype={dtype} world_size={runtime.world_size}")
ctx = dist_utils.autocast(runtime.device_type, dtype)

# ---- prompts: world questions from three disjoint sets (world.question_split); the gold annotator judges replies
world = World(world_seed)
gold = GoldAnnotator(world)
try:
    held_out = {"eval_": feedback_prompts(world, eval_prompts, prompt_seed, "test"),  # metrics prefix -> questions
                "val_": feedback_prompts(world, validation_prompts, prompt_seed, "validation")}
    train_questions = feedback_prompts(world, train_prompts, prompt_seed, "train")
except ValueError as error:  # more prompts asked for than a set holds
    raise UserError(f"eval_prompts={eval_prompts}, validation_prompts={validation_prompts}, train_prompts="
                    f"{train_prompts}: {error}") from None

# ---- the models: policy and reference from the SFT checkpoint, reward model and critic from train_rm.py's
# loaded to the CPU: RNG states must stay CPU tensors; weights and optimizer states move to their parameters' device
checkpoint = load_checkpoint(os.path.join(out_dir if init_from == "resume" else init_from, "ckpt.pt"), "cpu")
if init_from == "resume":
    sft_dir, reward_dir = checkpoint["config"]["init_from"], checkpoint["config"]["reward_model"]
    tokenizer_path = os.path.join(out_dir, "tokenizer.model")
    sft_checkpoint = load_checkpoint(os.path.join(sft_dir, "ckpt.pt"), "cpu")
else:
    if checkpoint.get("stage") == "reward":
        raise UserError(f"init_from={init_from!r} holds a reward model; start from an SFT out_dir or use 'resume'")
    sft_dir, reward_dir = init_from, reward_model
    tokenizer_path = os.path.join(init_from, "tokenizer.model")
    sft_checkpoint = checkpoint
config.update(init_from=sft_dir, reward_model=reward_dir)  # what a resumed run reloads
tokenizer = Tokenizer(tokenizer_path)
reward_net, _, _, reward_checkpoint = load_model(os.path.join(reward_dir, "ckpt.pt"), runtime.device, kinds=("reward",))
reward_net.requires_grad_(False)
# held out means held out: the reward model must not have trained on a validation or test prompt
if "trained_prompts" not in reward_checkpoint:
    raise UserError(f"{reward_dir}/ckpt.pt does not record the prompts the reward model trained on, so the held-out "
                    f"prompts cannot be checked; retrain it with train_rm.py")
seen = prompts_in(held_out["eval_"] + held_out["val_"], reward_checkpoint["trained_prompts"])
if seen:
    raise UserError(f"{reward_dir}: the reward model trained on {len(seen)} of the {eval_prompts} test + "
                    f"{validation_prompts} validation prompts (e.g. {seen[0]!r}), so they are not held out; train it "
                    f"on the world's train questions (train_rm.py's demo does) or drop these prompts from its data")
if reward_checkpoint.get("backbone", "gpt") != "gpt":
    raise UserError(f"{reward_dir}: a {reward_checkpoint['backbone']!r} reward model cannot initialize the critic, "
                     f"which must be causal (one value per prefix); train the reward model with backbone='sft'")
if not filecmp.cmp(tokenizer_path, os.path.join(reward_dir, "tokenizer.model"), shallow=False):
    raise UserError(f"{reward_dir}/tokenizer.model differs from {tokenizer_path}: the reward model must read the "
                     f"policy's tokens")
if attn_impl == "auto":
    attn_impl = "sdpa"
model_args = dict(checkpoint["model_args"], dropout=0.0, attn_impl=attn_impl)
critic_args = dict(reward_checkpoint["model_args"], dropout=0.0, attn_impl=attn_impl)
if critic_args["vocab_size"] != model_args["vocab_size"]:
    raise UserError(f"reward model vocab_size={critic_args['vocab_size']} != policy vocab_size="
                     f"{model_args['vocab_size']}")
max_prompt_tokens = min(model_args["block_size"], critic_args["block_size"]) - max_new_tokens

policy = GPT(GPTConfig(**model_args)).to(runtime.device)
reference = GPT(GPTConfig(**model_args)).to(runtime.device)
reference.load_state_dict(sft_checkpoint["model"])
reference.requires_grad_(False).eval()  # frozen: the SFT model the KL is measured against
critic = Critic.from_reward_model(reward_net, GPTConfig(**critic_args)).to(runtime.device)
scaler = dist_utils.grad_scaler(runtime.device_type, dtype)
critic_scaler = dist_utils.grad_scaler(runtime.device_type, dtype)
optimizer = configure_optimizer(policy, weight_decay, learning_rate, (beta1, beta2), runtime.device_type, master)
critic_optimizer = configure_optimizer(critic, weight_decay, critic_learning_rate, (beta1, beta2),
                                       runtime.device_type, master)
controller = AdaptiveKLController(init_kl_coef, target_kl, kl_horizon) if target_kl > 0 else \
    FixedKLController(init_kl_coef)
iter_num = 0
if init_from == "resume":
    iter_num, _ = restore_training_state(checkpoint, policy, optimizer, scaler, runtime)
    critic.load_state_dict(checkpoint["critic"])
    critic_optimizer.load_state_dict(checkpoint["critic_optimizer"])
    critic_scaler.load_state_dict(checkpoint["critic_scaler"])
    controller.beta = checkpoint["beta"]
    if master:
        print(f"[nanollm] resumed from {out_dir}/ckpt.pt at iteration {iter_num} (beta {controller.beta:.4f})")
else:
    policy.load_state_dict(checkpoint["model"])
    if master:
        print(f"[nanollm] policy and reference from {init_from}/ckpt.pt ({policy.num_parameters() / 1e6:.2f} M "
              f"parameters); reward model and critic from {reward_dir}/ckpt.pt")
checkpoint = sft_checkpoint = reward_checkpoint = None  # free memory
raw_policy, raw_critic = policy, critic
if compile:
    print("[nanollm] compiling the policy and the critic with torch.compile")
    policy, critic = torch.compile(policy), torch.compile(critic)
if runtime.ddp:  # every parameter takes part in each loss (lm_head is tied to wte), so no unused ones
    device_ids = [runtime.local_rank] if runtime.device_type == "cuda" else None
    policy, critic = DDP(policy, device_ids=device_ids), DDP(critic, device_ids=device_ids)

# ---- prompts, encoded; each held-out prompt eval_samples times
held_out_encoded = {prefix: encode_prompts(tokenizer, questions, max_prompt_tokens) * eval_samples
                    for prefix, questions in held_out.items()}
train_encoded = encode_prompts(tokenizer, train_questions, max_prompt_tokens)
if master:
    print(f"[nanollm] prompts: {len(train_questions)} training, {validation_prompts} validation, {eval_prompts} test; "
          f"batch {batch_size} x {runtime.world_size} rank(s), {ppo_epochs} epochs of minibatches of {minibatch_size}")


def judge(asked, replies):
    """The gold annotator's overall score (1-5) of each reply: evaluation only, never in a loss."""
    return [gold.judge(question, reply).overall for question, reply in zip(asked, replies)]


@torch.no_grad()
def evaluate(model, prefix):
    """One held-out set ('eval_': test, 'val_': validation), eval_samples responses per prompt (pure sampling, fixed
    seed): reward-model score, gold score, KL to the reference, length, eos rate. Rank 0 only, with the plain modules.
    Returns (scores, samples, (prompts,) mean gold per prompt)."""
    questions, encoded = held_out[prefix], held_out_encoded[prefix]
    generator = torch.Generator(device=runtime.device).manual_seed(seed)
    scores, golds, kls, lengths, ended, samples = [], [], [], [], [], []
    for start in range(0, len(encoded), eval_batch_size):
        generated = rollout(model, encoded[start:start + eval_batch_size], max_new_tokens, temperature,
                            tokenizer.eos_id, tokenizer.pad_id, generator)
        scored = score_rollout(model, reference, None, generated, temperature, ctx)
        kl = kl_estimate(scored["logprobs"], scored["ref_logprobs"], kl_estimator)
        replies = decode_responses(tokenizer, generated)
        batch_scores = reward_scores(reward_net, generated, ctx).tolist()
        asked = [questions[i % len(questions)] for i in range(start, start + len(replies))]
        batch_golds = judge(asked, replies)
        scores += batch_scores
        golds += batch_golds
        kls += sequence_sum(kl, generated.response_mask).tolist()
        lengths += generated.response_mask.sum(-1).tolist()
        ended += generated.ended.float().tolist()
        samples += list(zip(asked, replies, batch_scores, batch_golds))
    per_prompt = torch.tensor(golds).view(eval_samples, len(questions)).mean(0)  # (prompts,) mean gold
    return {f"{prefix}score": mean(scores), f"{prefix}gold": mean(golds),
            f"{prefix}gold_se": (per_prompt.std() / len(questions) ** 0.5).item(),  # standard error over prompts
            f"{prefix}kl": mean(kls), f"{prefix}response_length": mean(lengths), f"{prefix}eos_rate": mean(ended)}, \
        samples, per_prompt


reference_golds = {}  # per held-out set: the SFT model's per-prompt gold on the same seeded samples (the baseline)


def gold_gain(per_prompt, prefix):
    """Gold gain over the SFT model on the same prompts, sampled with the same seed (common random numbers), and
    its paired standard error: mean and std/√n of the per-prompt differences."""
    if prefix not in reference_golds:
        reference_golds[prefix] = per_prompt if iter_num == 0 else evaluate(reference, prefix)[2]
    difference = per_prompt - reference_golds[prefix]  # (prompts,)
    return {f"{prefix}gold_gain": difference.mean().item(),
            f"{prefix}gold_gain_se": (difference.std() / len(difference) ** 0.5).item()}


def write_samples(iter_num, samples, count=6):
    with open(os.path.join(out_dir, "samples.txt"), "a", encoding="utf-8") as f:
        f.write(f"=== iteration {iter_num}: held-out prompts ===\n")
        for question, reply, score, gold_score in samples[:count]:
            f.write(f"Q: {question}\nA: {reply}\n   reward model {score:+.3f}, gold {gold_score:.2f}\n")


def save(iter_num):
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), runtime, policy, optimizer, scaler, iter_num, None, config,
                    model_args, stage="ppo", critic=raw_critic.state_dict(), critic_args=critic_args,
                    critic_optimizer=critic_optimizer.state_dict(), critic_scaler=critic_scaler.state_dict(),
                    beta=controller.beta)


# ---- the training loop
log = start_run(out_dir, runtime, init_from == "resume", iter_num, tokenizer_path,
                tensorboard=tensorboard)  # out_dir is written from here on
progress = tqdm(total=max_iters, initial=iter_num, disable=not master or eval_only, dynamic_ncols=True)
stop = GracefulStop()  # Ctrl-C: finish the iteration, checkpoint, exit
policy_step = GuardedStep(optimizer, scaler, grad_clip, runtime, dtype)  # clip; skip non-finite steps
critic_step = GuardedStep(critic_optimizer, critic_scaler, grad_clip, runtime, dtype)
stopped = False
t_start = time.time()
while True:
    if stop.requested(runtime):
        stopped = True
        if master:
            tqdm.write(f"[nanollm] stop requested: checkpoint at iteration {iter_num}; resume with --init_from=resume")
        save(iter_num)
        break

    # held-out evaluation (iteration 0: the SFT model itself), samples, checkpoint
    if iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only:
        if master:
            scores, samples, per_prompt = evaluate(raw_policy, "eval_")  # the test prompts: the reported result
            scores.update(gold_gain(per_prompt, "eval_"))
            validation, _, per_prompt = evaluate(raw_policy, "val_")  # validation prompts: for choosing settings
            scores.update(validation, **gold_gain(per_prompt, "val_"))
            log.write({"iter": iter_num, "phase": "eval", **scores})
            write_samples(iter_num, samples)
            tqdm.write(f"iter {iter_num}: test reward-model score {scores['eval_score']:+.3f}, gold "
                       f"{scores['eval_gold']:.3f} (gain {scores['eval_gold_gain']:+.3f} ± "
                       f"{scores['eval_gold_gain_se']:.3f}), KL {scores['eval_kl']:.3f}, length "
                       f"{scores['eval_response_length']:.1f}, eos rate {scores['eval_eos_rate']:.2f}; validation "
                       f"gold gain {scores['val_gold_gain']:+.3f} ± {scores['val_gold_gain_se']:.3f}")
        if iter_num > 0 and not eval_only:
            save(iter_num)
        dist_utils.barrier(runtime)
    if iter_num >= max_iters or eval_only:
        break

    # 1. rollout: one shuffle of the prompts per iteration, each rank its own slice; prompts and samples are a pure
    # function of (seed, iteration, rank), so resume is exact
    t0 = time.time()
    picker = torch.Generator().manual_seed(batch_seed(seed, "ppo-prompts", iter_num, 0))
    n_prompts = batch_size // samples_per_prompt
    picked = torch.randperm(len(train_encoded), generator=picker)[runtime.rank * n_prompts:][:n_prompts]
    picked = picked.repeat_interleave(samples_per_prompt).tolist()  # each prompt samples_per_prompt times in a row
    sampler = torch.Generator(device=runtime.device).manual_seed(batch_seed(seed, "ppo-samples", iter_num,
                                                                            runtime.rank))
    generated = rollout(raw_policy, [train_encoded[i] for i in picked], max_new_tokens, temperature,
                        tokenizer.eos_id, tokenizer.pad_id, sampler)
    # 2. scoring pass (dropout off): old log-probs, reference log-probs, values, reward-model scores
    scored = score_rollout(raw_policy, reference, raw_critic, generated, temperature, ctx)
    raw_scores = reward_scores(reward_net, generated, ctx)  # (B,)
    scores = shape_scores(raw_scores, generated.ended, missing_eos_penalty, score_clip)
    if score_baseline == "others_mean":
        scores = leave_one_out(scores, samples_per_prompt)
    # 3. rewards (score at eos − β·kl_t), GAE advantages and returns
    beta = controller.beta
    experience = make_experience(generated, scored["logprobs"], scored["ref_logprobs"], scored["values"], scores,
                                 beta, kl_estimator, gamma, lam, whiten_rewards, whiten_advantages)
    mask = generated.response_mask
    gold_scores = judge([train_questions[i] for i in picked], decode_responses(tokenizer, generated))
    rollout_time = time.time() - t0

    # 4. the update: ppo_epochs passes over shuffled minibatches; each network steps on its own loss
    t1 = time.time()
    policy.train(), critic.train()
    shuffler = torch.Generator().manual_seed(batch_seed(seed, "ppo-shuffle", iter_num, runtime.rank))
    update_stats, steps, early_stop = [], 0, False
    for epoch in range(ppo_epochs):
        for rows in minibatches(batch_size, minibatch_size, shuffler):
            batch, part = select(experience, rows.to(runtime.device), generated.prompt_length)
            with ctx:
                policy_objective, critic_loss, stats = ppo_losses(policy, critic, batch, part, temperature,
                                                                  clip_range, value_clip_range, entropy_coef)
            # approx KL(π_old‖π) of this minibatch, measured BEFORE its step: past the limit, neither network steps
            # and the update ends here; all-reduced, so every rank takes the same branch
            early_stop = early_stop_kl > 0 and dist_utils.any_rank(stats["approx_kl"] > early_stop_kl, runtime)
            if early_stop:
                if not update_stats:  # no step at all this iteration: log what was measured
                    update_stats.append(dict(stats, grad_norm=0.0, critic_grad_norm=0.0))
                break
            if iter_num >= critic_warmup_iters:  # during the critic's warm-up the policy takes no step
                scaler.scale(policy_objective).backward()
                stats["grad_norm"] = policy_step(policy, policy_objective.item(), iter_num)
            else:
                stats["grad_norm"] = 0.0
            critic_scaler.scale(critic_loss).backward()
            stats["critic_grad_norm"] = critic_step(critic, critic_loss.item(), iter_num)
            update_stats.append(stats)
            steps += 1
        if early_stop:
            break
    update_time = time.time() - t1

    # 5. β for the next iteration, from the KL per response averaged over all ranks
    sequence_kl = sequence_sum(experience["kl"], mask)  # (B,) Σ_t kl_t
    kl_mean = dist_utils.all_reduce_mean(sequence_kl.mean().item(), runtime)
    controller.update(kl_mean, batch_size * runtime.world_size)

    # log (means over this rank's batch, then over ranks)
    record = {"score": raw_scores.mean().item(), "gold": mean(gold_scores),
              "objective": (scores - beta * sequence_kl).mean().item(),  # what PPO maximizes: score − β·KL
              "entropy": (scored["entropy"] * mask).sum().item() / mask.sum().item(),
              "explained_variance": explained_variance(experience["values"], experience["returns"], mask),
              "response_length": mask.sum(-1).float().mean().item(), "eos_rate": generated.ended.float().mean().item(),
              "minibatches": steps, "rollout_s": rollout_time, "update_s": update_time}
    for key in update_stats[0]:
        record[key] = mean([stats[key] for stats in update_stats])
    record = {key: dist_utils.all_reduce_mean(value, runtime) for key, value in record.items()}
    if master:
        progress.update(1)
        progress.set_postfix(score=f"{record['score']:+.3f}", gold=f"{record['gold']:.2f}", kl=f"{kl_mean:.3f}")
        if iter_num % log_interval == 0:
            log.write({"iter": iter_num, "score": record.pop("score"), "gold": record.pop("gold"), "kl": kl_mean,
                       "beta": beta, **record, "early_stop": early_stop})
    iter_num += 1
progress.close()

# ---- the end: the held-out set before and after, and where the samples are
if master and not eval_only and not stopped:
    evals = [r for r in read_metrics(log.path) if r.get("phase") == "eval"]
    before, after = evals[0], evals[-1]
    print(f"[nanollm] {max_iters} PPO iterations in {time.time() - t_start:.1f} s; final beta {controller.beta:.4f}")
    print(f"| test ({eval_prompts} prompts; val_: {validation_prompts} validation prompts) | iteration "
          f"{before['iter']} | iteration {after['iter']} |\n|---|---|---|")
    for key in ("eval_score", "eval_gold", "eval_gold_gain", "eval_kl", "eval_response_length", "eval_eos_rate",
                "val_gold", "val_gold_gain"):
        print(f"| {key} | {before[key]:.4f} | {after[key]:.4f} |")
    print(f"[nanollm] sample completions: {os.path.join(out_dir, 'samples.txt')}")
dist_utils.teardown(runtime)
stop.exit_if(stopped)
