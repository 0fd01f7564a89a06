"""FSDP2 and tensor parallelism (nanollm/parallel.py) on two CPU processes (gloo) against one process: the same losses
on the same batches, checkpoints a single process reads, exact resume. Two-process runs take seconds: marked slow."""
import copy
import dataclasses
import itertools
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from nanollm.checkpoint import load_checkpoint, restore_training_state, save_checkpoint, unwrap
from nanollm.configurator import UserError
from nanollm.distributed import Runtime, all_reduce_mean, setup, teardown
from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig
from nanollm.optim import configure_optimizer
from nanollm.parallel import check_parallelism, device_mesh, rows_for_ranks, shard_fully
from nanollm.pretraining import build_model
from nanollm.training import GuardedStep
from script_runner import run_script, write_corpus

# grouped-query attention and a SwiGLU MLP: both fused layers ([q | k | v] of unequal widths, [gate | value]) are split
CONFIG = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, n_kv_head=2, mlp="swiglu")
STEPS, SAVED_AT, ROWS = 10, 5, 8  # optimizer steps, the step checkpointed and resumed from, rows per global batch
OPTIMIZERS = ("adamw", "muon")  # the element-wise optimizer, and the one that needs whole matrices
PROBE = torch.arange(2 * CONFIG["block_size"]).view(2, -1) % CONFIG["vocab_size"]  # (2, 16) ids for the logits


def batch(step, share=0, shares=1):
    """Step `step`'s global batch (ROWS rows of random ids), this process's share of its rows: (x, y)."""
    rows = torch.randint(0, CONFIG["vocab_size"], (ROWS, CONFIG["block_size"] + 1),
                         generator=torch.Generator().manual_seed(step))
    rows = rows.chunk(shares)[share]
    return rows[:, :-1], rows[:, 1:]


def build(runtime, optimizer_name="adamw"):
    """The same initial GPT on every process, wrapped by the runtime; the optimizer (AdamW, or Muon with AdamW for the
    embeddings and norms) and the guarded step (clipping at 0.5)."""
    torch.manual_seed(0)
    model = runtime.wrap(GPT(GPTConfig(**CONFIG)))
    optimizer = configure_optimizer(unwrap(model), 0.1, 1e-2, (0.9, 0.95), "cpu", verbose=False, name=optimizer_name)
    return model, optimizer, GuardedStep(optimizer, runtime.grad_scaler(), 0.5, runtime)


def train(model, guarded_step, runtime, steps):
    """The scripts' step on each batch: forward, backward, clip, optimizer step. Returns the global mean losses."""
    losses = []
    for step in steps:
        x, y = batch(step, runtime.data_rank, runtime.data_ranks)
        _, loss = model(x, y)
        loss.backward()
        losses.append(all_reduce_mean(loss.item(), runtime))
        guarded_step(model, losses[-1], step)
    return losses


def split_runs(rank, port, folder):
    """One of two processes, for each optimizer and parallelism: train STEPS steps split, checkpoint at SAVED_AT; then
    a fresh split model resumes from the checkpoint. Rank 0 writes the losses and the probe's logits at the checkpoint
    to folder/<optimizer>-<parallelism>/result.pt."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    first = setup("cpu", "gloo", "float32", parallelism="fsdp")
    runtimes = (first, dataclasses.replace(first, parallelism="tp", mesh=device_mesh("cpu", 2, "tp")))
    for optimizer_name, runtime in itertools.product(OPTIMIZERS, runtimes):
        model, optimizer, guarded_step = build(runtime, optimizer_name)
        losses = train(model, guarded_step, runtime, range(SAVED_AT))
        run_folder = os.path.join(folder, f"{optimizer_name}-{runtime.parallelism}")
        path = os.path.join(run_folder, "ckpt.pt")
        save_checkpoint(path, runtime, model, optimizer, guarded_step.scaler, SAVED_AT, float("inf"),
                        {"model_type": "gpt"}, CONFIG)
        with torch.no_grad():
            logits = model(PROBE)[0]  # (2, 16, 64), whole on every rank
        losses += train(model, guarded_step, runtime, range(SAVED_AT, STEPS))
        torch.distributed.barrier()  # the file is written
        model, optimizer, guarded_step = build(runtime, optimizer_name)
        restore_training_state(load_checkpoint(path), model, optimizer, guarded_step.scaler, runtime)
        resumed = train(model, guarded_step, runtime, range(SAVED_AT, STEPS))
        if rank == 0:
            torch.save({"losses": losses, "resumed": resumed, "logits": logits},
                       os.path.join(run_folder, "result.pt"))
    teardown(first)


@pytest.fixture(scope="module")
def split_results(tmp_path_factory):
    """{(optimizer, parallelism): its two-process run's results, and the folder of its checkpoint} for AdamW and Muon
    under fsdp and tp (one launch)."""
    folder = tmp_path_factory.mktemp("split")
    mp.spawn(split_runs, args=(free_port(), str(folder)), nprocs=2)
    return {(name, parallelism): dict(torch.load(folder / f"{name}-{parallelism}" / "result.pt"),
                                      folder=folder / f"{name}-{parallelism}")
            for name, parallelism in itertools.product(OPTIMIZERS, ("fsdp", "tp"))}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fused_rows_reorder_so_each_rank_holds_whole_heads_and_back():
    q, k, v = torch.arange(8), torch.arange(8, 12), torch.arange(12, 16)  # 4 query rows, 2 key rows, 2 value rows
    fused = torch.cat([q, k, v])
    reordered = rows_for_ranks(fused, [8, 4, 4], 2)
    assert reordered.tolist() == [0, 1, 2, 3, 8, 9, 12, 13, 4, 5, 6, 7, 10, 11, 14, 15]  # [q0 k0 v0 | q1 k1 v1]
    assert torch.equal(rows_for_ranks(reordered, [8, 4, 4], 2, inverse=True), fused)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["fsdp", "tp"])
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_two_split_processes_match_one_process_and_resume_exactly(parallelism, optimizer_name, split_results):
    """Muon orthogonalizes each hidden matrix whole (gathered from its shards; under tp with the fused rows in the
    per-rank order), and its momentum buffers, sharded and reordered like AdamW's moments, resume exactly."""
    runtime = Runtime("cpu", "cpu")
    model, optimizer, guarded_step = build(runtime, optimizer_name)
    reference = train(model, guarded_step, runtime, range(SAVED_AT))  # one process, whole batches
    result = split_results[(optimizer_name, parallelism)]
    saved = load_checkpoint(result["folder"] / "ckpt.pt")["optimizer"]["state"]  # gathered, in the model's own layout
    for index, values in optimizer.state_dict()["state"].items():  # AdamW's moments, Muon's momentum buffers
        for key, value in values.items():
            if torch.is_tensor(value) and value.dim() > 0:  # not the step counts
                assert torch.allclose(saved[index][key], value, rtol=0, atol=1e-5), (index, key)
    reference += train(model, guarded_step, runtime, range(SAVED_AT, STEPS))
    assert max(abs(a - b) for a, b in zip(result["losses"], reference)) < 1e-5, (result["losses"], reference)
    assert result["resumed"] == result["losses"][SAVED_AT:]  # resume is exact


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["fsdp", "tp"])
def test_a_split_checkpoint_loads_whole_into_one_process_with_the_same_logits(parallelism, split_results):
    result = split_results[("adamw", parallelism)]
    loaded = load_model(result["folder"] / "ckpt.pt").model  # the one loader, an ordinary checkpoint
    with torch.no_grad():
        logits = loaded(PROBE)[0]
    assert torch.allclose(logits, result["logits"], rtol=0, atol=1e-5), (logits - result["logits"]).abs().max()


