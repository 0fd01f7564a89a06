"""Export a GPT in the Hugging Face layout, the folder that `transformers`, vLLM, TGI and llama.cpp's converter read.

Teaches that a model is a contract of names, shapes and conventions: GPT-2's Conv1D stores (in, out) weights
(Radford et al. 2019); the Llama layout (Touvron et al. 2023) splits our fused q/k/v and SwiGLU matrices into
q/k/v/o_proj and gate/up/down_proj and rotates halves of each head (RoPE, Su et al. 2021), as our rotary layer does;
a SentencePiece BPE model (Kudo & Richardson 2018) is written as BPE merges ranked by piece score (tokenizer.json);
the chat template becomes Jinja. A choice with no standard equivalent is refused, naming the option.
    python -m nanollm.export --out_dir=out-sft --release_dir=hf-model --format=hf
"""
import json
import os
import shutil

import torch

from nanollm.configurator import UserError
from nanollm.export import TOKENIZER_FILE, write_safetensors
from nanollm.gpt2 import tensor_map
from nanollm.model import GPT, ROPE_BASE, GPTConfig
from nanollm.tokenizer import ASSISTANT, BOS, EOS, NUM_RESERVED, PAD, ROLE_TOKENS, UNK, Tokenizer

HF_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", TOKENIZER_FILE)
SPACE = "\u2581"  # SentencePiece's visible space "▁"
# The chat template of nanollm.tokenizer.encode_messages, in Jinja (what tokenizer.apply_chat_template runs):
#   <s> [<|system|> text] <|user|> text <|assistant|> text </s> ... and <|assistant|> to ask for an answer.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('role must be system, user or assistant, got ' + message['role']) -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + "' -}}{%- endif -%}")


# ----------------------------------------------------------------------------- which layout fits
def hf_layout(config: GPTConfig):
    """'gpt2' (learned positions, LayerNorm, GELU MLP), 'llama' (RoPE, RMSNorm, SwiGLU) or 'qwen3' (Llama's block with
    RMSNorm on each head's queries and keys); any option none of them can express is a one-line UserError naming it."""
    position, norm, mlp, qk_norm = config.position, config.norm, config.mlp, config.qk_norm
    grouped = config.kv_heads != config.n_head
    if config.norm_position != "pre":
        raise UserError(f"norm_position={config.norm_position!r}: GPT-2 and Llama are pre-norm; no Hugging Face "
                        f"layout here has post-norm blocks")
    if (position, norm, mlp) == ("learned", "layernorm", "gelu"):
        if qk_norm or grouped:
            name = "qk_norm=True" if qk_norm else f"n_kv_head={config.n_kv_head}"
            raise UserError(f"{name}: GPT-2's block has no such option (the Llama layout, position='rope', "
                            f"norm='rmsnorm', mlp='swiglu', has grouped-query attention and, as Qwen3, QK-norm)")
        return "gpt2"
    if (position, norm, mlp) == ("rope", "rmsnorm", "swiglu"):
        if qk_norm and config.bias:
            raise UserError("bias=True with qk_norm=True: Qwen3, the layout with QK-norm, has no MLP biases")
        return "qwen3" if qk_norm else "llama"
    for name, value, gpt2, llama in (("position", position, "learned", "rope"), ("norm", norm, "layernorm", "rmsnorm"),
                                     ("mlp", mlp, "gelu", "swiglu")):
        if value not in (gpt2, llama):
            raise UserError(f"{name}={value!r}: no Hugging Face layout here has it (GPT-2: {name}={gpt2!r}, Llama: "
                            f"{name}={llama!r})")
    raise UserError(f"position={position!r}, norm={norm!r}, mlp={mlp!r}: a mix of GPT-2 (learned, layernorm, gelu) "
                    f"and Llama (rope, rmsnorm, swiglu) options, which no layout has")


# ----------------------------------------------------------------------------- GPT-2 layout
def gpt2_tensors(model):
    """GPT2LMHeadModel's state dict: 'transformer.' names, Conv1D weights (in, out) = our Linear (out, in) transposed.
    bias=False is written as zero biases (GPT-2 has them everywhere; zero adds nothing, the logits are the same)."""
    ours = model.state_dict()
    tensors = {}
    for name, (theirs, transposed) in tensor_map(model.config.n_layer).items():
        if name in ours:
            tensor = ours[name].detach()
            tensors[f"transformer.{theirs}"] = (tensor.t() if transposed else tensor).contiguous()
        else:  # a bias of a bias=False model: its size is that of the layer's output
            weight = ours[name.removesuffix(".bias") + ".weight"]
            tensors[f"transformer.{theirs}"] = weight.new_zeros(weight.shape[0])
    if not model.config.tie_embeddings:
        tensors["lm_head.weight"] = ours["lm_head.weight"].detach()
    return tensors


