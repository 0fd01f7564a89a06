"""Load GPT-2 weights from a local Hugging Face-format folder into our GPT, and write our GPT back out in that format.

Teaches checkpoint surgery: every tensor is mapped by name, explicitly. GPT-2's Conv1D layers store a weight as
(in, out), the transpose of nn.Linear's (out, in). Missing or unexpected keys and shape mismatches are errors, never
skipped. The safetensors format (8-byte header length, JSON header, raw little-endian bytes) is read by hand, so the
`safetensors` package is not needed. Radford et al. 2019 (GPT-2). The GPT-2 tokenizer is not part of nanollm.
"""
import dataclasses
import json
import math
import os
import sys

import torch

from nanollm.configurator import MissingFileError, UserError
from nanollm.model import GPT, GPTConfig

CONFIG_FILE, SAFETENSORS_FILE, PYTORCH_FILE = "config.json", "model.safetensors", "pytorch_model.bin"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # Hugging Face's names for the tanh approximation
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
            raise UserError(f"{path}: field {field!r} = {value!r} is not supported (expected one of {expected})")

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
                    layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5), norm_position="pre")
    except KeyError as missing:
        raise UserError(f"{path}: field {missing} is missing") from None


def config_to_gpt2(config: GPTConfig):
    """Our GPTConfig -> a Hugging Face GPT-2 config.json (dict); settings GPT-2 cannot express raise."""
    if not config.bias or config.norm_position != "pre":
        raise UserError(f"GPT-2 needs bias=True and norm_position='pre', got bias={config.bias}, "
                         f"norm_position={config.norm_position!r}")
    gpt2_block = dict(position="learned", norm="layernorm", mlp="gelu", qk_norm=False, tie_embeddings=True)
    for name, value in gpt2_block.items():
        if getattr(config, name) != value:
            raise UserError(f"GPT-2 needs {name}={value!r}, got {name}={getattr(config, name)!r}")
    if config.kv_heads != config.n_head:
        raise UserError(f"GPT-2 has full multi-head attention: n_kv_head={config.n_kv_head} != n_head={config.n_head}")
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": config.layer_norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True}


# --------------------------------------------------------------------------------------- file formats
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit on the JSON header (100 MB)


def check_safetensors_header(path):
    """The checked header of a .safetensors file, read without reading any tensor: {name: (dtype, shape, begin, end)}
    with begin/end relative to the data section, and the data section's start in the file.

    Layout: u64 header size N (little-endian), N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}},
    then the tensors' raw bytes. Checked: N fits the file; every dtype is known; every shape is a list of
    non-negative ints; end - begin = numel * itemsize; the tensors tile the data section exactly (in range, no
    overlap, no gap, no trailing bytes). Any failure is a UserError naming the file and the tensor."""
    if sys.byteorder != "little":
        raise UserError(f"{path}: safetensors data is little-endian; this machine is not")
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: no such weights file")
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little") if file_size >= 8 else -1
        if not 0 <= header_size <= min(file_size - 8, MAX_HEADER_BYTES):
            raise UserError(f"{path}: not a safetensors file (header size {header_size} does not fit the file's "
                             f"{file_size} bytes)")
        try:
            raw = json.loads(f.read(header_size))
        except (ValueError, RecursionError) as error:
            raise UserError(f"{path}: not a safetensors file (bad JSON header: {error})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a safetensors file (the header is not a JSON object)")
    raw.pop("__metadata__", None)
    header = {}
    for name, info in raw.items():
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise UserError(f"{path}: tensor {name!r} has a bad shape {str(shape)[:60]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise UserError(f"{path}: tensor {name!r} has bad data_offsets {str(offsets)[:60]}")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise UserError(f"{path}: tensor {name!r} of shape {tuple(shape)} {dtype} needs {nbytes} bytes, its "
                             f"data_offsets {offsets} hold {offsets[1] - offsets[0]}")
        header[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    data_start, data_size = 8 + header_size, file_size - 8 - header_size
    position = 0  # the tensors, sorted by offset, must cover [0, data_size) exactly once
    for name, (_, _, begin, end) in sorted(header.items(), key=lambda item: item[1][2:]):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap at byte {position}"
            raise UserError(f"{path}: tensor {name!r} (data_offsets [{begin}, {end}]) {what}")
        if end > data_size:
            raise UserError(f"{path}: tensor {name!r} ends at byte {end}, past the data's {data_size} bytes")
        position = end
    if position != data_size:
        raise UserError(f"{path}: {data_size - position} bytes after the last tensor (truncated header or "
                         f"appended data)")
    return header, data_start


def read_safetensors(path, device="cpu"):
    """{name: tensor} from a .safetensors file, after check_safetensors_header. device="meta": the tensors' dtypes
    and shapes only, no data read (what a loader compares with its config before building anything)."""
    header, data_start = check_safetensors_header(path)
    if device == "meta":
        return {name: torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype], device="meta")
                for name, (dtype, shape, _, _) in header.items()}
    with open(path, "rb") as f:
        f.seek(data_start)
        data = bytearray(os.path.getsize(path) - data_start)
        f.readinto(data)
    tensors = {}
    for name, (dtype, shape, begin, end) in header.items():
        dtype = SAFETENSORS_DTYPES[dtype]
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(shape)
    return tensors


