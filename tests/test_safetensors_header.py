"""Untrusted weights folders: the safetensors header is checked against the file (offsets tile the data exactly) and
against the config (names, shapes, dtypes) before any model is built, so a 100-byte config.json cannot make a loader
allocate gigabytes. Covers nanollm.loader on a release folder, a GPT-2 folder and a ckpt.pt."""
import json
import shutil
import struct

import pytest
import torch

import nanollm.gpt2
import nanollm.model
from nanollm.export import export_release, write_safetensors
from nanollm.gpt2 import read_safetensors
from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig
from nanollm.tokenizer import Tokenizer, train_tokenizer

HUGE = dict(n_layer=48, n_embd=8192, n_head=64)  # ~11 GB of float32 if it were built


def safetensors_bytes(entries, data, header_size=None):
    """A .safetensors file written byte by byte: u64 little-endian header size, JSON header, data."""
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header) if header_size is None else header_size) + header + data


FOUR_FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)  # 16 bytes
BROKEN_FILES = [  # (header entries, data bytes, header size or None, the words the error must contain)
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, FOUR_FLOATS[:12], None, "'b'.*overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, FOUR_FLOATS, None, "'b'.*gap"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, FOUR_FLOATS[:8], None, "'a'.*past the data"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, FOUR_FLOATS, None, "8 bytes after the last"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, FOUR_FLOATS, None, "'a'.*needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, FOUR_FLOATS, None, "'a'.*bad shape"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, FOUR_FLOATS, None, "'a'.*bad data_offsets"),
    ({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, FOUR_FLOATS, None, "'a'.*unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, FOUR_FLOATS, 1 << 40, "header size"),
]


@pytest.mark.parametrize("entries, data, header_size, words", BROKEN_FILES,
                         ids=["overlap", "gap", "past_end", "trailing", "size", "shape", "offsets", "dtype", "hsize"])
def test_a_header_that_does_not_tile_the_file_is_refused_naming_file_and_tensor(tmp_path, entries, data,
                                                                                header_size, words):
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(entries, data, header_size))
    with pytest.raises(ValueError, match=f"w.safetensors: .*{words}"):
        read_safetensors(str(path))


def test_a_well_formed_file_still_reads_and_its_header_alone_gives_shapes(tmp_path):
    entries = {"__metadata__": {"format": "pt"}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]},
               "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
               "empty": {"dtype": "F16", "shape": [0, 5], "data_offsets": [16, 16]}}
    (tmp_path / "w.safetensors").write_bytes(safetensors_bytes(entries, FOUR_FLOATS))
    tensors = read_safetensors(str(tmp_path / "w.safetensors"))
    assert tensors["a"].tolist() == [1.0, 2.0, 3.0] and tensors["b"].tolist() == [4.0]
    assert tensors["empty"].shape == (0, 5) and tensors["empty"].dtype == torch.float16
    meta = read_safetensors(str(tmp_path / "w.safetensors"), device="meta")
    assert {name: (t.shape, t.is_meta) for name, t in meta.items()} == {
        "a": ((3,), True), "b": ((1,), True), "empty": ((0, 5), True)}


# ------------------------------------------------------------------------------ loaders build nothing first
@pytest.fixture
def no_real_model(monkeypatch):
    """Any GPT built outside the meta device fails the test at once (before it could allocate anything)."""
    class MetaOnlyGPT(GPT):
        def __init__(self, config):
            assert torch.get_default_device().type == "meta", (
                f"a real GPT (n_layer={config.n_layer}, n_embd={config.n_embd}) was built before the weights "
                f"were checked")
            super().__init__(config)

    monkeypatch.setattr(nanollm.model, "GPT", MetaOnlyGPT)
    monkeypatch.setattr(nanollm.gpt2, "GPT", MetaOnlyGPT)


