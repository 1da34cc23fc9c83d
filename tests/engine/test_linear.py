import os

import pytest
import torch
import torch.nn.functional as F

from mesh.engine.linear import PACKED_MAX_ROWS, PACKED_MIN_ROWS, Linear, packing_supported, should_pack
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
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outputs = []
    for packed in (True, False):
        engine = make_engine(folder, block_size=4, num_blocks=128, packed_weights=packed)
        assert (engine.model.lm_head_packed is not None) == packed
        ids = [engine.add_request(p, params) for p in PROMPTS]
        tokens = {i: [] for i in ids}
        for out in drain(engine):
            tokens[out.request_id].extend(out.token_ids)
        outputs.append([tokens[i] for i in ids])
    assert outputs[0] == outputs[1]


def test_blocked_copies_by_default_only_where_they_cannot_crowd_the_host():
    cpu = torch.device("cpu")
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert should_pack(None, cpu, torch.float32, 500 << 20)
    assert not should_pack(None, cpu, torch.float32, host // 2)
    assert should_pack(True, cpu, torch.float32, host // 2)  # asked for: as asked
    assert not should_pack(False, cpu, torch.float32, 1 << 20)
    assert not should_pack(True, cpu, torch.bfloat16, 1 << 20)  # fp32 only
