"""Devices, distributed data parallel (DDP) and mixed precision, written once for every training script.

Under `torchrun --nproc_per_node=N` each process holds a full model copy; gradients are averaged with an
all-reduce after backward (Li et al. 2020, "PyTorch Distributed"). parallelism='fsdp' or 'tp' splits the model over
the processes instead (nanollm/parallel.py). AMP runs matmuls in bf16/fp16 while
the weights stay fp32 (Micikevicius et al. 2018); fp16 needs loss scaling (a GradScaler) to avoid underflow.
"""
import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanollm import parallel
from nanollm.configurator import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    """Where and how a run executes: device, this process's place among the DDP ranks, and the compute dtype."""
    device: str  # 'cuda:0', 'mps', 'cpu'
    device_type: str  # 'cuda' | 'mps' | 'cpu'
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    dtype: str = "float32"  # 'float32' | 'bfloat16' | 'float16': autocast's dtype (weights stay float32)
    parallelism: str = "ddp"  # 'ddp' (whole copies) | 'fsdp' | 'tp' (the model split over the processes)
    mesh: object = None  # the processes as a DeviceMesh when the model is split, else None

    @property
    def ddp(self):
        """Several processes (whatever the parallelism): collectives are needed."""
        return self.world_size > 1

    @property
    def sharded(self):
        """The model is split over the processes (fsdp, tp): every forward pass needs every rank."""
        return self.mesh is not None

    @property
    def data_rank(self):
        """Which share of each batch this process reads: tensor-parallel ranks compute one batch together."""
        return 0 if self.sharded and self.parallelism == "tp" else self.rank

    @property
    def data_ranks(self):
        """How many different shares of a batch the processes read (the data-parallel degree)."""
        return 1 if self.sharded and self.parallelism == "tp" else self.world_size

    @property
    def evaluates(self):
        """This process runs the held-out evaluation: rank 0 with a whole model, every rank with a split one."""
        return self.is_master or self.sharded

    @property
    def is_master(self):
        return self.rank == 0

    def autocast(self):
        """The mixed-precision context for forward passes (a no-op in float32)."""
        return autocast(self.device_type, self.dtype)

    def grad_scaler(self):
        """A GradScaler: loss scaling for float16, a pass-through otherwise."""
        return grad_scaler(self.device_type, self.dtype)

    def wrap(self, model):
        """With several processes: the model under DDP (gradients averaged after backward), or split in place by
        FSDP2 or tensor parallelism (parallel.py; a torch.compile wrapper stays outside). Else the model itself."""
        if not self.ddp:
            return model
        if self.sharded:
            plain = getattr(model, "_orig_mod", model)  # under torch.compile: split the module it compiles
            if self.parallelism == "fsdp":
                parallel.shard_fully(plain, self.mesh, self.dtype)
            else:
                parallel.split_tensors(plain, self.mesh)
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.local_rank] if self.device_type == "cuda" else None)


def pick_device(device="auto"):
    """'auto' -> CUDA if present, else Apple MPS, else CPU; anything else is used as given."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def setup(device="auto", backend="auto", dtype="auto", announce=False, parallelism="ddp"):
    """Start DDP when launched by torchrun (RANK is set), else run as one process; resolve the dtype. parallelism
    'fsdp' or 'tp' with several processes also makes their DeviceMesh. Returns a Runtime; with announce, rank 0
    prints what it chose."""
    device = pick_device(device)
    device_type = device.split(":")[0]
    dtype = resolve_dtype(dtype, device_type)
    if int(os.environ.get("RANK", -1)) == -1:
        runtime = Runtime(device=device, device_type=device_type, dtype=dtype)
    else:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if backend == "auto":
            backend = "nccl" if device_type == "cuda" else "gloo"  # nccl needs GPUs; gloo runs on CPUs
        if device_type == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        mesh = parallel.device_mesh(device_type, world_size, parallelism) if parallelism != "ddp" else None
        runtime = Runtime(device=device, device_type=device_type, rank=rank, local_rank=local_rank,
                          world_size=world_size, dtype=dtype, parallelism=parallelism, mesh=mesh)
    if announce and runtime.is_master:
        split = f" parallelism={parallelism}" if runtime.sharded else ""
        print(f"[nanollm] device={runtime.device} dtype={dtype} world_size={runtime.world_size}{split}")
    return runtime


def teardown(runtime):
    """End DDP: wait for every rank (rank 0 may still be evaluating or saving), then destroy the process group. A rank
    that tore down alone while its peer still worked was seen to abort in gloo ('terminate called ...')."""
    if runtime.ddp and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_run(runtime, exit_code=0):
    """A training script's last line: teardown, then a multi-process run exits here with exit_code. The DDP wrapper
    still holds the gloo group, whose worker threads were seen to abort a rank while the interpreter shut down
    (SIGABRT after all its work was done: the shutdown problem of pytorch/pytorch#179291). Everything is written by
    now (the scripts close their logs first); stdout and stderr are flushed here. One process returns normally."""
    teardown(runtime)
    if runtime.ddp:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def barrier(runtime):
    if runtime.ddp:
        dist.barrier()


def all_reduce_mean(value, runtime):
    """Average a float over ranks (for logging the global loss)."""
    if not runtime.ddp:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / runtime.world_size


def any_rank(flag, runtime):
    """True on every rank if `flag` is True on any rank: control-flow decisions must agree or DDP hangs."""
    if not runtime.ddp:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=runtime.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def resolve_dtype(dtype, device_type):
    """'auto' -> bfloat16 on GPUs that support it, else float32. Checks the name. float16 runs on the CPU too (CPU
    autocast and GradScaler('cpu') support it), which exercises loss scaling without a GPU; most CPUs have no fast
    float16 matmul, so it is for checking that path, not for speed."""
    if dtype == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float32"
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)} or 'auto'")
    return dtype


def autocast(device_type, dtype):
    """Mixed-precision context for forward passes; a no-op in float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


def grad_scaler(device_type, dtype):
    """A GradScaler for float16 (loss scaling); disabled, hence a pass-through, otherwise."""
    return torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))


def no_sync_unless(model, sync):
    """Skip DDP's gradient all-reduce (FSDP's reduce-scatter) on micro-steps that are not the last of an
    accumulation."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: gradients accumulate unsharded until the last one
        return parallel.no_gradient_sync(model)
    return contextlib.nullcontext()


def micro_steps_per_rank(gradient_accumulation_steps, runtime):
    """gradient_accumulation_steps counts the micro-steps of one optimizer step over all ranks together, split evenly
    over the ranks. With fewer micro-steps than ranks (the default 1 under torchrun) every rank does one: the global
    batch grows with the number of processes, as in plain data parallelism. Returns the micro-steps per rank."""
    world_size = runtime.data_ranks  # tensor-parallel ranks share their micro-batches
    if gradient_accumulation_steps < world_size:
        if runtime.is_master:
            print(f"[nanollm] gradient_accumulation_steps={gradient_accumulation_steps} < {world_size} processes: "
                  f"each process does 1 micro-step, so an optimizer step sees {world_size} micro-batches")
        return 1
    if gradient_accumulation_steps % world_size != 0:
        raise UserError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the number "
                        f"of processes ({world_size}) when it is larger")
    return gradient_accumulation_steps // world_size
