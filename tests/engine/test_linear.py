import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from mesh.engine import linear
from mesh.engine.linear import (FEW_ROWS_MAX, PACKED_MAX_ROWS, PACKED_MIN_ROWS, Linear, pack_weight,
                               packing_supported, should_pack)
from mesh.engine.sampling_params import SamplingParams
from tests.engine.helpers import PROMPTS, drain

pytestmark = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.float32),
                                reason="this torch has no oneDNN")


@pytest.mark.parametrize("rows", [PACKED_MIN_ROWS - 1, PACKED_MIN_ROWS, 2, 37, PACKED_MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_plain(rows, bias):
    torch.manual_seed(0)
    lin = Linear(48, 80, bias=bias)
    x = torch.randn(1, rows, 48)
    plain = F.linear(x, lin.weight, lin.bias)
    lin.pack()
    out = lin(x)
    assert out.shape == plain.shape
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_engine_greedy_tokens_are_the_same_with_and_without_blocked_weights(checkpoint, make_engine):
    folder = checkpoint("qwen2")
    outputs = []
    for packed in (True, False):
        engine = make_engine(folder, block_size=4, num_blocks=128, packed_weights=packed)
        assert (engine.model.lm_head_packed is not None) == packed
        outputs.append(greedy_tokens(engine))
    assert outputs[0] == outputs[1]


def greedy_tokens(engine) -> list[list[int]]:
    """Each of PROMPTS' 12 greedy tokens, run together."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS]
    tokens = {i: [] for i in ids}
    for out in drain(engine):
        tokens[out.request_id].extend(out.token_ids)
    return [tokens[i] for i in ids]


def test_blocked_copies_by_default_only_where_they_cannot_crowd_the_host():
    cpu = torch.device("cpu")
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert should_pack(None, cpu, torch.float32, 500 << 20)
    assert not should_pack(None, cpu, torch.float32, host // 2)
    assert should_pack(True, cpu, torch.float32, host // 2)  # asked for: as asked
    assert not should_pack(False, cpu, torch.float32, 1 << 20)
    assert not should_pack(True, cpu, torch.bfloat16, 1 << 20)  # fp32 only


@pytest.fixture
def few_row_kernel():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: oneDNN runs every product here")
    assert linear.few_row_kernel(), "a compiler is present, so the few-row kernel must build"


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS_MAX, FEW_ROWS_MAX + 1, 37])
@pytest.mark.parametrize("bias", [False, True])
def test_each_row_count_runs_on_its_copy_and_equals_plain(few_row_kernel, rows, bias):
    torch.manual_seed(0)
    lin = Linear(100, 80, bias=bias)  # 80 features: the packed copy's last block is partly padding
    x = torch.randn(1, rows, 100)
    plain = F.linear(x, lin.weight, lin.bias)
    lin.pack()
    out = lin(x)
    few = torch.ops.pdmesh.few_row_linear(x, lin.packed.few_rows, lin.bias, 80)
    blocked = torch.ops.mkldnn._linear_pointwise(x, lin.packed.blocked, lin.bias, "none", [], "")
    assert torch.equal(out, few if rows <= FEW_ROWS_MAX else blocked)  # the copy for its row count ran
    torch.testing.assert_close(few, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_the_few_row_kernel_refuses_inputs_that_do_not_fit_its_weight(few_row_kernel):
    packed = pack_weight(torch.randn(40, 16))
    with pytest.raises(RuntimeError, match="input has 12 features, the weight 16"):
        torch.ops.pdmesh.few_row_linear(torch.randn(2, 12), packed.few_rows, None, 40)
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.pdmesh.few_row_linear(torch.randn(2, 16), packed.few_rows, None, 200)
    with pytest.raises(RuntimeError, match="bias of 40 features"):
        torch.ops.pdmesh.few_row_linear(torch.randn(2, 16), packed.few_rows, torch.zeros(3), 40)
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.pdmesh.few_row_linear(torch.randn(2, 16).double(), packed.few_rows, None, 40)


def test_greedy_tokens_are_the_same_with_and_without_the_few_row_kernel(checkpoint, make_engine, few_row_kernel,
                                                                        monkeypatch):
    folder = checkpoint("qwen2")
    outputs = []
    for on in (True, False):
        monkeypatch.setattr(linear, "few_row_kernel", lambda on=on: on)
        engine = make_engine(folder, block_size=4, num_blocks=128, packed_weights=True)
        assert (engine.model.lm_head_packed.few_rows is not None) == on
        outputs.append(greedy_tokens(engine))
    assert outputs[0] == outputs[1]