def gpt2_config(config):
    """GPT2LMHeadModel's config.json: GELU in its tanh form ('gelu_new'), n_inner None = 4·n_embd, no dropout."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.layer_norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "tie_word_embeddings": config.tie_embeddings}


# ----------------------------------------------------------------------------- Llama layout (and Qwen3's)
def llama_tensors(model):
    """LlamaForCausalLM's state dict. Our c_attn rows are [q (C) | k (H_kv·D) | v (H_kv·D)] and our c_fc rows
    [gate (h) | value (h)] (SwiGLU = silu(x·gate) ⊙ x·value): both are cut into Llama's separate matrices.
    Our RoPE rotates the halves (x_i, x_{i+D/2}) of each head, as Llama's rotate_half: q and k need no permutation.
    QK-norm's per-head RMSNorm scales are Qwen3's q_norm and k_norm (applied, as ours, before the rotation)."""
    config, ours = model.config, model.state_dict()
    kv_size = config.kv_heads * config.head_dim
    tensors = {"model.embed_tokens.weight": ours["wte.weight"], "model.norm.weight": ours["ln_f.weight"]}
    for layer in range(config.n_layer):
        ours_prefix, prefix = f"blocks.{layer}.", f"model.layers.{layer}."
        for kind in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = ours[f"{ours_prefix}attn.c_attn.{kind}"].split([config.n_embd, kv_size, kv_size])
            gate, value = ours[f"{ours_prefix}mlp.c_fc.{kind}"].chunk(2)
            tensors.update({f"{prefix}self_attn.q_proj.{kind}": q, f"{prefix}self_attn.k_proj.{kind}": k,
                            f"{prefix}self_attn.v_proj.{kind}": v,
                            f"{prefix}self_attn.o_proj.{kind}": ours[f"{ours_prefix}attn.c_proj.{kind}"],
                            f"{prefix}mlp.gate_proj.{kind}": gate, f"{prefix}mlp.up_proj.{kind}": value,
                            f"{prefix}mlp.down_proj.{kind}": ours[f"{ours_prefix}mlp.c_proj.{kind}"]})
        tensors[f"{prefix}input_layernorm.weight"] = ours[f"{ours_prefix}ln_1.weight"]
        tensors[f"{prefix}post_attention_layernorm.weight"] = ours[f"{ours_prefix}ln_2.weight"]
        if config.qk_norm:
            tensors[f"{prefix}self_attn.q_norm.weight"] = ours[f"{ours_prefix}attn.q_norm.weight"]
            tensors[f"{prefix}self_attn.k_norm.weight"] = ours[f"{ours_prefix}attn.k_norm.weight"]
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = ours["lm_head.weight"]
    return {name: tensor.detach().contiguous() for name, tensor in tensors.items()}


def llama_config(model, layout):
    """LlamaForCausalLM's (or Qwen3ForCausalLM's) config.json."""
    config = model.config
    fields = {"vocab_size": config.vocab_size, "hidden_size": config.n_embd,
              "intermediate_size": model.blocks[0].mlp.c_proj.in_features, "num_hidden_layers": config.n_layer,
              "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads,
              "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.block_size,
              "rms_norm_eps": config.layer_norm_eps, "rope_theta": ROPE_BASE, "rope_scaling": None,
              "attention_bias": config.bias, "attention_dropout": 0.0, "tie_word_embeddings": config.tie_embeddings}
    if layout == "qwen3":
        return dict(fields, model_type="qwen3", architectures=["Qwen3ForCausalLM"], use_sliding_window=False,
                    sliding_window=None, max_window_layers=config.n_layer)
    return dict(fields, model_type="llama", architectures=["LlamaForCausalLM"], mlp_bias=config.bias)


# ----------------------------------------------------------------------------- tokenizer
def check_tokenizer(tokenizer: Tokenizer):
    """tokenizer.json is written for a SentencePiece BPE model with byte fallback (train_tokenizer's default).
    SentencePiece BPE scores its pieces by merge order (0, -1, -2, ...), unigram by log-probabilities."""
    processor = tokenizer.processor
    if not processor.is_byte(processor.piece_to_id("<0x00>")):
        raise UserError(f"{tokenizer.model_path}: no byte-fallback pieces; the export needs byte_fallback=True")
    if not all(processor.get_score(i).is_integer() for i in range(NUM_RESERVED, tokenizer.vocab_size)):
        raise UserError(f"{tokenizer.model_path}: a unigram SentencePiece model; the Hugging Face export writes "
                        f"BPE tokenizers only (train_tokenizer(..., model_type='bpe'))")


def bpe_merges(processor):
    """SentencePiece BPE as ranked merges: every split of a piece into two pieces is a merge producing it, ranked by
    the piece's score (highest first). Applying the lowest-ranked merge available at each step is what
    SentencePiece's encoder does (merge the adjacent pair whose union scores highest), so the ids are the same."""
    normal = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())
              if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i)
                      or i < NUM_RESERVED)}
    merges = []
    for piece, index in normal.items():
        for cut in range(1, len(piece)):
            if piece[:cut] in normal and piece[cut:] in normal:
                merges.append((-processor.get_score(index), index, cut, f"{piece[:cut]} {piece[cut:]}"))
    return [merge for *_, merge in sorted(merges)]


