import os

import pytest
import torch

from tritondeconv.kernels.common import poison_allocations

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def _device_params():
    cpu = pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRETING, reason="CPU tensors run the Triton kernels only under TRITON_INTERPRET=1"
        ),
    )
    cuda = pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU"),
            pytest.mark.skipif(INTERPRETING, reason="TRITON_INTERPRET=1 would run the GPU tests in the interpreter"),
        ],
    )
    return [cpu, cuda]


@pytest.fixture(params=_device_params())
def device(request):
    """Every device on which the Triton kernels (not a fallback) run."""
    return request.param


@pytest.fixture
def poisoned_outputs():
    """Make every tensor the ops allocate for a result (outputs, gradients, the weight
    gradient's workspace) start as NaN, so an unwritten element fails."""
    with poison_allocations(float("nan")):
        yield


@pytest.fixture
def precision(request):
    """Set PyTorch's TF32 switch for the precision under test (restored afterwards)."""
    name = request.param
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = name == "tf32"
    yield name
    torch.backends.cudnn.allow_tf32 = before
