"""Splitting one model over several processes with PyTorch's own engine: FSDP2 and tensor parallelism.

DDP keeps a whole copy of the weights, gradients and optimizer moments on every process. FSDP (Zhao et al. 2023;
ZeRO stage 3, Rajbhandari et al. 2020) keeps 1/N of each on every process and all-gathers a block's weights just
before that block runs. Tensor parallelism (Shoeybi et al. 2019, Megatron-LM) splits the matrices themselves: the
first linear layer of attention and MLP by output columns, the second by input rows, so each process computes its own
heads (and its own slice of the MLP) and one all-reduce per sublayer sums the partial outputs.
"""
import contextlib
import os

import torch
import torch.nn as nn

from nanollm.configurator import UserError

# torch.distributed's FSDP, tensor-parallel and state-dict modules take seconds to import: each function below
# imports what it uses, so a single-process run does not pay for them.

PARALLELISMS = ("ddp", "fsdp", "tp")  # whole copies | sharded weights, gradients, moments | split matrices


def check_parallelism(settings, n_head=None, n_embd=None, world_size=None):
    """Before any work: the parallelism setting names a known scheme, and with 'tp' the heads (n_head, when the
    settings give it) split evenly over the processes torchrun starts (WORLD_SIZE)."""
    parallelism = settings.get("parallelism", "ddp")
    if parallelism not in PARALLELISMS:
        raise UserError(f"parallelism={parallelism!r}: expected one of {PARALLELISMS}")
    if parallelism != "ddp" and settings.get("optimizer", "adamw") not in ("adamw", "muon"):
        raise UserError(f"parallelism={parallelism!r} is tested with optimizer='adamw' or 'muon' only (LAMB and LARS "
                        f"take norms of whole matrices, which are split here); got optimizer={settings['optimizer']!r}")
    world_size = world_size or int(os.environ.get("WORLD_SIZE", 1))
    kv_heads = settings.get("n_kv_head") or n_head
    if parallelism == "tp" and n_head and (n_head % world_size or kv_heads % world_size or n_embd % world_size):
        raise UserError(f"parallelism='tp' over {world_size} processes: n_head={n_head}, the key/value heads "
                        f"({kv_heads}) and n_embd={n_embd} must each be a multiple of {world_size}")


