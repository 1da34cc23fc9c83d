"""The CPU norm kernel against torch's rms_norm."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from mesh.engine import cpu_kernels
from mesh.engine.model import rms_norm


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: torch's rms_norm runs here")
    assert cpu_kernels.enabled("PDMESH_NORM_KERNEL"), "a compiler is present, so the kernel must build"


@pytest.mark.parametrize("shape", [(1, 1, 768), (1, 8, 768), (1, 300, 768), (5, 20), (2, 3, 40)])
def test_kernel_equals_torch_and_the_model_uses_it(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen) * 3
    weight = torch.randn(shape[-1], generator=gen)
    got = rms_norm(x, weight, 1e-6)
    assert torch.equal(got, torch.ops.pdmesh.rms_norm(x, weight, 1e-6))  # the model's norm ran the kernel
    torch.testing.assert_close(got, F.rms_norm(x, (shape[-1],), weight, 1e-6), rtol=1e-5, atol=1e-6)


def test_kernel_refuses_a_weight_that_does_not_fit():
    with pytest.raises(RuntimeError, match="a weight of 8 features"):
        torch.ops.pdmesh.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.pdmesh.rms_norm(torch.randn(2, 8).double(), torch.randn(8).double(), 1e-6)
