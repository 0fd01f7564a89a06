import importlib
import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when no GPU is present.
# This must be set before `triton` is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # tiny test models are overhead-bound; one thread is fastest (and fair on shared CPUs)


@pytest.fixture
def on_kernel_device():
    """Tensors a test creates land where the Triton kernels run: CPU (interpreter) or CUDA (compiled kernels)."""
    from kernels import kernel_device

    with torch.device(kernel_device()):
        yield


def require(module):
    """Import an optional package, or skip the test when it is missing; under NANOLLM_REQUIRE_OPTIONAL=1 (set by
    .ci/run) a missing package fails the test instead, so that CI cannot pass by skipping.
    Use: `from conftest import require` then `onnx = require("onnx")`."""
    if os.environ.get("NANOLLM_REQUIRE_OPTIONAL") == "1":
        try:
            return importlib.import_module(module)
        except ImportError as error:
            pytest.fail(f"optional package {module!r} is missing and NANOLLM_REQUIRE_OPTIONAL=1 (CI runs every "
                        f"test): {error}", pytrace=False)
    return pytest.importorskip(module)
