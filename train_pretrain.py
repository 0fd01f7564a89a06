"""Pretrain a GPT on the built-in synthetic world (default) or on your own text.

One process (CPU, one GPU, or Apple MPS):
    python train_pretrain.py
    python train_pretrain.py --model_type=bert     # or encdec: the other two architectures, same data and loop
    python train_pretrain.py --dataset=my_texts/ --max_iters=5000 --n_layer=6 --n_embd=384
N processes with DDP (one per GPU; gloo on CPU):
    torchrun --standalone --nproc_per_node=4 train_pretrain.py
Resume after a crash or Ctrl-C:
    python train_pretrain.py --init_from=resume
Settings below are plain variables; override them with a config file (python train_pretrain.py my_config.py)
and/or --key=value. Library pieces live in nanollm/; the training loop is here to be read.
"""
import filecmp
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nanollm import distributed as dist_utils
from nanollm.bert import BERT, BertConfig, fill_mask, mask_tokens, mlm_accuracy
from nanollm.checkpoint import check_out_dir, load_checkpoint, restore_training_state, save_checkpoint, start_run, unwrap
from nanollm.configurator import UserError, check_ranges, configure
from nanollm.data import (batch_seed, get_batch, load_meta, load_tokenizer, prepare_dataset, tokenizer_file,
                          unigram_perplexity)
from nanollm.encdec import EncoderDecoder, infilling_batch
from nanollm.metrics import bits_per_byte, text_nll_and_bytes, token_byte_lengths
from nanollm.model import GPT, GPTConfig
from nanollm.optim import configure_optimizer, get_lr
from nanollm.tokenizer import Tokenizer
from nanollm.training import GracefulStop, GuardedStep

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
bias = True
attn_impl = "auto"  # 'manual' | 'sdpa' | 'triton' | 'auto' (sdpa)
init = "normal"  # 'normal' (GPT-2 style) | 'xavier' | 'he'
# optimizer (AdamW) and schedule
learning_rate = 2e-3
max_iters = 600
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables
decay_lr = True  # False keeps learning_rate constant after warmup
lr_schedule = "cosine"  # 'cosine' | 'poly'
warmup_iters = 30
lr_decay_iters = -1  # -1 = max_iters
min_lr = 2e-4
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' (bfloat16 on a GPU that has it, else float32) | 'float32' | 'bfloat16' | 'float16'
backend = "auto"  # DDP backend: 'auto' (nccl on CUDA, gloo on CPU) | 'nccl' | 'gloo'
compile = False  # torch.compile the model
seed = 1337
# the sample printed at the end
sample_prompt = "Talo"
sample_tokens = 60
# ----------------------------------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
if model_type not in ("gpt", "bert", "encdec"):
    raise UserError(f"model_type={model_type!r}: expected 'gpt', 'bert' or 'encdec'")
if init_from not in ("scratch", "resume"):
    raise UserError(f"init_from={init_from!r}: expected 'scratch' or 'resume'")
check_ranges(config, positive=("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval",
                               "log_interval", "eval_iters", "n_layer", "n_head", "n_embd", "vocab_size"),
             non_negative=("max_iters", "learning_rate", "min_lr", "warmup_iters", "weight_decay", "grad_clip"),
             fraction=("dropout",))
if n_embd % n_head:
    raise UserError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
check_out_dir(out_dir, init_from == "resume", overwrite)  # nothing in out_dir changes before the loop starts

# ---- setup: device, DDP, precision, seeds
runtime = dist_utils.setup(device, backend)
master = runtime.is_master
dtype = dist_utils.resolve_dtype(dtype, runtime.device_type)
accum_per_rank = dist_utils.micro_steps_per_rank(gradient_accumulation_steps, runtime)
lr_decay_iters = max_iters if lr_decay_iters < 0 else lr_decay_iters
checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), runtime.device) if init_from == "resume" else None
if checkpoint is not None:  # the architecture comes from the checkpoint: one source of truth for the whole run
    if checkpoint["config"].get("model_type", "gpt") != model_type:
        raise UserError(f"{out_dir}/ckpt.pt holds a {checkpoint['config'].get('model_type', 'gpt')!r} model, "
                        f"not model_type={model_type!r}")
    n_layer, n_head, n_embd, block_size, bias = (checkpoint["model_args"][k] for k in
                                                 ("n_layer", "n_head", "n_embd", "block_size", "bias"))
tokens_per_iter = accum_per_rank * runtime.world_size * batch_size * block_size
if master:
    print(f"[nanollm] device={runtime.device} dtype={dtype} world_size={runtime.world_size} "
          f"tokens/iter={tokens_per_iter:,}")
ctx = dist_utils.autocast(runtime.device_type, dtype)

# ---- data: clean, tokenize and cache once (rank 0), then every rank reads the .bin files
if master:
    data_dir = prepare_dataset(dataset, data_dir or None, vocab_size=vocab_size, tokenizer_type=tokenizer_type,
                               seed=seed)
