"""Pretrain a GPT on the built-in synthetic world (default) or on your own text.

One process (CPU, one GPU, or Apple MPS):
    python train_pretrain.py
    python train_pretrain.py --model_type=bert     # or encdec: the other two architectures, same data and loop
    python train_pretrain.py --dataset=my_texts/ --max_iters=5000 --n_layer=6 --n_embd=384
N processes with DDP (one per GPU; gloo on CPU), or the model split over them (docs/parallelism.md):
    torchrun --standalone --nproc_per_node=4 train_pretrain.py
    torchrun --standalone --nproc_per_node=4 train_pretrain.py --parallelism=fsdp   # or tp
Resume after a crash or Ctrl-C:
    python train_pretrain.py --init_from=resume
Settings below are plain variables; override them with a config file (python train_pretrain.py my_config.py)
and/or --key=value. Library pieces live in nanollm/; the training loop is here to be read.
"""
import os
import sys
import time

import torch
from nanollm import distributed as dist_utils
from nanollm.checkpoint import load_checkpoint, restore_training_state, save_checkpoint, start_run, unwrap
from nanollm.configurator import configure, script_settings
from nanollm.data import batch_seed, get_batch, unigram_perplexity
from nanollm.optim import Schedule, configure_optimizer
from nanollm.pretraining import (ARCHITECTURE, apply_preset, build_model, byte_lengths_for, check_settings,
                                 check_tokenizer, estimate_loss, prepare_data, resumed_shape)
from nanollm.training import CheckpointRule, GracefulStop, GuardedStep, evaluation_due, setup_run

# ------------------------------------------------------------------------------------------ settings
# I/O
out_dir = "out"  # checkpoints, metrics.jsonl and a copy of the tokenizer go here
eval_interval = 200  # evaluate val loss (and checkpoint) every this many iterations
log_interval = 10  # write a metrics.jsonl line every this many iterations
tensorboard = False  # also write every metrics.jsonl number as TensorBoard scalars in out_dir/tensorboard/
eval_iters = 10  # batches per split in an evaluation
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # checkpoint at every eval, not only when val loss improves
init_from = "scratch"  # 'scratch' | 'resume' (from out_dir/ckpt.pt)
overwrite = False  # True: a scratch run may replace the run already in out_dir (else it refuses)
# data
dataset = "world"  # 'world' (built-in), .txt/.jsonl files or folders (comma-separated), or a prepared folder
data_dir = ""  # where prepared data is cached; '' = data/<dataset name>
vocab_size = 2048  # SentencePiece vocabulary (special tokens included)
tokenizer_type = "bpe"  # 'bpe' | 'unigram'
gradient_accumulation_steps = 1  # micro-steps per optimizer step, over all ranks together
batch_size = 16  # sequences per micro-step per rank
block_size = 128  # context length in tokens
# model
model_type = "gpt"  # 'gpt' (next token) | 'bert' (masked LM, nanollm/bert.py) | 'encdec' (BART infilling, encdec.py)
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False  # biases in every Linear and LayerNorm (True: GPT-2)
position = "rope"  # 'rope' (rotary: q and k rotated, Su et al. 2021) | 'learned' (GPT-2: a position table)
norm = "rmsnorm"  # 'rmsnorm' (Zhang & Sennrich 2019) | 'layernorm' (GPT-2)
mlp = "swiglu"  # 'swiglu' (Shazeer 2020) | 'gelu' (GPT-2) | 'relu2' (squared ReLU, So et al. 2021)
n_kv_head = 0  # key/value heads: 0 = n_head; 1 = multi-query; a divisor of n_head = grouped-query (Ainslie 2023)
qk_norm = True  # normalize queries and keys per head before attention (False: GPT-2)
tie_embeddings = False  # True: the output layer reuses the token embedding matrix (GPT-2; Press & Wolf 2017)
preset = ""  # 'gpt2': GPT-2's block and AdamW for bias, position, norm, mlp, n_kv_head, qk_norm, tie_embeddings and
# optimizer, except those given too (--preset=gpt2 --position=rope). The defaults above (Qwen3's block) and muon
# beat GPT-2's recipe at equal CPU time on English text (docs/blocks.md); --preset=gpt2 gives it back in one flag
attn_impl = "auto"  # 'manual' | 'sdpa' | 'triton' | 'auto' (sdpa): how attention runs, not saved with the weights
init = "normal"  # 'normal' (GPT-2 style) | 'xavier' | 'he'
# optimizer and schedule
optimizer = "muon"  # 'muon' (hidden matrices orthogonalized, the rest AdamW) | 'adamw' | 'lamb' | 'lars' (optim.py)
learning_rate = 2e-3  # the peak, after warmup: a small model takes large steps
max_iters = 600  # optimizer steps of tokens_per_iter tokens each
weight_decay = 0.1  # AdamW's decoupled decay of the 2-D weights (Loshchilov & Hutter 2019)
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables
decay_lr = True  # False keeps learning_rate constant after warmup
lr_schedule = "cosine"  # 'cosine' | 'poly'
warmup_iters = 30  # linear warmup while AdamW's moment estimates are still poor
lr_decay_iters = -1  # -1 = max_iters
min_lr = 2e-4  # the end of the decay: learning_rate / 10
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' (bfloat16 on a GPU that has it, else float32) | 'float32' | 'bfloat16' | 'float16'
backend = "auto"  # DDP backend: 'auto' (nccl on CUDA, gloo on CPU) | 'nccl' | 'gloo'
compile = False  # torch.compile the model
parallelism = "ddp"  # 'ddp' (a whole copy per process) | 'fsdp' (sharded) | 'tp' (matrices split): nanollm/parallel.py
seed = 1337  # initial weights, batches and dropout
# the sample printed at the end
sample_prompt = "Talo"
sample_tokens = 60
# ----------------------------------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
config = apply_preset(config, script_settings(__file__), sys.argv[1:])  # --preset=gpt2: GPT-2's block and AdamW
runtime = setup_run(config, check_settings)  # settings and out_dir checked before any work; device, DDP, precision
master, ctx = runtime.is_master, runtime.autocast()
checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), runtime.device) if init_from == "resume" else None
architecture = {key: config[key] for key in ARCHITECTURE}  # saved with the weights
if checkpoint is not None:
    architecture = resumed_shape(checkpoint, model_type, out_dir)  # a resumed run's is its checkpoint's