def device_mesh(device_type, world_size, parallelism):
    """The processes as a 1-D DeviceMesh named after what its dimension splits: data ('dp') or tensors ('tp')."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("tp" if parallelism == "tp" else "dp",))


def transformer_blocks(model):
    """(name, block) of every transformer block: a module with an `attn` and an `mlp` (nanollm/model.py Block)."""
    return [(name, module) for name, module in model.named_modules() if hasattr(module, "attn")
            and hasattr(module, "mlp")]


# ------------------------------------------------------------------------------------------------------- FSDP
def shard_fully(model, mesh, dtype="float32"):
    """FSDP2 in place: every block is one unit (its weights gathered just before it runs, freed after), then the
    whole model (embeddings, final norm, head, and the encoder-decoder's decoder blocks). With bfloat16 the gathered
    weights are cast to bf16 for the matmuls and gradients are reduced in fp32 (a MixedPrecisionPolicy); the sharded
    weights and moments stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == "bfloat16" else MixedPrecisionPolicy()
    for _, block in transformer_blocks(model):
        if getattr(block, "cross_attn", None) is None:  # a decoder block's cross-attention keys and values are
            fully_shard(block, mesh=mesh, mp_policy=policy)  # computed outside its forward (encdec.py): root unit
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def no_gradient_sync(model):
    """FSDP2's counterpart of DDP's no_sync: gradients of this micro-step are kept whole and added up on every rank,
    then reduce-scattered once, on the accumulation's last micro-step."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# -------------------------------------------------------------------------------------------- tensor parallel
def fused_sections(block):
    """{linear layer name (in the block): the widths of the outputs fused in it}: c_attn holds [q | k | v] side by
    side (model.py SelfAttention); a SwiGLU MLP's c_fc holds [gate | value]."""
    attn, mlp = block.attn, block.mlp
    q_size = attn.c_proj.in_features  # n_head · head_dim; the layers' in/out_features stay the full sizes when split
    sections = {"attn.c_attn": [q_size] + 2 * [(attn.c_attn.out_features - q_size) // 2]}
    if getattr(mlp, "kind", "gelu") == "swiglu":
        sections["mlp.c_fc"] = 2 * [mlp.c_fc.out_features // 2]
    return sections


def rows_for_ranks(tensor, sections, parts, inverse=False):
    """Reorder the output rows of a fused linear layer so that cutting them into `parts` equal consecutive pieces
    (what column parallelism does) gives piece r the r-th part of every section: [q | k | v] becomes
    [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], so each rank holds whole heads of q, k and v. inverse=True undoes it."""
    if inverse:
        pieces = [piece.split([size // parts for size in sections]) for piece in tensor.chunk(parts)]
        return torch.cat([torch.cat([piece[s] for piece in pieces]) for s in range(len(sections))])
    chunks = [section.chunk(parts) for section in tensor.split(sections)]  # [section][rank]
    return torch.cat([chunk[rank] for rank in range(parts) for chunk in chunks])


def fused_state_keys(model):
    """{state-dict key of a fused layer's weight or bias: its sections}."""
    keys = {}
    for name, block in transformer_blocks(model):
        for layer, sections in fused_sections(block).items():
            keys.update({f"{name}.{layer}.{kind}": sections for kind in ("weight", "bias")})
    return keys


def reorder_fused(state, model, parts, inverse=False):
    """A full model state dict with its fused layers' rows in the tensor-parallel order (or back to the model's own
    order with inverse=True)."""
    keys = fused_state_keys(model)
    return {key: rows_for_ranks(value, keys[key], parts, inverse) if key in keys else value
            for key, value in state.items()}


def reorder_fused_moments(state, model, parts, inverse=False):
    """The same for an optimizer's state {parameter name: {moment name: tensor}}: AdamW's moments, Muon's momentum
    buffers (a step count is left alone)."""
    keys = fused_state_keys(model)
    return {name: {key: rows_for_ranks(value, keys[name], parts, inverse)
                   if name in keys and torch.is_tensor(value) and value.dim() > 0 else value
                   for key, value in values.items()} for name, values in state.items()}


def split_tensors(model, mesh):
    """Tensor parallelism in place over the 1-D mesh: in every block, c_attn (q, k, v) and the MLP's c_fc are
    column-parallel (each rank computes n_head / tp heads and 1/tp of the hidden units), the two c_proj are row-parallel
    (their partial outputs are summed by an all-reduce). Everything else is replicated (replicate_rest)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    parts = mesh.size()
    plan = {}
    for name, block in transformer_blocks(model):
        if block.attn.n_kv_head % parts or block.mlp.c_proj.in_features % parts:
            raise UserError(f"parallelism='tp' over {parts} processes: the model's heads (n_head={block.attn.n_head}, "
                            f"key/value heads {block.attn.n_kv_head}) must be multiples of {parts}")
        for layer, sections in fused_sections(block).items():
            linear = block.get_submodule(layer)
            with torch.no_grad():  # rows reordered before the split, so that every rank gets whole heads
                for kind in ("weight", "bias"):
                    if getattr(linear, kind) is not None:
                        getattr(linear, kind).copy_(rows_for_ranks(getattr(linear, kind), sections, parts))
        block.attn.n_head //= parts  # the heads this rank computes: the attention reads its head counts from these
        block.attn.n_kv_head //= parts
        plan.update({f"{name}.attn.c_attn": ColwiseParallel(), f"{name}.attn.c_proj": RowwiseParallel(),
                     f"{name}.mlp.c_fc": ColwiseParallel(), f"{name}.mlp.c_proj": RowwiseParallel()})
    parallelize_module(model, mesh, plan)
    replicate_rest(model, mesh)
    return model


def replicate_rest(model, mesh):
    """Every parameter not split above (embeddings, norms, the head) becomes a replicated DTensor, one full copy per
    rank, so the optimizer and gradient clipping see a single kind of tensor. Each such module takes and returns plain
    tensors (hooks convert at its edges); a weight shared by two modules (tied embeddings) stays shared."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    replicated = {}  # id(plain parameter) -> its DTensor parameter

    def to_dtensors(module, args, kwargs):
        convert = (lambda x: DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                   if torch.is_tensor(x) and not isinstance(x, DTensor) else x)
        return tuple(convert(a) for a in args), {k: convert(v) for k, v in kwargs.items()}

    def to_local(module, args, output):
        return output.to_local() if isinstance(output, DTensor) else output

    for module in model.modules():
        plain = [(name, p) for name, p in module.named_parameters(recurse=False) if not isinstance(p, DTensor)]
        for name, param in plain:
            if id(param) not in replicated:
                replicated[id(param)] = nn.Parameter(distribute_tensor(param.detach(), mesh, [Replicate()]),
                                                     requires_grad=param.requires_grad)
            module.register_parameter(name, replicated[id(param)])
        if plain:
            module.register_forward_pre_hook(to_dtensors, with_kwargs=True)
            module.register_forward_hook(to_local)
    return model


# ------------------------------------------------------------------------------------------------ checkpoints
# Gather on save: rank 0 writes one ordinary ckpt.pt with full tensors in the model's own layout, so the one loader
# (nanollm/loader.py), a single-process resume and any other parallelism read it unchanged. Each tensor is gathered
# and moved to the CPU one at a time (cpu_offload), so no process ever holds the whole model on its device. The cost
# is rank 0's CPU memory (the whole state) and one writer; torch.distributed.checkpoint (every rank writes its shards
# in parallel) scales further but needs a conversion step before a single process can read it.
def parameter_names(model, optimizer):
    """The name of each parameter the optimizer updates, in the order of optimizer.state_dict()'s integer ids."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_state(model, optimizer, tensor_parallel):
    """Full model and optimizer state dicts, as a single process's model.state_dict() and optimizer.state_dict()
    would be. Every rank must call it (collectives); rank 0 receives them, the other ranks ({}, None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # one tensor at a time gathered to rank 0's CPU
    model_state = get_model_state_dict(model, options=full)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=full) if optimizer is not None else None
    if not model_state:  # not rank 0
        return {}, None
    parts = torch.distributed.get_world_size()
    if tensor_parallel:
        model_state = reorder_fused(model_state, model, parts, inverse=True)
    if optimizer_state is not None:  # keyed by name -> keyed by integer id, as optimizer.state_dict() is
        names = parameter_names(model, optimizer)
        index = {name: i for i, name in enumerate(names)}
        state = optimizer_state["state"]
        if tensor_parallel:
            state = reorder_fused_moments(state, model, parts, inverse=True)
        state = {index[name]: values for name, values in state.items()}
        groups = [dict(group, params=[index[name] for name in group["params"]])
                  for group in optimizer_state["param_groups"]]
        optimizer_state = {"state": state, "param_groups": groups}
    return model_state, optimizer_state


def load_state(model, optimizer, model_state, optimizer_state, tensor_parallel):
    """Load full state dicts (a single process's layout, as gather_state writes them) into a split model and its
    optimizer: every rank holds the full dicts and keeps its own shard of each tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    parts = torch.distributed.get_world_size()
    if tensor_parallel:
        model_state = reorder_fused(model_state, model, parts)
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    if optimizer is None or optimizer_state is None:
        return
    names = parameter_names(model, optimizer)
    state = {names[i]: values for i, values in optimizer_state["state"].items()}
    if tensor_parallel:
        state = reorder_fused_moments(state, model, parts)
    groups = [dict(group, params=[names[i] for i in group["params"]]) for group in optimizer_state["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------------------------------------------- memory
def local_bytes(tensor):
    """Bytes this process holds of a tensor: its own shard for a DTensor."""
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()
