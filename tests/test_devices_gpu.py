"""Calls whose tensors are on a GPU other than the current one run on their tensors'
GPU, as torch's own operations do, and leave the current device as it was: a process
that drives several GPUs need not switch devices around each call."""

import math

import pytest
import torch

import flashmla_cute
from flashmla_cute import merge_attention_states
from flashmla_cute.reference import flash_mla_reference
from flashmla_cute.testing import cosine_distance, make_decode_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]

S_Q, H_Q = 2, 64


def decode_step(x):
    """The plan, then two decode calls (the checked path, then the fast path)."""
    meta, num_splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, S_Q * H_Q, 1)
    return [flashmla_cute.flash_mla_with_kvcache(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta,
                                                 num_splits, causal=True) for _ in range(2)]


def test_a_decode_step_on_the_second_gpu_while_the_first_is_current(requires_hopper):
    x = make_decode_inputs(3, S_Q, H_Q, seqlens=[700, 1, 3000], device="cuda:1", seed=3)
    with torch.cuda.device(0):
        (out, lse), (again, again_lse) = decode_step(x)
        merged = [merge_attention_states(out, lse, again, again_lse) for _ in range(2)]
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)

    assert out.device == lse.device == torch.device("cuda", 1)
    ref_out, ref_lse = flash_mla_reference(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, causal=True)
    assert cosine_distance(out.float(), ref_out.float()) < 1e-5
    assert cosine_distance(lse, ref_lse) < 1e-5
    assert torch.equal(again, out) and torch.equal(again_lse, lse)
    # A result merged with itself is itself, its lse raised by log 2.
    for merged_out, merged_lse in merged:
        assert merged_out.device == torch.device("cuda", 1)
        torch.testing.assert_close(merged_out, out, atol=0, rtol=0)
        torch.testing.assert_close(merged_lse, lse + math.log(2), atol=1e-5, rtol=1e-6)


def test_a_sparse_call_on_the_second_gpu_while_the_first_is_current(requires_hopper):
    from flashmla_cute import api
    from flashmla_cute.sparse_testing import make_sparse_decode_inputs

    inp = make_sparse_decode_inputs(2, 2, 64, 300, 128, 64, seed=5, with_sink=True, device="cuda:1")

    def call():
        plan, _ = api.get_mla_metadata()
        return api.flash_mla_with_kvcache(inp.q, inp.k_cache, None, None, 512, plan,
                                          softmax_scale=inp.softmax_scale, is_fp8_kvcache=True,
                                          indices=inp.indices, attn_sink=inp.attn_sink)

    with torch.cuda.device(1):
        expected = call()
    with torch.cuda.device(0):
        results = [call() for _ in range(2)]  # the checked path, then the fast path
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)

    for result in results:
        assert all(t.device == torch.device("cuda", 1) for t in result)
        assert all(torch.equal(a, b) for a, b in zip(result, expected))
