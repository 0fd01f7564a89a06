"""Load GPT-2 weights from a local Hugging Face-format folder into our GPT, and write our GPT back out in that format.

Teaches checkpoint surgery: every tensor is mapped by name, explicitly. GPT-2's Conv1D layers store a weight as
(in, out), the transpose of nn.Linear's (out, in). Missing or unexpected keys and shape mismatches are errors, never
skipped. The safetensors format (8-byte header length, JSON header, raw little-endian bytes) is read by hand, so the
`safetensors` package is not needed. Radford et al. 2019 (GPT-2). The GPT-2 tokenizer is not part of nanollm.
"""
import json
import os
import sys

import torch

from nanollm.checkpoint import load_checkpoint
from nanollm.model import GPT, GPTConfig

CONFIG_FILE, SAFETENSORS_FILE, PYTORCH_FILE, OUR_CHECKPOINT = (
    "config.json", "model.safetensors", "pytorch_model.bin", "ckpt.pt")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # Hugging Face's names for the tanh approximation
ARCHITECTURE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "layer_norm_eps",
                       "norm_position")
# Per block: (our name, GPT-2's name, stored transposed by Conv1D)
BLOCK_TENSORS = [
    ("ln_1.weight", "ln_1.weight", False), ("ln_1.bias", "ln_1.bias", False),
    ("attn.c_attn.weight", "attn.c_attn.weight", True), ("attn.c_attn.bias", "attn.c_attn.bias", False),
    ("attn.c_proj.weight", "attn.c_proj.weight", True), ("attn.c_proj.bias", "attn.c_proj.bias", False),
    ("ln_2.weight", "ln_2.weight", False), ("ln_2.bias", "ln_2.bias", False),
    ("mlp.c_fc.weight", "mlp.c_fc.weight", True), ("mlp.c_fc.bias", "mlp.c_fc.bias", False),
    ("mlp.c_proj.weight", "mlp.c_proj.weight", True), ("mlp.c_proj.bias", "mlp.c_proj.bias", False),
]
# Buffers some GPT-2 checkpoints carry (the causal mask as a tensor): not weights, nothing to load.
MASK_BUFFERS = ("attn.bias", "attn.masked_bias")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def tensor_map(n_layer):
    """Our state-dict name -> (GPT-2 name without the 'transformer.' prefix, transposed?)."""
    mapping = {"wte.weight": ("wte.weight", False), "wpe.weight": ("wpe.weight", False),
               "ln_f.weight": ("ln_f.weight", False), "ln_f.bias": ("ln_f.bias", False)}
    for layer in range(n_layer):
        for ours, theirs, transposed in BLOCK_TENSORS:
            mapping[f"blocks.{layer}.{ours}"] = (f"h.{layer}.{theirs}", transposed)
    return mapping


def config_from_gpt2(hf_config, path):
    """A Hugging Face GPT-2 config.json (dict) -> our GPTConfig arguments; unsupported variants raise."""
    def need(field, expected, default):
        value = hf_config.get(field, default)
        if value not in expected:
            raise ValueError(f"{path}: field {field!r} = {value!r} is not supported (expected one of {expected})")

    need("model_type", ("gpt2",), "gpt2")
    need("activation_function", TANH_GELUS, "gelu_new")
    need("scale_attn_weights", (True,), True)
    need("scale_attn_by_inverse_layer_idx", (False,), False)
    need("add_cross_attention", (False,), False)
    need("tie_word_embeddings", (True,), True)
    try:
        n_embd = hf_config["n_embd"]
        need("n_inner", (None, 4 * n_embd), None)
        return dict(vocab_size=hf_config["vocab_size"], block_size=hf_config["n_positions"],
                    n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=n_embd, bias=True,
                    layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5), norm_position="pre", dropout=0.0)
    except KeyError as missing:
        raise ValueError(f"{path}: field {missing} is missing") from None


def config_to_gpt2(config: GPTConfig):
    """Our GPTConfig -> a Hugging Face GPT-2 config.json (dict); settings GPT-2 cannot express raise."""
    if not config.bias or config.norm_position != "pre":
        raise ValueError(f"GPT-2 needs bias=True and norm_position='pre', got bias={config.bias}, "
                         f"norm_position={config.norm_position!r}")
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": config.layer_norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True}


# --------------------------------------------------------------------------------------- file formats
def read_safetensors(path):
    """{name: tensor} from a .safetensors file: u64 header size N (little-endian), N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}}, then the tensors' raw bytes."""
    if sys.byteorder != "little":
        raise ValueError(f"{path}: safetensors data is little-endian; this machine is not")
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_size))
        except ValueError as error:
            raise ValueError(f"{path}: not a safetensors file (bad JSON header: {error})") from None
        data = bytearray(os.path.getsize(path) - 8 - header_size)
        f.readinto(data)
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors


def read_weights(folder):
    """GPT-2 tensors from folder/model.safetensors, else folder/pytorch_model.bin; returns (tensors, file path)."""
    for name in (SAFETENSORS_FILE, PYTORCH_FILE):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            if name == SAFETENSORS_FILE:
                return read_safetensors(path), path
            return torch.load(path, map_location="cpu", weights_only=True), path
    raise FileNotFoundError(f"{folder}: no {SAFETENSORS_FILE} or {PYTORCH_FILE}")


# ------------------------------------------------------------------------------------------- mapping
def load_gpt2_weights(model: GPT, tensors, path):
    """Copy GPT-2-named tensors into our GPT, every one by the explicit map; anything left over or absent raises."""
    tensors = {name.removeprefix("transformer."): tensor for name, tensor in tensors.items()}
    mapping = tensor_map(model.config.n_layer)
    ours = model.state_dict()
    assert set(ours) - set(mapping) == {"lm_head.weight"}, "tensor_map is out of date with the GPT"
    expected = {theirs for theirs, _ in mapping.values()}
    ignorable = {name for name in tensors if name.endswith(MASK_BUFFERS) or name == "lm_head.weight"}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected - ignorable)
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match GPT-2 with {model.config.n_layer} layers: "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    with torch.no_grad():
        for name, (theirs, transposed) in mapping.items():
            stored = tensors[theirs]
            expected_shape = tuple(ours[name].shape)[::-1] if transposed else tuple(ours[name].shape)
            if tuple(stored.shape) != expected_shape:
                raise ValueError(f"{path}: {theirs} has shape {tuple(stored.shape)}, expected {expected_shape}")
            ours[name].copy_(stored.t() if transposed else stored)  # Conv1D (in, out) -> Linear (out, in)
        if "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"].to(ours["wte.weight"].dtype),
                                                           ours["wte.weight"]):
            raise ValueError(f"{path}: lm_head.weight differs from wte.weight; our GPT ties them")


def gpt2_state_dict(model: GPT):
    """Our GPT's weights under GPT-2's names and layout (Conv1D weights transposed), as GPT2LMHeadModel saves."""
    ours = model.state_dict()
    out = {}
    for name, (theirs, transposed) in tensor_map(model.config.n_layer).items():
        tensor = ours[name].detach()
        out[f"transformer.{theirs}"] = (tensor.t() if transposed else tensor).contiguous().clone()
    out["lm_head.weight"] = ours["wte.weight"].detach().clone()
    return out


def save_gpt2(model: GPT, folder):
    """Write folder/config.json and folder/pytorch_model.bin in the Hugging Face GPT-2 format."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config_to_gpt2(model.config), f, indent=2)
    torch.save(gpt2_state_dict(model), os.path.join(folder, PYTORCH_FILE))


# ------------------------------------------------------------------------------------------- loading
def load_pretrained(path, **overrides):
    """GPT from a Hugging Face GPT-2 folder, or from our own checkpoint (a ckpt.pt file or a folder with one).

    overrides: runtime settings only (attn_impl, dropout, init); the architecture comes from the file.
    """
    fixed = sorted(set(overrides) & set(ARCHITECTURE_FIELDS))
    if fixed:
        raise ValueError(f"{path}: {fixed} come from the checkpoint and cannot be overridden")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        if not os.path.isfile(os.path.join(path, OUR_CHECKPOINT)):
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (Hugging Face GPT-2) and no {OUR_CHECKPOINT} (nanollm)")
        path = os.path.join(path, OUR_CHECKPOINT)  # our own output folder
    if not os.path.isdir(path):
        return load_our_checkpoint(path, overrides)
    config_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except ValueError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    model = GPT(GPTConfig(**{**config_from_gpt2(hf_config, config_path), **overrides}))
    tensors, weights_path = read_weights(path)
    load_gpt2_weights(model, tensors, weights_path)
    return model.eval()


def load_our_checkpoint(path, overrides):
    """GPT from a nanollm checkpoint (train_pretrain.py / train_sft.py); only GPT checkpoints qualify."""
    checkpoint = load_checkpoint(path)
    model_type = (checkpoint.get("config") or {}).get("model_type", "gpt")
    if model_type != "gpt":
        raise ValueError(f"{path}: a {model_type!r} checkpoint, not a GPT")
    model = GPT(GPTConfig(**{**checkpoint["model_args"], **overrides}))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit the GPT in its model_args: {error}") from None
    return model.eval()
