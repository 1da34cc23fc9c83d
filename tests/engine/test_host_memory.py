import ctypes

import pytest
import torch

from mesh.engine.device import keep_freed_host_memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _mapped_bytes() -> int:
    """Bytes glibc holds in blocks mapped on their own (unmapped again when freed)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc 2.33+")
def test_large_tensors_come_from_memory_kept_across_frees():
    assert keep_freed_host_memory()
    before = _mapped_bytes()
    big = torch.empty(64 << 20, dtype=torch.uint8)
    assert _mapped_bytes() - before < (64 << 20)  # not a fresh mapping of its own
    del big
