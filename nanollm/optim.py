"""The optimizers and the learning-rate schedule.

AdamW (Loshchilov & Hutter 2019) decays only matrices (Linear weights, embeddings); biases and LayerNorm
scales are left undecayed. LAMB (You et al. 2019) and LARS (You et al. 2017) give every weight matrix a step
proportional to its own norm (a layer-wise trust ratio), which keeps very large batches stable. Muon (Jordan et al.
2024) replaces the update of each hidden weight matrix by its nearest orthogonal matrix, found with a Newton–Schulz
iteration. The schedule is a linear warmup (Goyal et al. 2017) followed by cosine (Loshchilov & Hutter 2017) or
polynomial decay down to min_lr.
"""
import inspect
import math

import torch
from torch import nn

from nanollm.configurator import UserError

LR_SCHEDULES = ("cosine", "poly", "constant")
OPTIMIZERS = ("adamw", "lamb", "lars", "muon")
MAX_TRUST_RATIO = 10.0  # LAMB's φ clips the trust ratio: a tiny update of a large matrix would otherwise take huge steps
# the quintic Newton–Schulz coefficients of Jordan et al. (2024): they push every singular value of a matrix with
# spectral norm ≤ 1 into about [0.7, 1.2] in five steps (not exactly 1: speed matters more than precision here)
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5


def configure_optimizer(model, weight_decay, learning_rate, betas, device_type, verbose=True, name="adamw"):
    """The optimizer `name` ('adamw' | 'lamb' | 'lars' | 'muon') over two parameter groups: 2-D tensors decayed
    (and, for LAMB/LARS, scaled by their trust ratio), the rest (biases, norms) not, with the plain update. Muon takes
    the hidden matrices out of the decayed group into a third group of its own."""
    if name not in OPTIMIZERS:
        raise UserError(f"optimizer={name!r}: expected one of {OPTIMIZERS}")
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    # LAMB/LARS: biases and norm scales take the plain update, as in the papers' reference implementations
    groups = [{"params": decay, "weight_decay": weight_decay, "layer_adaptation": True},
              {"params": no_decay, "weight_decay": 0.0, "layer_adaptation": False}]
    if name == "lamb":
        optimizer = LAMB(groups, lr=learning_rate, betas=betas)
    elif name == "lars":
        optimizer = LARS(groups, lr=learning_rate, momentum=betas[0])
    elif name == "muon":
        hidden = {id(p) for p in hidden_matrices(model)}
        groups = [{"params": [p for p in decay if id(p) in hidden], "weight_decay": weight_decay, "use_muon": True},
                  {"params": [p for p in decay if id(p) not in hidden], "weight_decay": weight_decay,
                   "use_muon": False},
                  {"params": no_decay, "weight_decay": 0.0, "use_muon": False}]
        optimizer = Muon(groups, lr=learning_rate, betas=betas)
    else:
        for group in groups:
            del group["layer_adaptation"]
        # fused: one kernel updates every parameter, on CUDA and on the CPU (at 1.9 M parameters on 2 busy cores:
        # 1-2 ms per step instead of ~20 ms, docs/benchmarks_cpu.md)
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))
    for group in optimizer.param_groups:
        group["optimizer"] = name  # saved in the state dict: a resumed run must continue with the same optimizer
    optimizer.register_load_state_dict_pre_hook(lambda _, state: check_same_optimizer(state, name))
    if verbose:
        counts = ", ".join(f"{sum(p.numel() for p in group['params']):,}" for group in optimizer.param_groups)
        print(f"[nanollm] optimizer={name} ({type(optimizer).__name__}): parameters per group {counts} "
              f"({'Muon-orthogonalized, AdamW-decayed, ' if name == 'muon' else 'decayed, '}not decayed)")
    return optimizer


def check_same_optimizer(state, name):
    """Before an optimizer loads a saved state: the state must be its own kind's (moments mean different things in
    each optimizer). A state saved before groups were tagged is AdamW's."""
    saved = state["param_groups"][0].get("optimizer", "adamw") if state["param_groups"] else name
    if saved != name:
        raise UserError(f"optimizer={name!r}, but the checkpoint's optimizer state is {saved!r}'s: resume with "
                        f"--optimizer={saved}")