def read_weights(folder, device="cpu"):
    """GPT-2 tensors from folder/model.safetensors, else folder/pytorch_model.bin; returns (tensors, file path).
    device="meta" reads only a safetensors header (a .bin file is a pickle archive: it is read whole, on the CPU)."""
    for name in (SAFETENSORS_FILE, PYTORCH_FILE):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            if name == SAFETENSORS_FILE:
                return read_safetensors(path, device), path
            tensors = torch.load(path, map_location="cpu", weights_only=True)
            if not (isinstance(tensors, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())):
                raise UserError(f"{path}: not a state dict of tensors")
            return tensors, path
    raise MissingFileError(f"{folder}: no {SAFETENSORS_FILE} or {PYTORCH_FILE}")


# ------------------------------------------------------------------------------- config and shape checks
POSITIVE_INT_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


def checked_config(args, where):
    """GPTConfig from an untrusted dict of its arguments (a config.json, a checkpoint's model_args): unknown fields,
    sizes that are not positive ints, n_embd not divisible by n_head are one-line UserErrors naming `where`."""
    if not isinstance(args, dict):
        raise UserError(f"{where}: model arguments must be an object, got {type(args).__name__}")
    known = {field.name for field in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise UserError(f"{where}: unknown model argument(s) {unknown}")
    for field in POSITIVE_INT_FIELDS:
        value = args.get(field, 1)
        if type(value) is not int or value < 1:
            raise UserError(f"{where}: {field} must be a positive integer, got {str(value)[:40]}")
    eps, dropout = args.get("layer_norm_eps", 1e-5), args.get("dropout", 0.0)
    if type(eps) not in (int, float) or not 0 < eps < 1:
        raise UserError(f"{where}: layer_norm_eps must be a number in (0, 1), got {str(eps)[:40]}")
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise UserError(f"{where}: dropout must be a number in [0, 1), got {str(dropout)[:40]}")
    try:
        return GPTConfig(**args)  # checks n_embd % n_head and the named choices (attn_impl, init, norm_position)
    except (TypeError, ValueError) as error:
        raise UserError(f"{where}: {error}") from None


def expected_shapes(config: GPTConfig, tensor_count, path):
    """{name: shape} of a GPT's state dict, computed on the meta device (no memory). The config's n_layer is first
    bounded by the tensors the file really holds, so a tiny file cannot make us build a huge model even on meta."""
    if config.n_layer > tensor_count:
        raise UserError(f"{path}: holds {tensor_count} tensors, fewer than the config's n_layer={config.n_layer}")
    with torch.device("meta"):
        model = GPT(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_tensors_fit(path, tensors, shapes, what):
    """The file's tensors (real or meta) against the {name: shape} the config implies: same names, same shapes,
    floating-point dtypes. Raises a UserError naming the file and the first tensor at fault."""
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise UserError(f"{path}: tensors do not match {what}: "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise UserError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")
        if not tensors[name].dtype.is_floating_point:
            raise UserError(f"{path}: {name} has dtype {tensors[name].dtype}, expected a floating-point dtype")


# ------------------------------------------------------------------------------------------- mapping
def gpt2_weights(tensors):
    """A GPT-2 file's weights by GPT-2 name: the 'transformer.' prefix dropped, mask buffers and the tied lm_head
    (checked separately) left out."""
    tensors = {name.removeprefix("transformer."): tensor for name, tensor in tensors.items()}
    return {name: tensor for name, tensor in tensors.items()
            if not (name.endswith(tuple("." + buffer for buffer in MASK_BUFFERS)) or name == "lm_head.weight")}


def gpt2_shapes(our_shapes, n_layer):
    """{GPT-2 name: shape} from our {name: shape}: Conv1D weights are stored (in, out), the transpose of ours."""
    return {theirs: tuple(our_shapes[name])[::-1] if transposed else tuple(our_shapes[name])
            for name, (theirs, transposed) in tensor_map(n_layer).items()}


def load_gpt2_weights(model: GPT, tensors, path):
    """Copy GPT-2-named tensors into our GPT, every one by the explicit map; anything left over or absent raises."""
    mapping = tensor_map(model.config.n_layer)
    ours = model.state_dict()
    assert set(ours) - set(mapping) == {"lm_head.weight"}, "tensor_map is out of date with the GPT"
    weights = gpt2_weights(tensors)
    check_tensors_fit(path, weights, gpt2_shapes({name: t.shape for name, t in ours.items()}, model.config.n_layer),
                      f"GPT-2 with {model.config.n_layer} layers")
    with torch.no_grad():
        for name, (theirs, transposed) in mapping.items():
            stored = weights[theirs]
            ours[name].copy_(stored.t() if transposed else stored)  # Conv1D (in, out) -> Linear (out, in)
        lm_head = tensors.get("lm_head.weight", tensors.get("transformer.lm_head.weight"))
        if lm_head is not None and not (lm_head.shape == ours["wte.weight"].shape and
                                        torch.equal(lm_head.to(ours["wte.weight"].dtype), ours["wte.weight"])):
            raise UserError(f"{path}: lm_head.weight differs from wte.weight; our GPT ties them")


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
def load_gpt2(path, attn_impl="auto", dropout=0.0):
    """GPT (eval mode) from a Hugging Face GPT-2 folder: config.json + model.safetensors or pytorch_model.bin.
    The architecture comes from config.json; attn_impl and dropout are the caller's runtime choices."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise MissingFileError(f"{path}: no {CONFIG_FILE} (not a Hugging Face GPT-2 folder)")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except (ValueError, RecursionError) as error:
        raise UserError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(hf_config, dict):
        raise UserError(f"{config_path}: expected a JSON object, got {type(hf_config).__name__}")
    config = checked_config(dict(config_from_gpt2(hf_config, config_path), attn_impl=attn_impl, dropout=dropout),
                            config_path)
    # the weights file's header (or a .bin file's tensors) must fit the config before the model is built
    tensors, weights_path = read_weights(path, device="meta")
    shapes = gpt2_shapes(expected_shapes(config, len(tensors), weights_path), config.n_layer)
    check_tensors_fit(weights_path, gpt2_weights(tensors), shapes, f"GPT-2 with {config.n_layer} layers")
    if weights_path.endswith(SAFETENSORS_FILE):
        tensors = read_safetensors(weights_path)
    model = GPT(config)
    load_gpt2_weights(model, tensors, weights_path)
    return model.eval()