dist_utils.barrier(runtime)
data_dir = data_dir or prepare_dataset(dataset, None, vocab_size=vocab_size, tokenizer_type=tokenizer_type,
                                       seed=seed)  # cache hit on ranks > 0
meta = load_meta(data_dir)
tokenizer = load_tokenizer(data_dir)  # a Tokenizer; nanoGPT's meta.pkl characters; None for bare GPT-2 token files
tokenizer_path = tokenizer_file(data_dir)  # copied beside the model
if model_type != "gpt" and not isinstance(tokenizer, Tokenizer):
    raise UserError(f"model_type={model_type!r} needs nanollm's special tokens (mask, eos): {data_dir} has none")
run_tokenizer = tokenizer_path and os.path.join(out_dir, os.path.basename(tokenizer_path))
if checkpoint is not None and run_tokenizer and os.path.exists(run_tokenizer) and \
        not filecmp.cmp(tokenizer_path, run_tokenizer, shallow=False):
    raise UserError(f"init_from='resume': the data's tokenizer ({tokenizer_path}) is not the one the run in "
                    f"{out_dir} was trained with; resume with the run's own dataset")
# bits per byte (next-token models): the tokenizer says how many UTF-8 bytes each target token is
byte_lengths = token_byte_lengths(tokenizer).to(runtime.device) if model_type == "gpt" and tokenizer is not None \
    else None
if master and model_type == "gpt" and tokenizer is None:
    print(f"[nanollm] no bits per byte: {data_dir} has no tokenizer to count the bytes of its tokens")

# ---- model
if attn_impl == "auto":
    attn_impl = "sdpa"
model_args = dict(vocab_size=meta["vocab_size"], block_size=block_size, n_layer=n_layer, n_head=n_head,
                  n_embd=n_embd, dropout=dropout, bias=bias, attn_impl=attn_impl, init=init)
torch.manual_seed(seed)  # same initial weights on every rank
if model_type == "bert":
    model = BERT(BertConfig(**model_args))
elif model_type == "encdec":
    model = EncoderDecoder(GPTConfig(**model_args))
else:
    model = GPT(GPTConfig(**model_args))
model = model.to(runtime.device)
if master:
    print(f"[nanollm] {type(model).__name__}, attn_impl={attn_impl}, init={init}:\n{model.parameter_report()}")
scaler = dist_utils.grad_scaler(runtime.device_type, dtype)
optimizer = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), runtime.device_type, master)
iter_num, best_val_loss = 0, float("inf")
if checkpoint is not None:
    iter_num, best_val_loss = restore_training_state(checkpoint, model, optimizer, scaler, runtime)
    if master:
        print(f"[nanollm] resumed from {out_dir}/ckpt.pt at iteration {iter_num}")
else:
    torch.manual_seed(seed + runtime.rank)  # dropout differs per rank
checkpoint = None  # free memory
if compile:
    print("[nanollm] compiling the model with torch.compile")
    model = torch.compile(model)
if runtime.ddp:
    model = DDP(model, device_ids=[runtime.local_rank] if runtime.device_type == "cuda" else None)
raw_model = unwrap(model)


def objective_batch(split, batch_seed_base, step, micro_step):
    """One micro-batch of the token stream, as keyword arguments of the model for model_type's objective:
    gpt: next token; bert: masked tokens (15%, 80/10/10); encdec: BART text infilling."""
    x, y = get_batch(data_dir, split, batch_size, block_size, batch_seed_base, step=step, micro_step=micro_step,
                     device=runtime.device)
    if model_type == "gpt":
        return dict(idx=x, targets=y)
    generator = torch.Generator().manual_seed(batch_seed(batch_seed_base, f"{split}/noise", step, micro_step))
    if model_type == "bert":
        inputs, targets = mask_tokens(x, meta["vocab_size"], generator)
        return dict(idx=inputs, targets=targets)
    return infilling_batch(x, generator)


@torch.no_grad()
def estimate_loss():
    """Mean loss (and MLM accuracy for bert, bits per byte for gpt) over eval_iters fixed batches of each split, with
    the unwrapped model (rank 0 only)."""
    raw_model.eval()
    out = {}
    for split in ("train", "val"):
        losses, accuracies = torch.zeros(eval_iters), torch.zeros(eval_iters)
        nll_sum, n_bytes = 0.0, 0  # over the text tokens of the same batches
        for k in range(eval_iters):
            batch = objective_batch(split, seed + 1, k, 0)
            with ctx:
                logits, loss = raw_model(**batch)
            losses[k] = loss.item()
            if model_type == "bert":
                accuracies[k] = mlm_accuracy(logits, batch["targets"])
            if byte_lengths is not None:
                batch_nll, batch_bytes = text_nll_and_bytes(logits, batch["targets"], byte_lengths)
                nll_sum, n_bytes = nll_sum + batch_nll, n_bytes + batch_bytes
        out[split] = losses.mean().item()
        if model_type == "bert":
            out[f"{split}_mlm_accuracy"] = accuracies.nanmean().item()
        if byte_lengths is not None:
            out[f"{split}_bpb"] = bits_per_byte(nll_sum, n_bytes)
    raw_model.train()
    return out