def hidden_matrices(model):
    """The weight matrices of the Linear layers inside the model's stack of blocks (an nn.ModuleList): attention and
    MLP. Embeddings, the output head (tied to an embedding or not) and any Linear outside the blocks are not."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found = {}
    for stack in (m for m in model.modules() if isinstance(m, nn.ModuleList)):
        for module in stack.modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in embedding_weights:
                found[id(module.weight)] = module.weight
    return list(found.values())


def trust_ratio(weight_norm, update_norm, max_ratio=MAX_TRUST_RATIO):
    """‖w‖ / ‖update‖, clipped to max_ratio; 1 when either norm is 0 (a zero-initialized matrix, or no update), so the
    step is then the plain one. Tensors in and out: no read-back to the host."""
    ratio = (weight_norm / update_norm).clamp(max=max_ratio)
    return torch.where((weight_norm > 0) & (update_norm > 0), ratio, torch.ones_like(ratio))


def adam_direction(state, grad, betas, eps):
    """Adam's step direction m̂ / (√v̂ + ε) (Kingma & Ba 2015), its moments kept in `state` (one parameter's):
    m = β1·m + (1 − β1)·g, v = β2·v + (1 − β2)·g², bias-corrected m̂ = m / (1 − β1^t), v̂ = v / (1 − β2^t).
    LAMB rescales it per matrix; Muon's AdamW groups step along it."""
    beta1, beta2 = betas
    if not state:
        state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, torch.zeros_like(grad), torch.zeros_like(grad)
    state["step"] += 1
    m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
    m.lerp_(grad, 1 - beta1)  # m = β1·m + (1 − β1)·g
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v = β2·v + (1 − β2)·g²
    return (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)


class LAMB(torch.optim.Optimizer):
    """LAMB (You et al. 2019, Algorithm 2): Adam's direction plus decoupled weight decay, each matrix's step rescaled
    so that its length is lr·‖w‖ (the trust ratio ‖w‖/‖u‖): every layer moves by the same fraction of its size."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, layer_adaptation=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = adam_direction(self.state[p], p.grad, group["betas"], group["eps"])
                update.add_(p, alpha=group["weight_decay"])  # u = m̂ / (√v̂ + ε) + λ·w
                if group["layer_adaptation"]:
                    update.mul_(trust_ratio(p.norm(), update.norm()))  # w ← w − lr·(‖w‖/‖u‖)·u
                p.add_(update, alpha=-group["lr"])
        return loss


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017, Algorithm 1): SGD with momentum whose local learning rate per matrix is
    η·‖w‖ / (‖g‖ + β·‖w‖), so a matrix never moves by more than lr·η·‖w‖ in one step (before momentum).
    The paper's η = 0.001 with a global rate ~1000× larger takes the same steps as η = 1 here, which keeps
    learning_rate on AdamW's scale."""

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, trust_coefficient=1.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, layer_adaptation=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                direction = p.grad.add(p, alpha=group["weight_decay"])  # g + β·w (β: the weight decay)
                if group["layer_adaptation"]:
                    weight_norm, grad_norm = p.norm(), p.grad.norm()
                    # local lr λ = η·‖w‖ / (‖g‖ + β·‖w‖); 1 when either norm is 0
                    local_lr = trust_ratio(group["trust_coefficient"] * weight_norm,
                                           grad_norm + group["weight_decay"] * weight_norm, max_ratio=math.inf)
                    direction.mul_(local_lr)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                velocity = state["momentum_buffer"]
                velocity.mul_(group["momentum"]).add_(direction, alpha=group["lr"])  # v = m·v + γ·λ·(g + β·w)
                p.sub_(velocity)  # w ← w − v
        return loss


