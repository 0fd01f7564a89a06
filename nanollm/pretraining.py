"""Pretraining's pieces beside its loop (train_pretrain.py): the settings check, the data every rank reads, the three
model types and the held-out evaluation.

Each model type brings its own objective (GPT: the next token, Radford et al. 2018; BERT: masked tokens, Devlin et al.
2019; encoder-decoder: BART text infilling, Lewis et al. 2020) as `objective_batch`, and its own `sample_text`, so the
loop is the same for all three. Bits per byte (nanochat's measure) divides the loss by the text's UTF-8 bytes instead
of its tokens, so models with different tokenizers can be compared.
"""
import filecmp
import os

import torch

from nanollm.bert import BERT, BertConfig, mlm_accuracy
from nanollm.configurator import UserError, check_ranges, command_line_keys
from nanollm.data import load_meta, load_tokenizer, prepare_dataset, tokenizer_file
from nanollm.distributed import barrier
from nanollm.encdec import EncoderDecoder
from nanollm.metrics import bits_per_byte, text_nll_and_bytes, token_byte_lengths
from nanollm.model import GPT, MLPS, NORMS, POSITIONS, GPTConfig
from nanollm.parallel import check_parallelism
from nanollm.tokenizer import Tokenizer

MODEL_TYPES = {"gpt": (GPT, GPTConfig), "bert": (BERT, BertConfig), "encdec": (EncoderDecoder, GPTConfig)}
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "block_size", "bias", "position", "norm", "mlp", "n_kv_head", "qk_norm",
                "tie_embeddings")  # settings saved with the weights: a resumed run's are its checkpoint's
PRESETS = {  # whole recipes in one setting; 'gpt2': GPT-2's block (Radford et al. 2019) and AdamW, the defaults
    # before docs/blocks.md measured Qwen3's block (RoPE, RMSNorm, SwiGLU, QK-norm, untied, no biases) + Muon ahead
    "gpt2": dict(bias=True, position="learned", norm="layernorm", mlp="gelu", n_kv_head=0, qk_norm=False,
                 tie_embeddings=True, optimizer="adamw"),
}


def apply_preset(settings, defaults, argv=()):
    """settings with the preset's value for each of its keys neither named on the command line (argv) nor changed
    from the script's default (defaults) by a config file: --preset=gpt2 --position=rope is GPT-2's block with RoPE,
    --preset=gpt2 --optimizer=muon GPT-2's block trained with Muon. preset='' changes nothing."""
    name = settings.get("preset", "")
    if name and name not in PRESETS:
        raise UserError(f"preset={name!r}: expected '' or one of {tuple(PRESETS)}")
    named = set(command_line_keys(argv))
    for key, value in PRESETS.get(name, {}).items():
        if key not in named and settings[key] == defaults[key]:
            settings[key] = value
    return settings


