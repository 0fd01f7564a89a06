"""Release a trained GPT: a folder with weights, tokenizer and config that loads without any training state, and an
ONNX graph of its forward pass.

Teaches what a model needs outside the training loop (architecture + weights + tokenizer, no optimizer or RNG state),
the safetensors layout (written by hand here: 8-byte header length, JSON header, raw bytes; read back by
nanollm/gpt2.py), and export to ONNX through torch.onnx, checked against onnxruntime when it is installed.
    python -m nanollm.export --ckpt_dir=out-sft --out=release/       # + release/model.onnx if `onnx` is installed
"""
import argparse
import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys

import torch

from nanollm.configurator import MissingFileError, UserError

FORMAT = "nanollm-release"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.model"
ONNX_FILE = "model.onnx"
SPECIAL_TOKENS = ("unk", "pad", "bos", "eos", "system", "user", "assistant", "mask")
SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                     torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


# ----------------------------------------------------------------------------- safetensors, by hand
def write_safetensors(tensors, path):
    """{name: tensor} -> a .safetensors file: u64 little-endian header size N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}} (padded with spaces to a multiple of 8), then the raw bytes."""
    if sys.byteorder != "little":
        raise ValueError("safetensors data is little-endian; this machine is not")
    header, blobs, offset = {}, [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors name")
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for data in blobs:
            f.write(data)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the release folder
def untied_state_dict(model):
    """(tensors, tied): every tensor stored once; tied = {name: name of the tensor it shares memory with}
    (the GPT's lm_head.weight is wte.weight). safetensors refuses shared tensors, so ties are written in config.json."""
    tensors, tied, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor
    return tensors, tied


def export_release(model, tokenizer_path, out, source=""):
    """Write out/config.json, out/model.safetensors and out/tokenizer.model; return out."""
    from nanollm.tokenizer import Tokenizer

    if any(".parametrizations." in name for name in model.state_dict()):
        raise UserError("the model still holds pruning masks: call nanollm.prune.make_permanent first")
    tokenizer = Tokenizer(tokenizer_path)  # checks it is a nanollm tokenizer before anything is written
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{tokenizer_path}: {tokenizer.vocab_size} pieces, but the model has vocab_size="
                         f"{model.config.vocab_size}")
    os.makedirs(out, exist_ok=True)
    tensors, tied = untied_state_dict(model)
    weights_path = os.path.join(out, WEIGHTS_FILE)
    write_safetensors(tensors, weights_path)
    shutil.copyfile(tokenizer_path, os.path.join(out, TOKENIZER_FILE))
    model_args = dataclasses.asdict(model.config)
    if model_args["attn_impl"] == "triton":
        model_args["attn_impl"] = "sdpa"  # same math; Triton needs a GPU, and a release must load anywhere
    model_args["dropout"] = 0.0  # inference
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": "GPT", "model_args": model_args,
              "weights": WEIGHTS_FILE, "weights_sha256": _sha256(weights_path), "tied_weights": tied,
              "tokenizer": TOKENIZER_FILE, "parameters": model.num_parameters(), "source": str(source),
              "special_tokens": {f"{name}_id": getattr(tokenizer, f"{name}_id") for name in SPECIAL_TOKENS}}
    with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return out