def orthogonalize(matrix, steps=NEWTON_SCHULZ_STEPS):
    """≈ U·Vᵀ for matrix = U·S·Vᵀ (every singular value pushed towards 1) by the quintic Newton–Schulz iteration
    of Jordan et al. (2024): X ← a·X + b·(X·Xᵀ)·X + c·(X·Xᵀ)²·X, from X = matrix / ‖matrix‖_F. Run in float32."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrix.float() / (matrix.norm() + 1e-7)  # ‖·‖_F ≥ spectral norm: singular values now in [0, 1]
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # (m, n) with m ≤ n: the Gram matrix X·Xᵀ is the smaller (m, m) one
    for _ in range(steps):
        gram = x @ x.T  # (m, m)
        x = a * x + (b * gram + c * gram @ gram) @ x  # each singular value s -> a·s + b·s³ + c·s⁵
    return (x.T if tall else x).to(matrix.dtype)


def is_split(tensor):
    """Whether the tensor is a DTensor (split over processes by FSDP or tensor parallelism). None exists before
    torch.distributed is set up, and a single process does not pay the DTensor module's import."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def orthogonalize_split(matrix):
    """orthogonalize for a matrix split over processes (a DTensor under FSDP or tensor parallelism): every process
    gathers the whole matrix, orthogonalizes it (the same result everywhere) and keeps its own slice, with no further
    communication. Under tensor parallelism a fused layer's rows are in the per-rank order (parallel.rows_for_ranks):
    a row permutation P commutes with the iteration, NS(P·X) = P·NS(X) (the Gram matrix becomes P·X·Xᵀ·Pᵀ and the
    Frobenius norm is unchanged), so the update equals one process's, rows permuted alike."""
    from torch.distributed.tensor import distribute_tensor

    whole = orthogonalize(matrix.full_tensor())  # (m, n) on every process
    return distribute_tensor(whole, matrix.device_mesh, matrix.placements, src_data_rank=None)  # local slice


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for the groups marked use_muon (the hidden matrices): Nesterov momentum, then the
    update orthogonalized (orthogonalize), with decoupled weight decay. The update is scaled by 0.2·√max(m, n)
    (Liu et al. 2025, "Muon is Scalable for LLM Training") to have the RMS of a typical AdamW update, so one
    learning_rate and weight_decay serve all groups. The other groups (embeddings, head, norms, biases) take AdamW.
    Under DDP every rank holds the same all-reduced gradient, so every rank computes the same update; under FSDP and
    tensor parallelism (DTensor parameters) the momentum stays split like its matrix, and each matrix's update is
    orthogonalized whole (orthogonalize_split)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, momentum=0.95):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      use_muon=False))
        for group in self.param_groups:
            if group["use_muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon orthogonalizes matrices: its groups may hold only 2-D parameters")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay: w ← w·(1 − lr·λ)
                if group["use_muon"]:
                    self._muon_update(p, group)
                else:
                    self._adamw_update(p, group)
        return loss

    def _muon_update(self, p, group):
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buffer, mu = state["momentum_buffer"], group["momentum"]
        buffer.mul_(mu).add_(p.grad)  # B = μ·B + G
        direction = p.grad + mu * buffer  # Nesterov: orthogonalize G + μ·B
        update = orthogonalize_split(direction) if is_split(direction) else orthogonalize(direction)
        # w ← w − lr·0.2·√max(m, n)·O (a DTensor's shape is the whole matrix's)
        p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))

    def _adamw_update(self, p, group):
        # w ← w − lr·m̂ / (√v̂ + ε)
        p.sub_(adam_direction(self.state[p], p.grad, group["betas"], group["eps"]), alpha=group["lr"])


class Schedule:
    """The learning rate of every iteration: linear warmup, then cosine (or polynomial) decay from learning_rate to
    min_lr at lr_decay_iters (-1: max_iters), min_lr after; kind 'constant' keeps learning_rate after warmup."""

    def __init__(self, learning_rate, warmup_iters, lr_decay_iters, max_iters, min_lr, kind="cosine"):
        if kind not in LR_SCHEDULES:
            raise UserError(f"lr_schedule={kind!r}: expected one of {LR_SCHEDULES}")
        self.learning_rate, self.warmup_iters, self.min_lr, self.kind = learning_rate, warmup_iters, min_lr, kind
        self.decay_iters = max_iters if lr_decay_iters < 0 else lr_decay_iters

    def set(self, optimizer, iteration):
        """Give every parameter group this iteration's learning rate; returns it."""
        lr = get_lr(iteration, self.learning_rate, self.warmup_iters, self.decay_iters, self.min_lr, self.kind)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, schedule="cosine", power=1.0):
    """Learning rate at iteration `it`."""
    if schedule not in LR_SCHEDULES:
        raise UserError(f"lr_schedule={schedule!r}: expected one of {LR_SCHEDULES}")
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)  # linear warmup, never exactly 0
    if schedule == "constant":
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)  # 0 -> 1
    if schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine: 1 -> 0
    else:
        coeff = (1.0 - progress) ** power  # polynomial: (1 - p)^power, linear for power 1
    return min_lr + coeff * (learning_rate - min_lr)