@pytest.mark.slow
def test_fsdp_script_run_resumes_in_one_process(tmp_path):
    """train_pretrain.py under torchrun with parallelism='fsdp' and accumulation (gradients kept whole until the last
    micro-step), then resumed by one process (parallelism='ddp'): the losses of one process throughout."""
    write_corpus(tmp_path)
    common = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--vocab_size=300",
              "--eval_iters=1", "--eval_interval=4", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3",
              "--dtype=float32", "--device=cpu", "--dropout=0.0", "--gradient_accumulation_steps=4",
              f"--dataset={tmp_path / 'text.txt'}", f"--data_dir={tmp_path / 'data'}", "--lr_decay_iters=6"]
    run_script("train_pretrain.py", common + [f"--out_dir={tmp_path / 'one'}", "--max_iters=6"])
    out = run_script("train_pretrain.py", common + [f"--out_dir={tmp_path / 'split'}", "--max_iters=4",
                                                    "--parallelism=fsdp"], nproc=2).stdout
    assert "parallelism=fsdp" in out and "a sample: python sample.py" in out
    run_script("train_pretrain.py", common + [f"--out_dir={tmp_path / 'split'}", "--max_iters=6", "--init_from=resume"])
    one, split = losses(tmp_path / "one"), losses(tmp_path / "split")
    assert sorted(one) == sorted(split) == list(range(6))
    for step in range(6):
        assert abs(one[step] - split[step]) < 1e-5, (step, one[step], split[step])


def losses(out_dir):
    import json
    with open(out_dir / "metrics.jsonl") as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_parallelism_settings_are_checked_before_any_work():
    with pytest.raises(UserError, match="parallelism='zero3'"):
        check_parallelism({"parallelism": "zero3"})
    with pytest.raises(UserError, match="n_head=6.*multiple of 4"):
        check_parallelism({"parallelism": "tp"}, n_head=6, n_embd=48, world_size=4)
    with pytest.raises(UserError, match="optimizer='lamb'"):
        check_parallelism({"parallelism": "fsdp", "optimizer": "lamb"})
    with pytest.raises(UserError, match="optimizer='lars'"):
        check_parallelism({"parallelism": "tp", "optimizer": "lars"})
    for parallelism in ("fsdp", "tp"):  # Muon gathers each matrix whole
        check_parallelism({"parallelism": parallelism, "optimizer": "muon"}, n_head=8, n_embd=64, world_size=4)
    check_parallelism({"parallelism": "tp"}, n_head=8, n_embd=64, world_size=4)  # 2 heads per process


def test_fsdp_runs_the_encoder_decoder_whose_cross_attention_is_used_outside_its_block(tmp_path):
    """encdec.py computes the decoder blocks' cross-attention keys/values outside the blocks' forward, so those blocks
    cannot be FSDP units of their own (their weights would still be shards there). One process is enough to see it."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        reference = build_model("encdec", dict(CONFIG, mlp="gelu", n_kv_head=0))
        model = shard_fully(copy.deepcopy(reference), device_mesh("cpu", 1, "fsdp"))
        x, y = batch(0)
        inputs = reference.objective_batch(x, y, torch.Generator().manual_seed(0))
        assert torch.allclose(model(**inputs)[1], reference(**inputs)[1], rtol=0, atol=1e-6)
    finally:
        torch.distributed.destroy_process_group()
