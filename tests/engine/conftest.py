"""Engine tests run torch on one thread.

The tiny models gain nothing from a second thread, and when the 2-core machine is
busy (other test suites, transport peers polling) torch's OpenMP workers wait on
each other: the same test measured 0.1 s on one thread and 7 s on two.
"""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)  # restored after each module: other suites keep theirs
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
