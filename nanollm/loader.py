"""One loader: open any model file the course writes or reads, and say what it is.

Teaches what each kind of file holds, and that a model file is untrusted input: tensors are loaded with
weights_only=True, every config field is checked, and the tensors' shapes are compared with the config on the meta
device before a model is built (so a small file cannot make us allocate a huge model).
    training checkpoint (ckpt.pt, or its folder) of any stage: pretrain (GPT | BERT | encoder-decoder), SFT,
        PPO, GRPO or DPO policy, reward model (nanollm/reward.py), pruned GPT (nanollm/prune.py)
    release folder: config.json + model.safetensors + tokenizer.model (nanollm/export.py)
    int8 file: model_int8.pt, or a folder holding one (nanollm/quantize.py)
    Hugging Face GPT-2 folder: config.json + model.safetensors or pytorch_model.bin (nanollm/gpt2.py)
The architecture comes from the file; how the model runs (attn_impl, dropout: model.RUNTIME_FIELDS) is the caller's
choice, and runtime fields that old files still carry are ignored.
"""
import json
import os
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from nanollm import export, quantize
from nanollm.bert import BertConfig
from nanollm.checkpoint import load_checkpoint
from nanollm.configurator import MissingFileError, UserError
from nanollm.data import load_tokenizer
from nanollm.gpt2 import (CONFIG_FILE, check_tensors_fit, checked_config, expected_shapes, load_gpt2,
                          read_safetensors)
from nanollm.model import GPT, GPTConfig, architecture_args
from nanollm.pretraining import MODEL_TYPES  # gpt | bert | encdec: model class and config class
from nanollm.tokenizer import Tokenizer

CHECKPOINT_FILE = "ckpt.pt"
KINDS = ("pretrain", "sft", "ppo", "grpo", "dpo", "reward", "pruned", "release", "int8", "gpt2")


class LoadedModel(NamedTuple):
    model: nn.Module  # in eval mode, on the requested device
    tokenizer: object  # the Tokenizer beside the file (a release's own), nanoGPT's characters (meta.pkl), or None
    kind: str  # one of KINDS: a training checkpoint's stage, or the file format
    checkpoint: Optional[dict]  # a training checkpoint's contents (config, iter_num, ...); None for other kinds


def load_model(path, device="cpu", attn_impl="auto", dropout=0.0, kinds=KINDS):
    """LoadedModel(model, tokenizer, kind, checkpoint) from any file or folder listed in the module docstring.
    attn_impl and dropout are runtime choices: the file's architecture is never changed by them. kinds: what the
    caller can use (a reward model for PPO: kinds=("reward",)); anything else is a UserError naming the file."""
    loaded = _load(str(path), device, dict(attn_impl=attn_impl, dropout=dropout))
    if loaded.kind not in kinds:
        raise UserError(f"{path}: holds a {loaded.kind!r} model, expected {' or '.join(map(repr, kinds))}")
    return loaded


def _load(path, device, runtime):
    if not os.path.exists(path):
        raise MissingFileError(f"model not found: {path}")
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) and export.is_release(path):
        model, tokenizer = load_release(path, runtime)
        return LoadedModel(model.to(device), tokenizer, "release", None)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, quantize.QUANTIZED_FILE)):
        path = os.path.join(path, quantize.QUANTIZED_FILE)
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
        path = os.path.join(path, CHECKPOINT_FILE)
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return LoadedModel(load_gpt2(path, **runtime).to(device), load_tokenizer(folder), "gpt2", None)
    elif os.path.isdir(path):
        raise MissingFileError(f"{path}: no {CHECKPOINT_FILE}, {quantize.QUANTIZED_FILE}, release or Hugging Face "
                               f"GPT-2 {CONFIG_FILE}")
    payload = load_checkpoint(path, keys=())  # weights_only; which keys it must hold depends on what it is
    if isinstance(payload, dict) and payload.get("format") == quantize.FORMAT:
        return LoadedModel(load_int8(path, payload, runtime).to(device), load_tokenizer(folder), "int8", None)
    model, kind = load_training_checkpoint(path, payload, runtime)
    return LoadedModel(model.to(device).eval(), load_tokenizer(folder), kind, payload)


# ----------------------------------------------------------------------------- checks shared by every format
def _config(config_class, model_args, runtime, where):
    """config_class from an untrusted dict of architecture arguments (runtime fields in it are dropped: old files
    saved them) and the caller's runtime choices. The fields every model shares are checked like a GPT's."""
    if not isinstance(model_args, dict):
        raise UserError(f"{where}: model arguments must be an object, got {type(model_args).__name__}")
    args = dict(architecture_args(model_args), **runtime)
    if config_class is GPTConfig:
        return checked_config(args, where)  # unknown fields, sizes, eps, dropout, named choices
    checked_config({name: value for name, value in args.items() if name in GPTConfig.__dataclass_fields__}, where)
    try:
        return config_class(**args)
    except (TypeError, ValueError) as error:
        raise UserError(f"{where}: {error}") from None


def _check_fits(build, weights, path, what):
    """The checkpoint's weights against the model `build()` makes, built on the meta device (no memory)."""
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise UserError(f"{path}: 'model' is not a state dict of tensors")
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in build().state_dict().items()}
    check_tensors_fit(path, weights, shapes, what)


