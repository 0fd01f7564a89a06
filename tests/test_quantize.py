"""Int8 weight-only quantization: the per-channel error bound, QuantLinear against F.linear, and the saved file."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nanollm.quantize as quantize
from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig
from nanollm.quantize import (QuantLinear, dequantize, quantizable_linears, quantize_model,
                              quantize_per_channel, save_quantized)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()


@pytest.fixture
def path(request):
    """Restore the module-level matmul choice after each test."""
    yield
    quantize.matmul_path = "auto"


def test_quantize_dequantize_error_bounded_per_channel():
    torch.manual_seed(0)
    weight = torch.randn(6, 40) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 0.5, 1.0])[:, None]  # rows of very different size
    weight[4] = 0.0  # an all-zero (pruned) row
    weight[5, 7] = 50.0  # an outlier: its row gets a coarse scale, the other rows do not
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert int(q.abs().max()) <= 127
    expected_scale = weight.abs().amax(dim=1) / 127  # scale = max|w_row| / 127
    nonzero = expected_scale > 0
    assert torch.equal(scale[nonzero], expected_scale[nonzero])
    error = (weight - dequantize(q, scale)).abs()  # (6, 40)
    assert torch.all(error <= scale[:, None] / 2 + 1e-6 * weight.abs())  # round to nearest: half a step at most
    assert torch.equal(dequantize(q, scale)[4], torch.zeros(40))  # a zero row stays exactly zero
    assert set(q.abs().amax(dim=1)[nonzero].tolist()) == {127}  # each row's largest |w| uses the full range


def test_quant_linear_matches_linear_with_dequantized_weights(path):
    torch.manual_seed(0)
    linear = nn.Linear(24, 10)
    module = QuantLinear.from_linear(linear)
    x = torch.randn(3, 5, 24)  # (B, T, C)
    q, scale = quantize_per_channel(linear.weight)
    expected = F.linear(x, q.float() * scale[:, None], linear.bias)  # plain PyTorch with the dequantized weight
    quantize.matmul_path = "reference"
    assert torch.allclose(module(x), expected, atol=1e-6)
    if quantize.int8pack_available():  # the fast CPU kernel must agree with the readable path
        quantize.matmul_path = "int8pack"
        assert torch.allclose(module(x), expected, atol=1e-5)
        assert torch.allclose(module(x[:, :1]), expected[:, :1], atol=1e-5)  # one row per sequence: decoding
    # and it is close to the float layer, by a bound from the scales: |Σ_i x_i (w_ji - ŵ_ji)| <= (s_j / 2) · Σ_i |x_i|
    with torch.no_grad():
        error = (module(x) - linear(x)).abs()  # (B, T, out)
    bound = x.abs().sum(-1, keepdim=True) * module.scale / 2  # (B, T, out)
    assert torch.all(error <= bound + 1e-6) and error.max() > 0


def test_quantize_model_replaces_linears_but_not_the_tied_embedding(path):
    model = tiny_gpt()
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        float_logits = model(idx)[0]
    names = quantize_model(model)
    assert len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.wte.weight  # still tied, float
    # the reference: the float model with each Linear's weight replaced by its dequantized copy, q · s
    reference = tiny_gpt()
    for _, _, _, linear in quantizable_linears(reference):
        linear.weight.data = dequantize(*quantize_per_channel(linear.weight))
    with torch.no_grad():
        logits = model(idx)[0]
        assert torch.allclose(logits, reference(idx)[0], atol=1e-5)
    assert not torch.allclose(logits, float_logits, atol=1e-5)  # rounding did change something
    # KV-cache generation runs on the quantized model and equals generation without the cache
    cached = model.generate(idx[:1, :4], 8, temperature=0.0)
    uncached = model.generate(idx[:1, :4], 8, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.slow  # a subprocess
def test_saved_file_holds_int8_and_loads_in_a_fresh_process_with_identical_logits(tmp_path, path):
    model = tiny_gpt()
    quantize_model(model)
    file = tmp_path / "model_int8.pt"
    save_quantized(model, file)
    stored = torch.load(file, weights_only=True)
    int8_tensors = [name for name, t in stored["state_dict"].items() if t.dtype == torch.int8]
    assert len(int8_tensors) == 8 and all(name.endswith("weight_int8") for name in int8_tensors)
    # bytes of tensor data, each storage once: every quantized weight drops from 4 bytes to 1, plus a 4-byte scale per
    # row (hand count for n_embd 16: per block 48+16+64+16 = 144 rows and 16·48+16·16+16·64+64·16 = 3072 weights)
    def data_bytes(state):
        return sum({t.data_ptr(): t.numel() * t.element_size() for t in state.values()}.values())
    assert data_bytes(tiny_gpt().state_dict()) - data_bytes(stored["state_dict"]) == 2 * (3 * 3072 - 4 * 144)

    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.save(idx, tmp_path / "idx.pt")
    code = ("import sys, torch; from nanollm.loader import load_model; "
            "m = load_model(sys.argv[1]).model; idx = torch.load(sys.argv[2]); "
            "torch.save(m(idx)[0], sys.argv[3])")
    result = subprocess.run([sys.executable, "-c", code, str(file), str(tmp_path / "idx.pt"),
                             str(tmp_path / "logits.pt")], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        expected = model(idx)[0]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    assert torch.equal(load_model(file).model(idx)[0], expected)  # and in this process


def test_load_refuses_a_file_that_is_not_an_int8_model(tmp_path):
    torch.save({"model": {}, "model_args": {}}, tmp_path / "ckpt.pt")  # a training checkpoint: no 'format' field
    with pytest.raises(ValueError, match="ckpt.pt: not a nanollm checkpoint \\(no 'config'\\)"):
        load_model(tmp_path / "ckpt.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a nanollm checkpoint \\(no 'model'\\)"):
        load_model(tmp_path / "other.pt")