def tokenizer_json(tokenizer: Tokenizer):
    """The `tokenizers` library's file for our tokenizer: normalize_text (line ends, control characters, NFKC) as
    normalizers, spaces as "▁", byte fallback, the 8 reserved pieces as special tokens matched in raw text."""
    processor = tokenizer.processor

    def replace(pattern, content, kind="String"):
        return {"type": "Replace", "pattern": {kind: pattern}, "content": content}

    specials = [UNK, PAD, BOS, EOS] + ROLE_TOKENS
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": index, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for index, piece in enumerate(specials)],
        "normalizer": {"type": "Sequence", "normalizers": [  # nanollm.clean.normalize_text, then SentencePiece's "▁"
            replace("\r\n", "\n"), replace("\r", "\n"),
            replace("[\\x{0}-\\x{8}\\x{b}-\\x{1f}\\x{7f}-\\x{9f}\\x{feff}]", "", kind="Regex"),
            {"type": "NFKC"}, replace(" ", SPACE)]},
        "pre_tokenizer": None,  # no piece has "▁" after another character: BPE over the text = SentencePiece's per word
        "post_processor": None,  # no <s> added: the chat template writes it, as encode(bos=True) does
        "decoder": {"type": "Sequence", "decoders": [
            replace(SPACE, " "), {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": UNK, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {processor.id_to_piece(i): i for i in range(tokenizer.vocab_size)},
                  "merges": bpe_merges(processor)},
    }


def tokenizer_files(tokenizer: Tokenizer, block_size):
    """{file name: JSON object}: tokenizer.json, tokenizer_config.json (with the chat template), special tokens."""
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
               "additional_special_tokens": list(ROLE_TOKENS)}
    config = dict(special, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False,
                  add_prefix_space=False,  # no "▁" before the text (SentencePiece's add_dummy_prefix=False)
                  clean_up_tokenization_spaces=False, model_max_length=block_size, padding_side="left",
                  chat_template=CHAT_TEMPLATE)
    return {"tokenizer.json": tokenizer_json(tokenizer), "tokenizer_config.json": config,
            "special_tokens_map.json": special}


# ----------------------------------------------------------------------------- the folder
def export_hf(model, tokenizer_path, out):
    """Write the Hugging Face folder of `model` (a GPT) and its tokenizer to `out`; returns (out, layout).
    Everything is checked and built before the first file is written; each file is written whole, then renamed."""
    if not isinstance(model, GPT):
        raise UserError(f"a {type(model).__name__}: only the GPT (decoder-only) has a Hugging Face layout here")
    if any(".parametrizations." in name for name in model.state_dict()):
        raise UserError("the model still holds pruning masks: call nanollm.prune.make_permanent first")
    layout = hf_layout(model.config)
    with torch.device("meta"):
        plain = set(GPT(model.config).state_dict())
    if set(model.state_dict()) != plain:
        raise UserError(f"the model's tensors are not a plain GPT's (int8 layers?): "
                        f"{sorted(set(model.state_dict()) ^ plain)[:3]}")
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{tokenizer_path}: {tokenizer.vocab_size} pieces, but the model has vocab_size="
                        f"{model.config.vocab_size}")
    check_tokenizer(tokenizer)
    config, tensors = (gpt2_config(model.config), gpt2_tensors(model)) if layout == "gpt2" else \
        (llama_config(model, layout), llama_tensors(model))
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    dtype = str(model.wte.weight.dtype).removeprefix("torch.")
    documents = {"config.json": dict(config, torch_dtype=dtype, **ids), "generation_config.json": ids,
                 **tokenizer_files(tokenizer, model.config.block_size)}
    os.makedirs(out, exist_ok=True)
    for name, document in documents.items():
        with open(os.path.join(out, name + ".tmp"), "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2, ensure_ascii=False)
    write_safetensors({name: tensor.cpu() for name, tensor in tensors.items()},
                      os.path.join(out, "model.safetensors.tmp"), metadata={"format": "pt"})
    shutil.copyfile(tokenizer_path, os.path.join(out, TOKENIZER_FILE + ".tmp"))  # llama.cpp reads tokenizer.model
    for name in HF_FILES:
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    return out, layout
