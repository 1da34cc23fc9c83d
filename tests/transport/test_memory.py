import gc

import torch

from transport.memory import HUGE_PAGE, pool_zeros


def test_pool_zeros_is_a_zeroed_contiguous_tensor_on_a_huge_page_boundary():
    t = pool_zeros((4, 2, 64, 16, 8, 64), torch.bfloat16)
    assert t.shape == (4, 2, 64, 16, 8, 64) and t.dtype == torch.bfloat16
    assert t.is_contiguous() and t.device.type == "cpu"
    assert t.data_ptr() % HUGE_PAGE == 0
    assert not t.any()


def test_pool_zeros_memory_outlives_every_name_but_the_tensor():
    view = pool_zeros((1024, 1024), torch.float32)[7]
    gc.collect()
    view.fill_(3.0)
    assert view.sum().item() == 3.0 * 1024


def test_pool_zeros_small_and_empty_shapes():
    assert pool_zeros((0, 3), torch.float32).shape == (0, 3)
    small = pool_zeros((5,), torch.float16)
    assert small.dtype == torch.float16 and not small.any()
