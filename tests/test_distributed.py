import pytest

from nanollm.distributed import Runtime, micro_steps_per_rank, resolve_dtype


def test_micro_steps_are_split_evenly_over_ranks():
    assert micro_steps_per_rank(8, Runtime("cpu", "cpu", world_size=4)) == 2
    assert micro_steps_per_rank(3, Runtime("cpu", "cpu")) == 3
    with pytest.raises(ValueError, match="divisible by the number of processes \\(2\\)"):
        micro_steps_per_rank(3, Runtime("cpu", "cpu", world_size=2))


def test_dtype_names_are_checked():
    assert resolve_dtype("auto", "cpu") == "float32"
    with pytest.raises(ValueError, match="float16.*not supported on the CPU"):
        resolve_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        resolve_dtype("fp8", "cpu")
