"""Benchmark: the bytes each process holds of the weights, their gradients and AdamW's two moments under DDP, FSDP2
and tensor parallelism, at 2 and 4 CPU processes (gloo). It prints a markdown table; it is not a test.

    python bench/bench_memory.py                                  # train_pretrain.py's sizes, GPT-2's block
    python bench/bench_memory.py --n_layer=12 --n_embd=768 --n_head=12 --vocab_size=50304   # GPT-2 small's shape
Each process builds the same model (GPTConfig's block: GPT-2's, as train_pretrain.py --preset=gpt2), wraps it as
train_pretrain.py does (Runtime.wrap), takes one AdamW step on a tiny batch and counts what it holds itself: for a
DTensor its local shard (DTensor.to_local()). Gradients are the parameters' .grad; DDP's bucket buffers (another copy
of the gradients while they are all-reduced) and activations are not counted. The largest rank is reported (FSDP
shards can differ by a row when a size does not divide).
"""
import dataclasses
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanollm.checkpoint import unwrap  # noqa: E402
from nanollm.configurator import configure  # noqa: E402
from nanollm.distributed import setup, teardown  # noqa: E402
from nanollm.model import GPT, GPTConfig  # noqa: E402
from nanollm.optim import configure_optimizer  # noqa: E402
from nanollm.parallel import device_mesh, local_bytes  # noqa: E402

vocab_size = 2048  # train_pretrain.py's default sizes
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
ranks = "2,4"  # process counts to measure
parallelisms = "ddp,fsdp,tp"


def held_bytes(model, optimizer):
    """(parameter, gradient, optimizer-state) bytes this process holds; tied weights counted once."""
    parameters = list(unwrap(model).parameters())
    moments = [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return (sum(local_bytes(p) for p in parameters), sum(local_bytes(p.grad) for p in parameters if p.grad is not None),
            sum(local_bytes(m) for m in moments))


def measure(rank, world_size, port, config, names, results):
    """One of world_size processes: for each parallelism, the bytes after one AdamW step; rank 0 fills results."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    base = setup("cpu", "gloo", "float32")  # ddp; the split runtimes share its process group
    for name in names:
        runtime = base if name == "ddp" else dataclasses.replace(base, parallelism=name,
                                                                 mesh=device_mesh("cpu", world_size, name))
        torch.manual_seed(0)
        model = runtime.wrap(GPT(GPTConfig(**config)))
        optimizer = configure_optimizer(unwrap(model), 0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False)
        ids = torch.randint(0, config["vocab_size"], (1, 9))
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()  # AdamW's moments exist from the first step on; gradients are kept to be counted
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, held_bytes(model, optimizer))
        if rank == 0:
            results[name] = max(per_rank, key=sum)
        del model, optimizer
    teardown(base)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def megabytes(n):
    return f"{n / 2 ** 20:.2f}"


def main():
    configure(globals(), sys.argv[1:])
    config = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    names = [name.strip() for name in str(parallelisms).split(",")]
    n_parameters = GPT(GPTConfig(**config)).num_parameters()
    print(f"GPT n_layer={n_layer} n_head={n_head} n_embd={n_embd} vocab_size={vocab_size} block_size={block_size}: "
          f"{n_parameters:,} parameters, fp32 weights, AdamW\n")
    print("| parallelism | processes | parameters MiB | gradients MiB | AdamW moments MiB | total MiB per process "
          "| of DDP's |\n|---|---|---|---|---|---|---|")
    for world_size in (int(r) for r in str(ranks).split(",")):
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(measure, args=(world_size, free_port(), config, names, results), nprocs=world_size)
            results = dict(results)
        ddp_total = sum(results["ddp"]) if "ddp" in results else None
        for name in names:
            total = sum(results[name])
            share = f"{total / ddp_total:.2f}" if ddp_total else "-"
            print(f"| {name} | {world_size} | " + " | ".join(megabytes(b) for b in results[name]) +
                  f" | {megabytes(total)} | {share} |")


if __name__ == "__main__":
    main()
