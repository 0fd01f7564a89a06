"""Runtime choices that must not change what is computed: train_pretrain.py under --dtype=bfloat16 (CPU autocast),
--attn_impl=triton (our kernel, through the Triton interpreter on a CPU) and --compile=True gives the float32 run's
losses; KV-cache decoding with attn_impl='triton', or under bfloat16 autocast, equals the full forward pass."""
import json
import os

import pytest
import torch

from conftest import require
from nanollm.data import prepare_dataset
from nanollm.model import GPT, GPTConfig
from script_runner import run_script, write_corpus

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=1",
        "--log_interval=1", "--warmup_iters=1", "--learning_rate=3e-3", "--device=cpu", "--sample_tokens=3",
        "--dropout=0.0", "--max_iters=3", "--eval_interval=3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("variants_corpus")
    write_corpus(folder, 400)
    return prepare_dataset(str(folder / "text.txt"), str(folder / "prepared"), vocab_size=400)


def train(data_dir, out_dir, *args, unset=()):
    """Three iterations of train_pretrain.py; returns (per-iteration losses, the run's output)."""
    result = run_script("train_pretrain.py", TINY + [f"--dataset={data_dir}", f"--out_dir={out_dir}", *args],
                        unset=unset)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        losses = [record["loss"] for record in map(json.loads, f) if "loss" in record]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    return losses, result.stdout + result.stderr


@pytest.fixture(scope="module")
def float32_losses(data_dir, tmp_path_factory):
    return train(data_dir, tmp_path_factory.mktemp("float32"), "--dtype=float32")[0]


@pytest.mark.slow
def test_bfloat16_autocast_on_cpu_trains_like_float32(data_dir, float32_losses, tmp_path):
    losses, out = train(data_dir, tmp_path, "--dtype=bfloat16")
    assert "dtype=bfloat16" in out
    differences = [abs(a - b) for a, b in zip(losses, float32_losses)]
    # bfloat16 keeps 8 bits of mantissa: a relative rounding of 2^-8 ≈ 0.4 % per operation; the loss (~6) may move by
    # a few hundredths, no more. It must move: equal losses would mean autocast never ran.
    assert max(differences) < 0.03 and max(differences) > 0, (losses, float32_losses)


@pytest.mark.slow
def test_triton_attention_trains_like_sdpa(data_dir, float32_losses, tmp_path):
    require("triton")  # a dependency on Linux only
    losses, out = train(data_dir, tmp_path, "--dtype=float32", "--attn_impl=triton")
    assert "attn_impl=triton" in out
    assert losses == pytest.approx(float32_losses, abs=1e-4)  # the same arithmetic in another order


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is chosen only where there is no GPU")
def test_triton_attention_on_a_cpu_needs_no_triton_interpret_setting(data_dir, float32_losses, tmp_path):
    require("triton")
    losses, out = train(data_dir, tmp_path, "--dtype=float32", "--attn_impl=triton", unset=("TRITON_INTERPRET",))
    assert "attn_impl=triton" in out and "error" not in out
    assert losses == pytest.approx(float32_losses, abs=1e-4)


@pytest.mark.slow  # the compiler's first run: about half a minute of C++ compilation on a CPU
def test_compiled_model_trains_like_eager_and_saves_plain_parameter_names(data_dir, float32_losses, tmp_path):
    losses, out = train(data_dir, tmp_path, "--dtype=float32", "--compile=True")
    assert losses == pytest.approx(float32_losses, abs=1e-4)  # the same arithmetic, fused
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    assert not any(name.startswith(("_orig_mod.", "module.")) for name in state)  # the unwrapped module's names
    model = GPT(GPTConfig(**torch.load(tmp_path / "ckpt.pt", weights_only=True)["model_args"]))
    model.load_state_dict(state)  # strict: every name matches a plain GPT


def test_kv_cache_decoding_under_bfloat16_autocast_equals_uncached_decoding():
    """The CPU autocast of --dtype=bfloat16 around cached decoding: the cache holds bfloat16 keys and values, and
    greedy tokens and per-step logits agree with the full forward under the same autocast."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=24, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full_logits, _ = model(idx)
        assert full_logits.dtype == torch.bfloat16  # autocast did run
        cache = model.new_kv_cache(2, 12)
        step_logits = [model(idx[:, :5], kv_cache=cache)[0]] + [model(idx[:, t:t + 1], kv_cache=cache)[0]
                                                                  for t in range(5, 12)]
        cached = model.generate(idx[:, :4], 12, temperature=0)
        uncached = model.generate(idx[:, :4], 12, temperature=0, use_cache=False)
    # bfloat16 keeps 8 bits: a cached step and the full pass may round differently, by a few units of 2^-8·max|logit|
    # (the logits here spread ~0.1: a wrong position or mask would be off by that much)
    bound = 4 * 2 ** -8 * full_logits.float().abs().max().item()
    torch.testing.assert_close(torch.cat(step_logits, dim=1).float(), full_logits.float(), rtol=0, atol=bound)
    assert torch.equal(cached, uncached)


def test_kv_cache_decoding_with_triton_attention_equals_the_full_forward():
    require("triton")
    torch.manual_seed(0)
    config = dict(vocab_size=97, block_size=24, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    model = GPT(GPTConfig(**config, attn_impl="triton")).eval()
    manual = GPT(GPTConfig(**config, attn_impl="manual")).eval()
    manual.load_state_dict(model.state_dict())  # the plain-math reference with the same weights
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_logits, _ = model(idx)  # the Triton kernel over the whole sequence
        torch.testing.assert_close(full_logits, manual(idx)[0], rtol=1e-4, atol=1e-5)
        cache = model.new_kv_cache(2, 12)
        step_logits = [model(idx[:, :5], kv_cache=cache)[0]]  # a 5-token prompt, then one token at a time
        step_logits += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full_logits, rtol=1e-4, atol=1e-5)
    cached = model.generate(idx[:, :4], 10, temperature=0)
    assert torch.equal(cached, model.generate(idx[:, :4], 10, temperature=0, use_cache=False))
    assert torch.equal(cached, manual.generate(idx[:, :4], 10, temperature=0))