def save(iter_num):
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), runtime, model, optimizer, scaler, iter_num, best_val_loss,
                    config, model_args)


# ---- the training loop: out_dir is written from here on
log = start_run(out_dir, runtime, init_from == "resume", iter_num, tokenizer_path, tensorboard=tensorboard)
progress = tqdm(total=max_iters, initial=iter_num, disable=not master, dynamic_ncols=True)
stop = GracefulStop()  # Ctrl-C: finish the step, checkpoint, exit
step = GuardedStep(optimizer, scaler, grad_clip, runtime, dtype)  # clip; skip non-finite steps
stopped = False
t_start = time.time()
while True:
    if stop.requested(runtime):
        stopped = True
        if master:
            tqdm.write(f"[nanollm] stop requested: checkpoint at iteration {iter_num}; resume with --init_from=resume")
        save(iter_num)
        break

    # evaluate and checkpoint
    if iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only:
        if master:
            losses = estimate_loss()
            val_ppl = torch.exp(torch.tensor(losses["val"])).item()
            extra = {k: losses[k] for k in ("val_mlm_accuracy", "val_bpb", "train_bpb") if k in losses}
            tqdm.write(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                       f"val ppl {val_ppl:.2f}" + "".join(f", {k} {v:.4f}" for k, v in extra.items()))
            log.write({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                       "val_ppl": val_ppl, **extra})
            improved = losses["val"] < best_val_loss
            last_val_loss = losses["val"]
            best_val_loss = min(best_val_loss, losses["val"])
        save_now = dist_utils.any_rank(master and iter_num > 0 and (improved or always_save_checkpoint), runtime)
        if save_now and not eval_only:
            save(iter_num)
        dist_utils.barrier(runtime)
    if iter_num >= max_iters or eval_only:
        break

    # learning rate for this iteration
    lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr,
                lr_schedule if decay_lr else "constant")
    for group in optimizer.param_groups:
        group["lr"] = lr

    # forward/backward over micro-batches; gradients are all-reduced only on the last one
    t0 = time.time()
    loss_sum = 0.0
    for micro in range(accum_per_rank):
        batch = objective_batch("train", seed, iter_num, runtime.rank * accum_per_rank + micro)
        with dist_utils.no_sync_unless(model, sync=(micro == accum_per_rank - 1)):
            with ctx:
                _, loss = model(**batch)
            scaler.scale(loss / accum_per_rank).backward()  # mean over the global batch (DDP averages ranks)
        loss_sum += loss.item()
    loss_mean = dist_utils.all_reduce_mean(loss_sum / accum_per_rank, runtime)

    grad_norm = step(model, loss_mean, iter_num)  # unscale, clip to grad_clip, optimizer step (or skip)

    # log
    dt = time.time() - t0
    if master:
        progress.update(1)
        progress.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}")
        if iter_num % log_interval == 0:
            log.write({"iter": iter_num, "loss": loss_mean, "lr": lr, "grad_norm": grad_norm,
                       "dt_ms": dt * 1000, "tokens_per_sec": tokens_per_iter / dt})
    iter_num += 1
progress.close()

# ---- the end: numbers and a sample
if master and not eval_only and not stopped:
    elapsed = time.time() - t_start
    print(f"[nanollm] trained {max_iters} iterations in {elapsed:.1f} s; "
          f"final val loss {last_val_loss:.4f}, val ppl {torch.exp(torch.tensor(last_val_loss)).item():.2f} "
          f"(unigram baseline ppl {unigram_perplexity(data_dir):.2f})")
    raw_model.eval()
    prompt = torch.tensor([tokenizer.encode(sample_prompt, bos=True) if tokenizer else [0]], device=runtime.device)
    masked_prompt = torch.cat([prompt, torch.full_like(prompt[:, :1], tokenizer.mask_id)], dim=1) \
        if model_type != "gpt" else None
    if tokenizer is None:
        print(f"[nanollm] no sample: {data_dir} has no tokenizer (nanoGPT's GPT-2 token files); sampling needs one")
    elif model_type == "bert":  # predict the <|mask|> after the prompt
        out = fill_mask(raw_model, masked_prompt)
    elif model_type == "encdec":  # the decoder rewrites the prompt, writing out its final <|mask|> span
        out = raw_model.generate(masked_prompt, min(sample_tokens, block_size - 1), temperature=0.8, top_k=50,
                                 eos_id=tokenizer.eos_id)
    else:
        out = raw_model.generate(prompt, min(sample_tokens, block_size - prompt.size(1)), temperature=0.8,
                                 top_k=50, eos_id=tokenizer.eos_id)
    if tokenizer is not None:
        print("[nanollm] sample:", tokenizer.decode(out[0].tolist()))
dist_utils.teardown(runtime)
stop.exit_if(stopped)