block_size = architecture["block_size"]  # the context length batches are cut to
accum_per_rank = dist_utils.micro_steps_per_rank(gradient_accumulation_steps, runtime)
tokens_per_iter = accum_per_rank * runtime.data_ranks * batch_size * block_size

# ---- data: clean, tokenize and cache once (rank 0), then every rank reads the .bin files
data_dir, meta, tokenizer, tokenizer_path = prepare_data(dataset, data_dir, vocab_size, tokenizer_type, seed, runtime)
check_tokenizer(model_type, tokenizer, tokenizer_path, data_dir, out_dir, init_from == "resume")
config.update(dtype=runtime.dtype, data_dir=data_dir, **architecture)  # saved as resolved: one source of truth

# ---- model
model_args = dict(vocab_size=meta["vocab_size"], dropout=dropout, attn_impl=attn_impl, init=init, **architecture)
torch.manual_seed(seed)  # same initial weights on every rank
model = build_model(model_type, model_args).to(runtime.device)
byte_lengths = byte_lengths_for(model, tokenizer, runtime.device)  # bits per byte: UTF-8 bytes of each token
if master:
    print(f"[nanollm] {type(model).__name__}, attn_impl={model.config.attn_impl}, {tokens_per_iter:,} tokens per "
          f"iteration:\n{model.parameter_report()}")
model = runtime.wrap(torch.compile(model) if compile else model)  # DDP, or split in place (fsdp, tp)
raw_model = unwrap(model)
scaler = runtime.grad_scaler()
optimizer = configure_optimizer(raw_model, weight_decay, learning_rate, (beta1, beta2), runtime.device_type, master,
                                name=config["optimizer"])  # the setting (or the preset's) names the optimizer
schedule = Schedule(learning_rate, warmup_iters, lr_decay_iters, max_iters, min_lr, lr_schedule if decay_lr else
                    "constant")  # warmup, then cosine (or polynomial) decay to min_lr
iter_num, best_val_loss = 0, float("inf")
if checkpoint is not None:
    iter_num, best_val_loss = restore_training_state(checkpoint, model, optimizer, scaler, runtime)
