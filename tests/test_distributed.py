import pytest

from nanollm.configurator import UserError
from nanollm.distributed import Runtime, micro_steps_per_rank, resolve_dtype


def test_micro_steps_are_split_evenly_over_ranks():
    assert micro_steps_per_rank(8, Runtime("cpu", "cpu", world_size=4)) == 2
    assert micro_steps_per_rank(3, Runtime("cpu", "cpu")) == 3
    with pytest.raises(UserError, match="must be a multiple of the number of processes \\(2\\)"):
        micro_steps_per_rank(3, Runtime("cpu", "cpu", world_size=2))


def test_fewer_micro_steps_than_ranks_gives_each_rank_one(capsys):
    # the default gradient_accumulation_steps=1 under torchrun: the global batch grows with the ranks
    assert micro_steps_per_rank(1, Runtime("cpu", "cpu", world_size=2)) == 1
    assert "each process does 1 micro-step, so an optimizer step sees 2 micro-batches" in capsys.readouterr().out
    assert micro_steps_per_rank(3, Runtime("cpu", "cpu", rank=1, world_size=8)) == 1
    assert capsys.readouterr().out == ""  # said once, by rank 0


def test_dtype_names_are_checked():
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("float16", "cpu") == "float16"  # loss scaling can be exercised on the CPU
    with pytest.raises(ValueError, match="dtype='fp8'"):
        resolve_dtype("fp8", "cpu")