def check_settings(settings):
    """train_pretrain.py's settings, before any work: one line naming the first wrong one."""
    if settings["model_type"] not in MODEL_TYPES:
        raise UserError(f"model_type={settings['model_type']!r}: expected one of {tuple(MODEL_TYPES)}")
    if settings["init_from"] not in ("scratch", "resume"):
        raise UserError(f"init_from={settings['init_from']!r}: expected 'scratch' or 'resume'")
    from nanollm.optim import OPTIMIZERS  # imported here: the loader imports this module and no training code

    if settings["optimizer"] not in OPTIMIZERS:
        raise UserError(f"optimizer={settings['optimizer']!r}: expected one of {OPTIMIZERS}")
    check_ranges(settings, positive=("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval",
                                     "log_interval", "eval_iters", "n_layer", "n_head", "n_embd", "vocab_size"),
                 non_negative=("max_iters", "learning_rate", "min_lr", "warmup_iters", "weight_decay", "grad_clip"),
                 fraction=("dropout",))
    if settings["n_embd"] % settings["n_head"]:
        raise UserError(f"n_embd={settings['n_embd']} must be a multiple of n_head={settings['n_head']}")
    check_parallelism(settings, settings["n_head"], settings["n_embd"])
    for name, choices in (("position", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
        if settings[name] not in choices:
            raise UserError(f"{name}={settings[name]!r}: expected one of {choices}")
    if settings["n_kv_head"] < 0 or settings["n_head"] % (settings["n_kv_head"] or settings["n_head"]):
        raise UserError(f"n_kv_head={settings['n_kv_head']}: expected 0 (= n_head) or a divisor of n_head="
                        f"{settings['n_head']}")
    if settings["position"] == "rope" and settings["n_embd"] // settings["n_head"] % 2:
        raise UserError(f"position='rope' rotates pairs: n_embd/n_head={settings['n_embd'] // settings['n_head']} "
                        f"must be even")


def resumed_shape(checkpoint, model_type, out_dir):
    """The ARCHITECTURE settings of the run being resumed, as a dict (one source of truth: the checkpoint's; a field
    older checkpoints lack has its GPT-2 default)."""
    saved_type = checkpoint["config"].get("model_type", "gpt")
    if saved_type != model_type:
        raise UserError(f"{out_dir}/ckpt.pt holds a {saved_type!r} model, not model_type={model_type!r}")
    defaults = GPTConfig.__dataclass_fields__
    return {key: checkpoint["model_args"].get(key, defaults[key].default) for key in ARCHITECTURE}


def prepare_data(dataset, data_dir, vocab_size, tokenizer_type, seed, runtime):
    """Clean, tokenize and cache the data once (rank 0; the others wait, then hit the cache). Returns (data_dir, meta,
    tokenizer, tokenizer_path): our Tokenizer, nanoGPT's meta.pkl characters, or None (bare GPT-2 token files), and
    the file to copy beside the model."""
    if runtime.is_master:
        data_dir = prepare_dataset(dataset, data_dir or None, vocab_size=vocab_size, tokenizer_type=tokenizer_type,
                                   seed=seed)
    barrier(runtime)
    data_dir = data_dir or prepare_dataset(dataset, None, vocab_size=vocab_size, tokenizer_type=tokenizer_type,
                                           seed=seed)
    return data_dir, load_meta(data_dir), load_tokenizer(data_dir), tokenizer_file(data_dir)


def check_tokenizer(model_type, tokenizer, tokenizer_path, data_dir, out_dir, resume):
    """BERT and the encoder-decoder need our special tokens; a resumed run must read its data with its own tokenizer."""
    if model_type != "gpt" and not isinstance(tokenizer, Tokenizer):
        raise UserError(f"model_type={model_type!r} needs nanollm's special tokens (mask, eos): {data_dir} has none")
    saved = tokenizer_path and os.path.join(out_dir, os.path.basename(tokenizer_path))
    if resume and saved and os.path.exists(saved) and not filecmp.cmp(tokenizer_path, saved, shallow=False):
        raise UserError(f"init_from='resume': the data's tokenizer ({tokenizer_path}) is not the one the run in "
                        f"{out_dir} was trained with; resume with the run's own dataset")


def build_model(model_type, model_args):
    model_class, config_class = MODEL_TYPES[model_type]
    return model_class(config_class(**model_args))


def byte_lengths_for(model, tokenizer, device):
    """UTF-8 bytes of each token id, for bits per byte: next-token models whose data has a tokenizer only."""
    if not isinstance(model, GPT) or tokenizer is None:
        return None
    return token_byte_lengths(tokenizer).to(device)


@torch.no_grad()
def estimate_loss(model, batch_of, eval_iters, ctx, byte_lengths=None):
    """Held-out numbers of the plain model (rank 0) over eval_iters fixed batches of each split, batch_of(split, k):
    train_loss, val_loss, val_ppl = e^val_loss; bits per byte (byte_lengths given); masked-token accuracy (BERT)."""
    model.eval()
    scores = {}
    for split in ("train", "val"):
        losses, accuracies = torch.zeros(eval_iters), torch.zeros(eval_iters)
        nll_sum, n_bytes = 0.0, 0  # over the text tokens of the same batches
        for k in range(eval_iters):
            batch = batch_of(split, k)
            with ctx:
                logits, loss = model(**batch)
            losses[k] = loss.item()
            if isinstance(model, BERT):
                accuracies[k] = mlm_accuracy(logits, batch["targets"])
            if byte_lengths is not None:
                batch_nll, batch_bytes = text_nll_and_bytes(logits, batch["targets"], byte_lengths)
                nll_sum, n_bytes = nll_sum + batch_nll, n_bytes + batch_bytes
        scores[f"{split}_loss"] = losses.mean().item()
        if isinstance(model, BERT):
            scores[f"{split}_mlm_accuracy"] = accuracies.nanmean().item()
        if byte_lengths is not None:
            scores[f"{split}_bpb"] = bits_per_byte(nll_sum, n_bytes)
    scores["val_ppl"] = torch.exp(torch.tensor(scores["val_loss"])).item()  # perplexity = e^(mean NLL per token)
    model.train()
    return scores
