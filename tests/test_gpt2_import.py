"""GPT-2 import: a checkpoint written here in Hugging Face's layout (Conv1D weights as (in, out)) must give the logits
of a plain re-implementation of GPT-2's forward pass computed from the raw tensors, and survive a round trip."""
import json
import math

import pytest
import torch

from nanollm.gpt2 import gpt2_state_dict, save_gpt2
from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig

HF_CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 61, "n_positions": 24,
             "n_ctx": 24, "n_embd": 16, "n_layer": 2, "n_head": 4, "n_inner": None, "activation_function": "gelu_new",
             "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}


def random_gpt2_tensors(config=HF_CONFIG, seed=0):
    """GPT2LMHeadModel's state dict: 'transformer.' names, Conv1D weights (in, out), random biases and norms."""
    generator = torch.Generator().manual_seed(seed)
    C, V, L = config["n_embd"], config["vocab_size"], config["n_layer"]

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    tensors = {"transformer.wte.weight": rand(V, C), "transformer.wpe.weight": rand(config["n_positions"], C),
               "transformer.ln_f.weight": 1 + rand(C), "transformer.ln_f.bias": rand(C)}
    for i in range(L):
        prefix = f"transformer.h.{i}."
        tensors.update({
            prefix + "ln_1.weight": 1 + rand(C), prefix + "ln_1.bias": rand(C),
            prefix + "attn.c_attn.weight": rand(C, 3 * C), prefix + "attn.c_attn.bias": rand(3 * C),
            prefix + "attn.c_proj.weight": rand(C, C), prefix + "attn.c_proj.bias": rand(C),
            prefix + "ln_2.weight": 1 + rand(C), prefix + "ln_2.bias": rand(C),
            prefix + "mlp.c_fc.weight": rand(C, 4 * C), prefix + "mlp.c_fc.bias": rand(4 * C),
            prefix + "mlp.c_proj.weight": rand(4 * C, C), prefix + "mlp.c_proj.bias": rand(C),
            prefix + "attn.bias": torch.tril(torch.ones(24, 24)).view(1, 1, 24, 24),  # old causal-mask buffer
        })
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    return tensors


def reference_gpt2_logits(tensors, config, idx):
    """GPT-2's forward pass written out from the raw tensors (Radford et al. 2019; Hugging Face's layout)."""
    t = {name.removeprefix("transformer."): tensor for name, tensor in tensors.items()}
    C, H, eps = config["n_embd"], config["n_head"], config["layer_norm_epsilon"]
    B, T = idx.shape

    def norm(x, name):
        mean = x.mean(-1, keepdim=True)
        variance = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(variance + eps) * t[name + ".weight"] + t[name + ".bias"]

    def conv1d(x, name):  # y = x W + b with W stored (in, out)
        return x @ t[name + ".weight"] + t[name + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = t["wte.weight"][idx] + t["wpe.weight"][torch.arange(T)]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(config["n_layer"]):
        h = norm(x, f"h.{i}.ln_1")
        q, k, v = conv1d(h, f"h.{i}.attn.c_attn").split(C, dim=-1)
        q, k, v = (z.reshape(B, T, H, C // H).permute(0, 2, 1, 3) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(C // H)
        scores = torch.where(causal, scores, torch.tensor(torch.finfo(scores.dtype).min))
        attended = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(B, T, C)
        x = x + conv1d(attended, f"h.{i}.attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(norm(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")), f"h.{i}.mlp.c_proj")
    return norm(x, "ln_f") @ t["wte.weight"].T


def write_folder(folder, tensors, config=HF_CONFIG, weights="pytorch_model.bin"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights == "pytorch_model.bin":
        torch.save(tensors, folder / weights)
    else:
        write_safetensors(folder / weights, tensors)
    return str(folder)


def write_safetensors(path, tensors):
    """The documented safetensors layout, by hand: u64 little-endian header size, JSON header, raw bytes."""
    names = {torch.float32: "F32", torch.float16: "F16"}
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in tensors.items():
        data = tensor.contiguous().numpy().tobytes()
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad to 8 bytes, as the format recommends
    path.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + b"".join(chunks))


IDX = torch.randint(0, 61, (3, 24), generator=torch.Generator().manual_seed(1))


def test_imported_gpt2_matches_a_plain_reference_forward(tmp_path):
    tensors = random_gpt2_tensors()
    model = load_model(write_folder(tmp_path / "gpt2", tensors)).model
    assert (model.config.n_layer, model.config.n_embd, model.config.block_size) == (2, 16, 24)
    assert not model.training and model.config.dropout == 0.0
    logits, _ = model(IDX)
    torch.testing.assert_close(logits, reference_gpt2_logits(tensors, HF_CONFIG, IDX), rtol=1e-4, atol=1e-5)


def test_safetensors_folder_loads_without_the_safetensors_package(tmp_path):
    tensors = {k: v for k, v in random_gpt2_tensors().items() if k != "lm_head.weight"}  # HF drops the tied copy
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"].half()  # a float16 tensor is converted
    model = load_model(write_folder(tmp_path / "st", tensors, weights="model.safetensors")).model
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"].float()
    torch.testing.assert_close(model(IDX)[0], reference_gpt2_logits(tensors, HF_CONFIG, IDX), rtol=1e-4, atol=1e-5)


def test_weights_moved_out_and_back_give_identical_logits(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=16)).eval()
    for p in ours.parameters():  # non-trivial biases and norms
        p.data.add_(torch.randn_like(p) * 0.1)
    exported = gpt2_state_dict(ours)
    assert exported["transformer.h.0.mlp.c_fc.weight"].shape == (16, 64)  # Conv1D layout (in, out)
    torch.testing.assert_close(exported["transformer.h.1.attn.c_attn.weight"], ours.blocks[1].attn.c_attn.weight.T)
    save_gpt2(ours, tmp_path / "exported")
    back = load_model(str(tmp_path / "exported")).model
    assert torch.equal(back(IDX)[0], ours(IDX)[0])
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    torch.testing.assert_close(ours(IDX)[0], reference_gpt2_logits(exported, config, IDX), rtol=1e-4, atol=1e-5)