def is_release(path):
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        return False
    try:
        with open(config_path, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (ValueError, AttributeError):
        return False


def load_release(path, device="cpu"):
    """(model in eval mode, Tokenizer) from a release folder. Everything in config.json is checked, and the weights
    file's header against it, before the model is built: a small config cannot make us allocate a large model."""
    from nanollm.configurator import MissingFileError, UserError
    from nanollm.gpt2 import check_tensors_fit, checked_config, expected_shapes, read_safetensors
    from nanollm.model import GPT
    from nanollm.tokenizer import Tokenizer

    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise MissingFileError(f"{path}: no {CONFIG_FILE} (not a release folder)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, RecursionError) as error:
        raise UserError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{config_path}: field 'format' is not {FORMAT!r}")
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
    model_config = checked_config(config["model_args"], f"{config_path}: model_args")
    weights_path = os.path.join(path, config["weights"])
    stored = read_safetensors(weights_path, device="meta")  # the checked header only: no tensor is read yet
    shapes = expected_shapes(model_config, len(stored), weights_path)
    for name, source in tied.items():
        if name not in shapes or source not in shapes or shapes[name] != shapes[source] or source in tied:
            raise UserError(f"{config_path}: tied_weights {name!r} -> {source!r} does not fit the model")
    check_tensors_fit(weights_path, stored, {name: shape for name, shape in shapes.items() if name not in tied},
                      f"the model in {config_path}")
    if config.get("weights_sha256") and _sha256(weights_path) != config["weights_sha256"]:
        raise UserError(f"{weights_path}: sha256 differs from {config_path} field 'weights_sha256' (corrupt copy?)")
    model = GPT(model_config)
    tensors = read_safetensors(weights_path)
    for name, source in tied.items():
        tensors[name] = tensors[source]  # stored once, shared in the model
    model.load_state_dict(tensors)
    return model.to(device).eval(), Tokenizer(os.path.join(path, config["tokenizer"]))


# ----------------------------------------------------------------------------- ONNX
class LogitsOnly(torch.nn.Module):
    """forward(input_ids (1, T)) -> logits (1, T, V): one tensor out, as an ONNX graph wants."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)[0]


def export_onnx(model, path, seq_len=None):
    """Export the logits of a fixed-length input (1, seq_len) to ONNX; returns the exporter used.
    torch.onnx's dynamo exporter needs `onnxscript`; without it the TorchScript exporter runs."""
    if importlib.util.find_spec("onnx") is None:
        raise ImportError("ONNX export needs the optional package `onnx` (pip install onnx onnxscript onnxruntime)")
    seq_len = seq_len or model.config.block_size
    example = torch.zeros(1, seq_len, dtype=torch.long)  # (1, T); the values do not matter, the shape is fixed
    use_dynamo = importlib.util.find_spec("onnxscript") is not None
    exporter = "torch.onnx dynamo exporter" if use_dynamo else "torch.onnx TorchScript exporter (no onnxscript)"
    print(f"[nanollm] ONNX: {exporter}, input_ids (1, {seq_len})")
    kwargs = {"dynamo": True, "external_data": False} if use_dynamo else {"dynamo": False}
    cpu_model = copy.deepcopy(model).cpu()  # exported on the CPU; the caller's model stays where it is
    torch.onnx.export(LogitsOnly(cpu_model).eval(), (example,), path, input_names=["input_ids"],
                      output_names=["logits"], **kwargs)
    return exporter


def onnx_max_difference(model, onnx_path, input_ids):
    """max |logits(PyTorch) - logits(onnxruntime)| for input_ids (1, T) of the exported length."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(["logits"], {"input_ids": input_ids.cpu().numpy()})[0])
    device = next(model.parameters()).device
    with torch.no_grad():
        torch_logits = model.eval()(input_ids.to(device))[0].cpu()
    return (onnx_logits - torch_logits).abs().max().item()


def main(argv=None):
    from nanollm.model import GPT

    parser = argparse.ArgumentParser(prog="python -m nanollm.export", description="Write a release folder (+ ONNX).")
    parser.add_argument("--ckpt_dir", default="out-sft", help="folder with ckpt.pt and tokenizer.model")
    parser.add_argument("--out", default="release", help="the release folder to write")
    parser.add_argument("--onnx", default="auto", choices=("auto", "yes", "no"),
                        help="auto: export model.onnx when the `onnx` package is installed")
    parser.add_argument("--onnx_seq_len", type=int, default=0, help="fixed ONNX input length; 0 = block_size")
    args = parser.parse_args(argv)
    tokenizer_path = os.path.join(args.ckpt_dir, TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_path):
        raise MissingFileError(f"{args.ckpt_dir}: no {TOKENIZER_FILE} next to the checkpoint")
    model = GPT.from_pretrained(args.ckpt_dir)
    export_release(model, tokenizer_path, args.out, source=args.ckpt_dir)
    have_onnx = importlib.util.find_spec("onnx") is not None
    if args.onnx == "yes" or (args.onnx == "auto" and have_onnx):
        onnx_path = os.path.join(args.out, ONNX_FILE)
        export_onnx(model, onnx_path, args.onnx_seq_len or None)
        if importlib.util.find_spec("onnxruntime") is not None:
            seq_len = args.onnx_seq_len or model.config.block_size
            input_ids = torch.randint(model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
            print(f"[nanollm] ONNX vs PyTorch: max |logits difference| = "
                  f"{onnx_max_difference(model, onnx_path, input_ids):.2e} (onnxruntime)")
        else:
            print("[nanollm] onnxruntime not installed: the ONNX graph was not run")
    elif args.onnx == "auto":
        print("[nanollm] ONNX skipped: the optional package `onnx` is not installed (pip install onnx onnxscript "
              "onnxruntime)")
    for name in sorted(os.listdir(args.out)):
        print(f"  {os.path.join(args.out, name)}  {os.path.getsize(os.path.join(args.out, name)) / 1e6:.2f} MB")
    print(f"[nanollm] load it with: from nanollm.export import load_release; model, tokenizer = "
          f"load_release({args.out!r})")


if __name__ == "__main__":
    main()