# ----------------------------------------------------------------------------- training checkpoints
def load_training_checkpoint(path, checkpoint, runtime):
    """(model in eval mode, kind) from a checkpoint that train_*.py or prune.py wrote: its 'stage' (sft, ppo,
    reward, pruned; none for pretraining) and config['model_type'] (gpt, bert, encdec) say what to build."""
    for key in ("model", "model_args", "config"):
        if not isinstance(checkpoint, dict) or key not in checkpoint:
            raise UserError(f"{path}: not a nanollm checkpoint (no {key!r})")
    stage = checkpoint.get("stage") or "pretrain"
    if stage not in KINDS:
        raise UserError(f"{path}: unknown stage {stage!r}")
    where, weights = f"{path}: model_args", checkpoint["model"]
    if stage == "reward":
        from nanollm.reward import RewardModel, build_backbone  # training code, imported only for a reward model

        backbone = checkpoint.get("backbone", "gpt")
        config_class = BertConfig if backbone == "bert" else GPTConfig
        model_args = vars(_config(config_class, checkpoint["model_args"], runtime, where))
        likelihood_weight = checkpoint.get("likelihood_weight", 0.0)
        build = lambda: RewardModel(build_backbone(backbone, model_args), likelihood_weight)  # noqa: E731
        what = f"a reward model on a {backbone} backbone"
    else:
        model_type = (checkpoint["config"] or {}).get("model_type", "gpt")
        if model_type not in MODEL_TYPES:
            raise UserError(f"{path}: config model_type={model_type!r}: expected one of {tuple(MODEL_TYPES)}")
        model_class, config_class = MODEL_TYPES[model_type]
        config = _config(config_class, checkpoint["model_args"], runtime, where)
        if config.n_layer > len(weights):  # bound the size before anything is built, even on meta
            raise UserError(f"{path}: holds {len(weights)} tensors, fewer than the config's n_layer={config.n_layer}")
        build = lambda: model_class(config)  # noqa: E731
        what = f"the {model_type} in its model_args"
    _check_fits(build, weights, path, what)
    model = build()
    model.load_state_dict(weights)
    return model.eval(), stage


# ----------------------------------------------------------------------------- release folders and int8 files
def load_release(path, runtime):
    """(model in eval mode, Tokenizer) from a release folder. Everything in config.json is checked, and the weights
    file's header against it, before the model is built: a small config cannot make us allocate a large model."""
    config_path = os.path.join(path, export.CONFIG_FILE)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, RecursionError) as error:
        raise UserError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != export.FORMAT:
        raise UserError(f"{config_path}: field 'format' is not {export.FORMAT!r}")
    for field in ("model_args", "weights", "tokenizer", "tied_weights"):
        if field not in config:
            raise UserError(f"{config_path}: missing field {field!r}")
    for field in ("weights", "tokenizer"):  # plain file names inside the folder
        if not isinstance(config[field], str) or os.path.basename(config[field]) != config[field] or \
                config[field] in ("", ".", ".."):
            raise UserError(f"{config_path}: field {field!r} must be a file name in the folder, got "
                             f"{str(config[field])[:60]!r}")
    tied = config["tied_weights"]
    if not (isinstance(tied, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items())):
        raise UserError(f"{config_path}: field 'tied_weights' must map tensor names to tensor names")
    model_config = _config(GPTConfig, config["model_args"], runtime, f"{config_path}: model_args")
    weights_path = os.path.join(path, config["weights"])
    stored = read_safetensors(weights_path, device="meta")  # the checked header only: no tensor is read yet
    shapes = expected_shapes(model_config, len(stored), weights_path)
    for name, source in tied.items():
        if name not in shapes or source not in shapes or shapes[name] != shapes[source] or source in tied:
            raise UserError(f"{config_path}: tied_weights {name!r} -> {source!r} does not fit the model")
    check_tensors_fit(weights_path, stored, {name: shape for name, shape in shapes.items() if name not in tied},
                      f"the model in {config_path}")
    if config.get("weights_sha256") and export.file_sha256(weights_path) != config["weights_sha256"]:
        raise UserError(f"{weights_path}: sha256 differs from {config_path} field 'weights_sha256' (corrupt copy?)")
    model = GPT(model_config)
    tensors = read_safetensors(weights_path)
    for name, source in tied.items():
        tensors[name] = tensors[source]  # stored once, shared in the model
    model.load_state_dict(tensors)
    return model.eval(), Tokenizer(os.path.join(path, config["tokenizer"]))


def load_int8(path, payload, runtime):
    """A quantized GPT (eval mode) from the contents of a file written by quantize.save_quantized: the GPT of its
    model_args with the listed Linear layers replaced by QuantLinear, then its int8 state dict."""
    for field in ("model_args", "quantized_modules", "state_dict"):
        if field not in payload:
            raise UserError(f"{path}: missing field {field!r}")
    model = GPT(_config(GPTConfig, payload["model_args"], runtime, f"{path}: model_args"))
    modules = dict(model.named_modules())
    for name in payload["quantized_modules"]:
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise UserError(f"{path}: quantized_modules names {name!r}, which is not a Linear of this GPT")
        parent_name, _, child_name = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child_name,
                quantize.QuantLinear(linear.in_features, linear.out_features, linear.bias is not None))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise UserError(f"{path}: tensors do not fit the model in its model_args: {error}") from None
    return model.eval()
