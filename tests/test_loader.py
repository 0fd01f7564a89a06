"""nanollm.loader: one function opens every kind of model file with the right class and the same logits; runtime
choices (attn_impl, dropout) are never saved as architecture, and old files that saved them still load."""
import json

import pytest
import torch

from nanollm.bert import BERT, BertConfig
from nanollm.checkpoint import save_checkpoint
from nanollm.configurator import UserError
from nanollm.distributed import Runtime
from nanollm.encdec import EncoderDecoder
from nanollm.export import export_release
from nanollm.gpt2 import save_gpt2
from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig, RUNTIME_FIELDS
from nanollm.prune import magnitude_prune, save_pruned
from nanollm.quantize import quantize_model, save_quantized
from nanollm.reward import RewardModel, build_backbone
from nanollm.tokenizer import Tokenizer, train_tokenizer

ARGS = dict(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=16)
IDX = torch.tensor([[2, 40, 41, 42, 43, 9, 3]])
CPU = Runtime(device="cpu", device_type="cpu")


def tiny(model_class=GPT, config_class=GPTConfig, **runtime):
    torch.manual_seed(0)
    return model_class(config_class(**ARGS, **runtime)).eval()


def save(folder, model, stage=None, model_type="gpt", **extra):
    """A checkpoint as the train_*.py scripts write it, through save_checkpoint."""
    if stage:
        extra["stage"] = stage
    save_checkpoint(str(folder / "ckpt.pt"), CPU, model, None, None, 0, 0.0, {"model_type": model_type},
                    dict(vars(model.config) if not isinstance(model, RewardModel) else vars(model.backbone.config)),
                    **extra)
    return folder


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    texts = [f"person {i} lives in town {i % 5}" for i in range(100)]
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "tokenizer"), vocab_size=300)


def test_a_saved_checkpoint_holds_the_architecture_only(tmp_path):
    save(tmp_path, tiny(attn_impl="manual", dropout=0.1))
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model_args"]
    assert saved == dict(ARGS, bias=True, init="normal", layer_norm_eps=1e-5, norm_position="pre", position="learned",
                         norm="layernorm", mlp="gelu", n_kv_head=0, qk_norm=False, tie_embeddings=True)
    assert not set(RUNTIME_FIELDS) & set(saved)


def test_a_checkpoint_saved_with_manual_attention_loads_with_sdpa_and_the_same_logits(tmp_path):
    trained = tiny(attn_impl="manual", dropout=0.1)
    save(tmp_path, trained)
    loaded = load_model(tmp_path, attn_impl="sdpa").model
    assert (loaded.config.attn_impl, loaded.config.dropout, loaded.training) == ("sdpa", 0.0, False)
    torch.testing.assert_close(loaded(IDX)[0], trained(IDX)[0], rtol=1e-5, atol=1e-6)
    assert load_model(tmp_path, attn_impl="manual", dropout=0.2).model.config.dropout == 0.2  # the caller's choice


def test_an_old_checkpoint_with_runtime_fields_in_model_args_still_loads(tmp_path):
    trained = tiny(attn_impl="manual")
    torch.save({"model": trained.state_dict(), "model_args": dict(ARGS, attn_impl="triton", dropout=0.3),
                "config": {"model_type": "gpt"}}, tmp_path / "ckpt.pt")
    model, _, kind, checkpoint = load_model(tmp_path / "ckpt.pt")
    assert (kind, model.config.attn_impl, model.config.dropout) == ("pretrain", "sdpa", 0.0)  # not the file's
    assert checkpoint["model_args"]["attn_impl"] == "triton"  # the file itself is left as it was
    torch.testing.assert_close(model(IDX)[0], trained(IDX)[0], rtol=1e-5, atol=1e-6)


def same_weights(model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    return set(ours) == set(theirs) and all(torch.equal(ours[name], theirs[name]) for name in ours)


@pytest.mark.parametrize("stage, model_type, model_class, config_class", [
    (None, "gpt", GPT, GPTConfig), (None, "bert", BERT, BertConfig), (None, "encdec", EncoderDecoder, GPTConfig),
    ("sft", "gpt", GPT, GPTConfig), ("ppo", "gpt", GPT, GPTConfig),
])
def test_every_stage_checkpoint_loads_as_its_model(tmp_path, tokenizer_path, stage, model_type, model_class,
                                                    config_class):
    trained = tiny(model_class, config_class, dropout=0.1)
    save(tmp_path, trained, stage, model_type)
    (tmp_path / "tokenizer.model").write_bytes(open(tokenizer_path, "rb").read())
    model, tokenizer, kind, checkpoint = load_model(tmp_path)
    assert type(model) is model_class and kind == (stage or "pretrain") and checkpoint["iter_num"] == 0
    assert isinstance(tokenizer, Tokenizer) and same_weights(model, trained) and model.config.dropout == 0.0


def test_a_reward_model_loads_with_its_head_and_bias(tmp_path):
    torch.manual_seed(0)
    trained = RewardModel(build_backbone("gpt", dict(ARGS, attn_impl="manual")), likelihood_weight=0.5).eval()
    trained.reward_bias.fill_(-1.25)
    save(tmp_path, trained, "reward", backbone="gpt", likelihood_weight=0.5)
    model, _, kind, _ = load_model(tmp_path, kinds=("reward",))
    mask = torch.ones_like(IDX)
    assert kind == "reward" and same_weights(model, trained)
    torch.testing.assert_close(model(IDX, mask), trained(IDX, mask))
    with pytest.raises(UserError, match="holds a 'reward' model, expected 'sft'"):
        load_model(tmp_path, kinds=("sft",))


def test_release_int8_pruned_and_gpt2_files_load_through_the_same_function(tmp_path, tokenizer_path):
    trained = tiny(attn_impl="manual")
    reference = trained(IDX)[0]
    release = export_release(trained, tokenizer_path, str(tmp_path / "release"))
    saved = json.load(open(tmp_path / "release" / "config.json"))["model_args"]
    assert not set(RUNTIME_FIELDS) & set(saved)  # nothing patched in, nothing to patch back
    model, tokenizer, kind, _ = load_model(release)
    assert kind == "release" and isinstance(tokenizer, Tokenizer) and model.config.attn_impl == "sdpa"
    torch.testing.assert_close(model(IDX)[0], reference, rtol=1e-5, atol=1e-6)

    save_gpt2(trained, tmp_path / "gpt2")
    model, tokenizer, kind, _ = load_model(tmp_path / "gpt2", attn_impl="manual")
    assert (kind, tokenizer, model.config.attn_impl) == ("gpt2", None, "manual")
    torch.testing.assert_close(model(IDX)[0], reference, rtol=1e-5, atol=1e-6)

    pruned = tiny()
    magnitude_prune(pruned, 0.5)
    save_pruned(pruned, str(tmp_path / "pruned" / "ckpt.pt"), "base", 0.5)
    model, _, kind, _ = load_model(tmp_path / "pruned")
    assert kind == "pruned" and same_weights(model, pruned)

    quantized = tiny()
    quantize_model(quantized)
    save_quantized(quantized, str(tmp_path / "int8" / "model_int8.pt"))
    assert not set(RUNTIME_FIELDS) & set(torch.load(tmp_path / "int8" / "model_int8.pt")["model_args"])
    model, _, kind, _ = load_model(tmp_path / "int8")
    assert kind == "int8" and torch.equal(model(IDX)[0], quantized(IDX)[0])


def test_a_folder_with_no_model_file_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ckpt.pt, model_int8.pt, release or Hugging Face GPT-2"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_model(tmp_path / "missing")
