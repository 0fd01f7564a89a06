"""Int8 weight-only quantization of the Linear layers, written by hand.

Teaches symmetric per-output-channel quantization (one scale per row: scale = max|w_row| / 127, q = round(w / scale))
and a matmul that dequantizes on the fly, so weights live in memory and on disk as int8 while activations stay float
(weight-only schemes as in LLM.int8(), Dettmers et al. 2022, without its outlier path; Jacob et al. 2018 for the
int8 basics). The token embedding (with a tied lm_head) and the norms stay in float; an untied lm_head is quantized.
    python -m nanollm.quantize --out_dir=out --int8_dir=out-int8      # writes out-int8/model_int8.pt + tokenizer
"""
import os
import shutil
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollm.checkpoint import atomic_save
from nanollm.model import architecture_args

FORMAT = "nanollm-int8"  # the "format" field of a quantized model file
FORMAT_VERSION = 1
QUANTIZED_FILE = "model_int8.pt"  # name of the file inside an output folder
QMAX = 127  # symmetric int8: [-127, 127]; -128 is left unused so that +w and -w quantize alike
MATMUL_PATHS = ("auto", "reference", "int8pack")
matmul_path = "auto"  # 'reference': dequantize, then F.linear | 'int8pack': torch._weight_int8pack_mm (CPU, fp32)
# | 'auto': int8pack for inputs of at most INT8PACK_MAX_ROWS rows (decoding), the reference path otherwise
INT8PACK_MAX_ROWS = 16  # the kernel targets matrix-vector products (decoding): on this repo's 2-core AVX (no AVX2)
# EPYC it took ~50x longer than dequantize + F.linear for 2048 rows (a perplexity batch) and was no faster for 1 row
_announced = set()


def _say_once(message):
    if message not in _announced:
        _announced.add(message)
        print(f"[nanollm] {message}")


# ----------------------------------------------------------------------------- the arithmetic
def quantize_per_channel(weight):
    """weight (out, in) float -> (q (out, in) int8, scale (out,) float32), one symmetric scale per output row.

    scale = max|w_row| / 127 ; q = clamp(round(w / scale), -127, 127). An all-zero row gets scale 1 (q = 0)."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / QMAX  # (out,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # avoid 0/0 on an all-zero (pruned) row
    q = torch.round(weight / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)  # (out, in)
    return q, scale


def dequantize(q, scale):
    """w_hat = q · scale (per row); |w - w_hat| <= scale / 2 for every element."""
    return q.float() * scale[:, None]  # (out, in)


def int8pack_available():
    return hasattr(torch, "_weight_int8pack_mm")


def _use_int8pack(x):
    """Which matmul runs for input x; the choice is logged once per reason, never made silently."""
    if matmul_path not in MATMUL_PATHS:
        raise ValueError(f"matmul_path={matmul_path!r}: expected one of {MATMUL_PATHS}")
    if matmul_path == "reference":
        _say_once("int8 matmul: reference path (dequantize the weight, then F.linear)")
        return False
    fits = int8pack_available() and x.device.type == "cpu" and x.dtype == torch.float32
    if matmul_path == "int8pack":
        if not fits:
            raise RuntimeError(f"matmul_path='int8pack' needs torch._weight_int8pack_mm (available: "
                               f"{int8pack_available()}) and a float32 CPU input, got {x.dtype} on {x.device}")
        _say_once("int8 matmul: torch._weight_int8pack_mm (PyTorch's CPU int8-weight kernel)")
        return True
    if not fits:
        _say_once(f"int8 matmul: reference path (dequantize, then F.linear): no int8 kernel for "
                  f"{x.dtype} on {x.device.type}")
        return False
    rows = x.numel() // x.size(-1)
    if rows <= INT8PACK_MAX_ROWS:
        _say_once(f"int8 matmul: torch._weight_int8pack_mm for inputs of <= {INT8PACK_MAX_ROWS} rows (decoding)")
        return True
    _say_once(f"int8 matmul: reference path (dequantize, then F.linear) for inputs of > {INT8PACK_MAX_ROWS} rows")
    return False


class QuantLinear(nn.Module):
    """A Linear whose weight is stored as int8 rows with one float scale each: y = x · (q · s)ᵀ + b."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)  # kept in float (tiny)

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, scale = quantize_per_channel(linear.weight)
        module.weight_int8.copy_(q)
        module.scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module.to(linear.weight.device)

    def forward(self, x):  # x (..., in) -> (..., out)
        if _use_int8pack(x):
            x2d = x.reshape(-1, self.in_features).contiguous()  # the kernel takes 2-D inputs
            # Σ_i x_i · q_ji · s_j = s_j · Σ_i x_i · q_ji : the row scale factors out of the sum
            y = torch._weight_int8pack_mm(x2d, self.weight_int8, self.scale).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, dequantize(self.weight_int8, self.scale).to(x.dtype))  # the readable path
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


# ----------------------------------------------------------------------------- whole models
def quantizable_linears(model):
    """(parent, child name, full name, Linear) for every nn.Linear whose weight is not an embedding's
    (the GPT's lm_head shares wte's matrix: an embedding is a lookup, so it stays float)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear) and id(child.weight) not in embedding_weights:
                found.append((parent, child_name, f"{parent_name}.{child_name}".lstrip("."), child))
    return found


def quantize_model(model):
    """Replace every quantizable Linear of `model` by a QuantLinear (in place); return the replaced names."""
    names = []
    for parent, child_name, name, linear in quantizable_linears(model):
        if hasattr(linear, "parametrizations"):
            raise ValueError(f"{name} is still pruned with a mask: call nanollm.prune.make_permanent first")
        setattr(parent, child_name, QuantLinear.from_linear(linear))
        names.append(name)
    return names


def quantized_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]


def save_quantized(model, path):
    """Write a quantized GPT to one file: int8 weights, float scales and the architecture (model_args).
    Readable with torch.load(weights_only=True): tensors, numbers and strings only; nanollm.loader reads it back."""
    atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION,
                 "model_args": architecture_args(model.config),
                 "quantized_modules": quantized_names(model),
                 "state_dict": model.state_dict()}, path)  # torch.save stores the tied wte/lm_head matrix once


def main(argv=None):
    from nanollm.configurator import UserError, configure_command
    from nanollm.loader import load_model  # the command line sits on top of the library

    settings = dict(
        out_dir="out",  # the model to quantize: a folder with ckpt.pt and tokenizer.model
        int8_dir="out-int8",  # writes model_int8.pt and tokenizer.model here
    )
    words = configure_command("python -m nanollm.quantize", settings, sys.argv[1:] if argv is None else argv,
                              renamed={"ckpt_dir": "out_dir"})
    if words:
        raise UserError(f"command line: unexpected argument '{words[0]}' (use --key=value)")
    out_dir, int8_dir = settings["out_dir"], settings["int8_dir"]
    model = load_model(out_dir).model
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied matrices counted once
    names = quantize_model(model)
    os.makedirs(int8_dir, exist_ok=True)
    path = os.path.join(int8_dir, QUANTIZED_FILE)
    save_quantized(model, path)
    tokenizer = os.path.join(out_dir, "tokenizer.model")
    if os.path.isfile(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(int8_dir, "tokenizer.model"))
    print(f"[nanollm] {len(names)} Linear layers -> int8; {path}: {os.path.getsize(path) / 1e6:.2f} MB "
          f"(float32 weights: {float_bytes / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