def test_our_own_checkpoint_loads_too(tmp_path):
    torch.manual_seed(0)
    model_args = dict(vocab_size=61, block_size=24, n_layer=1, n_head=2, n_embd=16, attn_impl="sdpa")
    ours = GPT(GPTConfig(**model_args)).eval()
    torch.save({"model": ours.state_dict(), "model_args": model_args, "config": {"model_type": "gpt"}},
               tmp_path / "ckpt.pt")
    for path in (tmp_path, tmp_path / "ckpt.pt"):  # the output folder or the file
        loaded = load_model(str(path), attn_impl="manual").model
        assert loaded.config.attn_impl == "manual"
        torch.testing.assert_close(loaded(IDX)[0], ours(IDX)[0], rtol=1e-5, atol=1e-6)
    torch.save({"model": {}, "model_args": model_args, "config": {"model_type": "bert"}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="ckpt.pt: holds 0 tensors"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), r"missing \['h.1.mlp.c_fc.bias'\]"),
    (lambda t: t.update({"transformer.h.2.ln_1.weight": torch.ones(16)}), r"unexpected \['h.2.ln_1.weight'\]"),
    (lambda t: t.update({"transformer.h.0.attn.c_proj.weight": torch.zeros(16, 17)}),
     r"h.0.attn.c_proj.weight has shape \(16, 17\), expected \(16, 16\)"),
    (lambda t: t.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(64, 16)}),  # nn.Linear layout, not Conv1D
     r"h.0.mlp.c_fc.weight has shape \(64, 16\), expected \(16, 64\)"),
    (lambda t: t.update({"lm_head.weight": torch.zeros(61, 16)}), "lm_head.weight differs"),
])
def test_mismatched_tensors_fail_loudly(tmp_path, change, message):
    tensors = random_gpt2_tensors()
    change(tensors)
    with pytest.raises(ValueError, match=message):
        load_model(write_folder(tmp_path / "bad", tensors)).model


def test_unsupported_config_and_missing_files_are_clear_errors(tmp_path):
    config = dict(HF_CONFIG, activation_function="relu")
    with pytest.raises(ValueError, match="activation_function"):
        load_model(write_folder(tmp_path / "relu", random_gpt2_tensors(), config)).model
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path / "empty")).model
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_model(str(tmp_path / "no_weights")).model