SMALL = dict(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("release")
    texts = [f"person {i} lives in town {i % 7}." for i in range(200)]
    tokenizer = train_tokenizer(texts, str(folder / "tok"), vocab_size=300)
    torch.manual_seed(0)
    export_release(GPT(GPTConfig(**dict(SMALL, vocab_size=Tokenizer(tokenizer).vocab_size))), tokenizer,
                   str(folder / "release"))
    return folder / "release"


def rewrite_config(folder, **model_args):
    config = json.loads((folder / "config.json").read_text())
    config["model_args"].update(model_args)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("model_args, words", [
    (dict(n_embd=8192, n_head=64), r"model.safetensors: wte.weight has shape \(\d+, 16\), expected \(\d+, 8192\)"),
    (HUGE, r"model.safetensors: holds 28 tensors, fewer than the config's n_layer=48"),
    (dict(n_layer=3), r"model.safetensors: tensors do not match .*missing \['blocks.2.attn"),
    (dict(n_head=3), "config.json: model_args: n_embd=16 must be divisible by n_head=3"),
    (dict(n_head=0), "config.json: model_args: n_head must be a positive integer, got 0"),
    (dict(n_layer="2"), "config.json: model_args: n_layer must be a positive integer, got 2"),
    (dict(vocab_size=-5), "config.json: model_args: vocab_size must be a positive integer"),
    (dict(hidden_size=4), r"config.json: model_args: unknown model argument\(s\) \['hidden_size'\]"),
])
def test_load_release_checks_the_config_and_the_header_before_building(tmp_path, release, no_real_model,
                                                                       model_args, words):
    folder = shutil.copytree(release, tmp_path / "r")
    rewrite_config(folder, **model_args)
    with pytest.raises(ValueError, match=words):
        load_model(str(folder))


def test_load_release_refuses_a_weights_file_with_appended_bytes(tmp_path, release):
    folder = shutil.copytree(release, tmp_path / "r")
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0" * 64)
    config = json.loads((folder / "config.json").read_text())
    del config["weights_sha256"]  # the hash is optional; the header check does not depend on it
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors: 64 bytes after the last tensor"):
        load_model(str(folder))
    assert load_model(str(release)).model.config.n_layer == 2  # the untouched release still loads


def gpt2_folder(folder, n_layer, n_embd, weights):
    """A Hugging Face GPT-2 folder whose config.json claims n_layer x n_embd over a 1-layer, 16-wide file."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50, "n_positions": 8,
                                                    "n_embd": n_embd, "n_layer": n_layer, "n_head": 4}))
    torch.manual_seed(0)
    small = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=4, n_embd=16))
    tensors = nanollm.gpt2.gpt2_state_dict(small)
    if weights == "model.safetensors":
        write_safetensors({name: t for name, t in tensors.items() if name != "lm_head.weight"}, folder / weights)
    else:
        torch.save(tensors, folder / weights)
    return str(folder)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_gpt2_folder_with_a_huge_config_fails_before_building(tmp_path, no_real_model, weights):
    with pytest.raises(ValueError, match=f"{weights}: holds 1[67] tensors, fewer than the config's n_layer=48"):
        load_model(gpt2_folder(tmp_path / "huge", 48, 8192, weights)).model
    with pytest.raises(ValueError, match=rf"{weights}: wte.weight has shape \(50, 16\), expected \(50, 8192\)"):
        load_model(gpt2_folder(tmp_path / "wide", 1, 8192, weights)).model
    with pytest.raises(ValueError, match="config.json: n_head must be a positive integer, got 0"):
        folder = gpt2_folder(tmp_path / "zero", 1, 16, weights)
        config = json.loads((tmp_path / "zero" / "config.json").read_text())
        (tmp_path / "zero" / "config.json").write_text(json.dumps(dict(config, n_head=0)))
        load_model(folder).model


def test_our_checkpoint_with_huge_model_args_fails_before_building(tmp_path, no_real_model):
    torch.manual_seed(0)
    small_args = dict(vocab_size=50, block_size=8, n_layer=1, n_head=4, n_embd=16)
    with torch.device("meta"):  # only the state dict's names matter here; real weights are saved below
        names = list(GPT(GPTConfig(**small_args)).state_dict())
    weights = {name: torch.zeros(1) for name in names}
    torch.save({"model": weights, "model_args": dict(small_args, **HUGE), "config": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="ckpt.pt: holds 17 tensors, fewer than the config's n_layer=48"):
        load_model(str(tmp_path)).model
    torch.save({"model": weights, "model_args": small_args, "config": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"ckpt.pt: wte.weight has shape \(1,\), expected \(50, 16\)"):
        load_model(str(tmp_path)).model