else:
    torch.manual_seed(seed + runtime.data_rank)  # dropout differs per rank (tensor-parallel ranks agree)
checkpoint = None  # free memory


def batch(split, seed_base, step, micro_step):
    """One micro-batch of the token stream, as the model's objective wants it (a pure function of its arguments)."""
    x, y = get_batch(data_dir, split, batch_size, block_size, seed_base, step, micro_step, runtime.device)
    noise = torch.Generator().manual_seed(batch_seed(seed_base, f"{split}/noise", step, micro_step))
    return raw_model.objective_batch(x, y, noise)  # gpt: next token; bert: masked tokens; encdec: infilling


def save(iter_num):
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), runtime, model, optimizer, scaler, iter_num, should_save.best,
                    config, model_args)


# ---- the training loop: out_dir is written from here on
log = start_run(out_dir, runtime, init_from == "resume", iter_num, tokenizer_path, tensorboard, max_iters, log_interval)
stop = GracefulStop()  # Ctrl-C: finish the step, checkpoint, exit
step = GuardedStep(optimizer, scaler, grad_clip, runtime)  # clip; skip non-finite steps
should_save = CheckpointRule(always_save_checkpoint, best_val_loss)  # after an evaluation
t_start = time.time()
while not stop.requested(runtime, iter_num):
    # evaluate (rank 0, the plain model, fixed batches) and checkpoint
    if evaluation_due(iter_num, eval_interval, max_iters, eval_only):
        scores = estimate_loss(raw_model, lambda split, k: batch(split, seed + 1, k, 0), eval_iters, ctx,
                               byte_lengths) if runtime.evaluates else {}  # rank 0, or all for a split model
        log.say(f"iter {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        log.write({"iter": iter_num, **scores})
        if should_save(scores.get("val_loss"), runtime) and iter_num > 0 and not eval_only:
            save(iter_num)
        dist_utils.barrier(runtime)
    if iter_num >= max_iters or eval_only:
        break

    t0 = time.time()
    lr = schedule.set(optimizer, iter_num)  # this iteration's learning rate

    # forward/backward over micro-batches; gradients are all-reduced only on the last one
    loss_sum = torch.zeros((), device=runtime.device)  # summed on the device: one read-back per step, not per micro
    for micro in range(accum_per_rank):
        inputs = batch("train", seed, iter_num, runtime.data_rank * accum_per_rank + micro)
        with dist_utils.no_sync_unless(model, sync=(micro == accum_per_rank - 1)):
            with ctx:
                _, loss = model(**inputs)
            scaler.scale(loss / accum_per_rank).backward()  # mean over the global batch (DDP averages ranks)
        loss_sum += loss.detach()
    loss_mean = dist_utils.all_reduce_mean(loss_sum.item() / accum_per_rank, runtime)

    grad_norm = step(model, loss_mean, iter_num)  # unscale, clip to grad_clip, optimizer step (or skip)

    dt = time.time() - t0
    log.step(iter_num, {"loss": loss_mean, "lr": lr, "grad_norm": grad_norm, "dt_ms": dt * 1000,
                        "tokens_per_sec": tokens_per_iter / dt})  # the progress bar; metrics.jsonl
    iter_num += 1
log.close()
if stop.stopped:  # Ctrl-C: the checkpoint a resumed run starts from
    save(iter_num)
elif master and not eval_only:  # the end: numbers and a sample
    raw_model.eval()
    print(f"[nanollm] trained {max_iters} iterations in {time.time() - t_start:.1f} s; final val loss "
          f"{scores['val_loss']:.4f}, val ppl {scores['val_ppl']:.2f} (unigram baseline ppl "
          f"{unigram_perplexity(data_dir):.2f})")
    if tokenizer is None:
        print(f"[nanollm] no sample: {data_dir} has no tokenizer (nanoGPT's GPT-2 token files); sampling needs one")
    elif runtime.sharded:  # rank 0 alone cannot run a split model; sample.py reads the checkpoint whole
        print(f"[nanollm] a sample: python sample.py --out_dir={out_dir}")
    else:
        print("[nanollm] sample:", raw_model.sample_text(tokenizer, sample_prompt, sample_tokens))
dist_utils.end_run(runtime, stop.exit_code)  # a multi-process run exits here (with the stop's code)
stop.exit_if_stopped()
