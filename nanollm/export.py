"""Release a trained GPT: a folder with weights, tokenizer and config that loads without any training state, and an
ONNX graph of its forward pass.

Teaches what a model needs outside the training loop (architecture + weights + tokenizer, no optimizer or RNG state),
the safetensors layout (written by hand here: 8-byte header length, JSON header, raw bytes; read back by
nanollm/gpt2.py), and export to ONNX through torch.onnx, checked against onnxruntime when it is installed.
    python -m nanollm.export --out_dir=out-sft --release_dir=release   # + release/model.onnx if `onnx` is installed
    python -m nanollm.export --out_dir=out-sft --release_dir=hf-model --format=hf  # Hugging Face layout (export_hf.py)
"""
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import sys

import torch

from nanollm.configurator import MissingFileError, UserError
from nanollm.model import architecture_args
from nanollm.tokenizer import Tokenizer

FORMAT = "nanollm-release"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.model"
ONNX_FILE = "model.onnx"
SPECIAL_TOKENS = ("unk", "pad", "bos", "eos", "system", "user", "assistant", "mask")
SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                     torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


# ----------------------------------------------------------------------------- safetensors, by hand
def write_safetensors(tensors, path, metadata=None):
    """{name: tensor} -> a .safetensors file: u64 little-endian header size N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}} (padded with spaces to a multiple of 8), then the raw bytes.
    metadata: {str: str} stored as the header's "__metadata__" (transformers checks {"format": "pt"})."""
    if sys.byteorder != "little":
        raise ValueError("safetensors data is little-endian; this machine is not")
    header, blobs, offset = ({"__metadata__": dict(metadata)} if metadata else {}), [], 0
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


def file_sha256(path):
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
    """Write out/config.json, out/model.safetensors and out/tokenizer.model; return out. config.json holds the
    architecture only: whoever loads the release chooses attn_impl and dropout (nanollm.loader.load_model)."""
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
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": "GPT",
              "model_args": architecture_args(model.config), "weights": WEIGHTS_FILE,
              "weights_sha256": file_sha256(weights_path), "tied_weights": tied,
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
    from nanollm.configurator import configure_command
    from nanollm.loader import load_model  # the command line sits on top of the library

    settings = dict(
        out_dir="out-sft",  # the model to release: a folder with ckpt.pt and tokenizer.model
        release_dir="release",  # the release folder to write
        format="release",  # release: nanollm's own folder | hf: the Hugging Face layout (transformers, vLLM, ...)
        onnx="auto",  # auto: write model.onnx when the `onnx` package is installed (format=release only) | yes | no
        onnx_seq_len=0,  # fixed ONNX input length; 0 = block_size
    )
    words = configure_command("python -m nanollm.export", settings, sys.argv[1:] if argv is None else argv,
                              renamed={"ckpt_dir": "out_dir", "out": "release_dir"})
    if words:
        raise UserError(f"command line: unexpected argument '{words[0]}' (use --key=value)")
    if settings["onnx"] not in ("auto", "yes", "no"):
        raise UserError(f"onnx={settings['onnx']!r}: expected 'auto', 'yes' or 'no'")
    if settings["format"] not in ("release", "hf"):
        raise UserError(f"format={settings['format']!r}: expected 'release' or 'hf'")
    out_dir, release_dir, onnx_seq_len = settings["out_dir"], settings["release_dir"], settings["onnx_seq_len"]
    tokenizer_path = os.path.join(out_dir, TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_path):
        raise MissingFileError(f"out_dir={out_dir!r}: no {TOKENIZER_FILE} next to the checkpoint")
    model = load_model(out_dir).model
    if settings["format"] == "hf":
        from nanollm.export_hf import export_hf

        layout = export_hf(model, tokenizer_path, release_dir)[1]
        print(f"[nanollm] Hugging Face folder, {layout} layout")
    else:
        export_release(model, tokenizer_path, release_dir, source=out_dir)
    have_onnx = importlib.util.find_spec("onnx") is not None
    auto = settings["onnx"] == "auto" and settings["format"] == "release"  # engines read the hf folder's safetensors
    if settings["onnx"] == "yes" or (auto and have_onnx):
        onnx_path = os.path.join(release_dir, ONNX_FILE)
        export_onnx(model, onnx_path, onnx_seq_len or None)
        if importlib.util.find_spec("onnxruntime") is not None:
            seq_len = onnx_seq_len or model.config.block_size
            input_ids = torch.randint(model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
            print(f"[nanollm] ONNX vs PyTorch: max |logits difference| = "
                  f"{onnx_max_difference(model, onnx_path, input_ids):.2e} (onnxruntime)")
        else:
            print("[nanollm] onnxruntime not installed: the ONNX graph was not run")
    elif auto:
        print("[nanollm] ONNX skipped: the optional package `onnx` is not installed (pip install onnx onnxscript "
              "onnxruntime)")
    for name in sorted(os.listdir(release_dir)):
        print(f"  {os.path.join(release_dir, name)}  {os.path.getsize(os.path.join(release_dir, name)) / 1e6:.2f} MB")
    if settings["format"] == "hf":
        print(f"[nanollm] load it with: from transformers import AutoModelForCausalLM, AutoTokenizer; "
              f"AutoModelForCausalLM.from_pretrained({release_dir!r}); serving: docs/serving.md")
    else:
        print(f"[nanollm] load it with: from nanollm.loader import load_model; model, tokenizer, _, _ = "
              f"load_model({release_dir!r})")


if __name__ == "__main__":
    main()
