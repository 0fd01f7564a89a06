"""Release folder (loads in a fresh process without training state, same logits) and ONNX export (optional packages)."""
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from nanollm.export import export_onnx, export_release, onnx_max_difference, write_safetensors
from nanollm.gpt2 import read_safetensors
from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig
from nanollm.tokenizer import Tokenizer, train_tokenizer
from conftest import require

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A training output folder: ckpt.pt with optimizer and RNG state (as train_sft.py writes) + tokenizer.model."""
    folder = tmp_path_factory.mktemp("ckpt")
    texts = [f"Question {i}: where does person {i} live? Person {i} lives in town {i % 7}." for i in range(200)]
    tokenizer = Tokenizer(train_tokenizer(texts, str(folder / "tokenizer"), vocab_size=300))
    args = dict(vocab_size=tokenizer.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
                bias=True, attn_impl="sdpa", init="normal")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": args,
                "config": {"model_type": "gpt"}, "iter_num": 1, "rng_states": [{"torch": torch.get_rng_state()}]},
               folder / "ckpt.pt")
    return folder


def test_safetensors_written_by_hand_reads_back_and_follows_the_layout(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor([1, -2], dtype=torch.int64),
               "c": torch.tensor([0.5], dtype=torch.bfloat16)}
    write_safetensors(tensors, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    header_size = struct.unpack("<Q", data[:8])[0]  # u64 little-endian
    assert header_size % 8 == 0
    header = json.loads(data[8:8 + header_size])
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b"]["data_offsets"] == [24, 40] and header["c"]["dtype"] == "BF16"
    assert len(data) == 8 + header_size + 42
    back = read_safetensors(tmp_path / "t.safetensors")  # nanollm/gpt2.py's independent reader
    assert all(torch.equal(back[name], tensors[name]) for name in tensors)


def test_release_cli_writes_a_folder_that_a_fresh_process_loads_with_identical_logits(tmp_path, checkpoint_dir):
    release = tmp_path / "release"
    result = subprocess.run([sys.executable, "-m", "nanollm.export", f"--out_dir={checkpoint_dir}",
                             f"--release_dir={release}", "--onnx=no"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(release)) == ["config.json", "model.safetensors", "tokenizer.model"]
    config = json.loads((release / "config.json").read_text())
    assert config["tied_weights"] == {"lm_head.weight": "wte.weight"}  # the tied matrix is stored once
    assert "optimizer" not in json.dumps(config) and "lm_head.weight" not in read_safetensors(
        release / "model.safetensors")
    # the release alone, moved away from the checkpoint, loaded by a new Python process
    moved = shutil.copytree(release, tmp_path / "elsewhere")
    idx = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.save(idx, tmp_path / "idx.pt")
    code = ("import sys, torch; from nanollm.loader import load_model; "
            "model, tokenizer, _, _ = load_model(sys.argv[1]); "
            "torch.save({'logits': model(torch.load(sys.argv[2]))[0], 'ids': tokenizer.encode('person 3', bos=True), "
            "'modules': sorted(m for m in sys.modules if m.startswith('nanollm'))}, sys.argv[3])")
    result = subprocess.run([sys.executable, "-c", code, str(moved), str(tmp_path / "idx.pt"), str(tmp_path / "o.pt")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO))  # the code, not the checkpoint
    assert result.returncode == 0, result.stderr[-2000:]
    out = torch.load(tmp_path / "o.pt")
    trained = load_model(str(checkpoint_dir)).model  # the training checkpoint, for reference
    with torch.no_grad():
        assert torch.equal(out["logits"], trained(idx)[0])
    assert out["ids"] == Tokenizer(str(checkpoint_dir / "tokenizer.model")).encode("person 3", bos=True)
    assert not any(name in out["modules"] for name in ("nanollm.training", "nanollm.optim", "nanollm.sft"))


def test_a_corrupted_weights_file_is_refused(tmp_path, checkpoint_dir):
    release = export_release(load_model(str(checkpoint_dir)).model, str(checkpoint_dir / "tokenizer.model"),
                             str(tmp_path / "release"))
    data = bytearray((tmp_path / "release" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "release" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_model(release)


def test_onnx_export_matches_pytorch_logits_in_onnxruntime(tmp_path, checkpoint_dir):
    require("onnx")  # optional packages: pip install onnx onnxscript onnxruntime (CI: a missing one fails)
    require("onnxruntime")
    model = load_model(str(checkpoint_dir)).model
    export_onnx(model, str(tmp_path / "model.onnx"), seq_len=12)
    idx = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    assert onnx_max_difference(model, str(tmp_path / "model.onnx"), idx) < 1e-4
