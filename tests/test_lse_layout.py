"""``lse`` is laid out in memory as FlashMLA lays it out (``flashmla_cute.lse_layout``), on
the CPU as on the GPU, so that code written for FlashMLA may view it as it does there:
by query token (memory ``[b, s_q, h_q]``) for sparse calls and for dense calls with one KV
head, contiguous ``[b, h_q, s_q]`` for dense calls with several."""

import pytest
import torch

import flashmla_cute
from flashmla_cute import api
from flashmla_cute.reference import flash_mla_reference
from flashmla_cute.sparse_reference import sparse_mla_reference
from flashmla_cute.sparse_testing import make_sparse_decode_inputs
from flashmla_cute.testing import make_decode_inputs

B, S_Q, H_Q = 2, 2, 16


def by_query_token(lse):
    return lse.stride() == (S_Q * H_Q, 1, H_Q)


@pytest.mark.parametrize("h_kv", [1, 2])
def test_dense_lse_by_query_token_with_one_kv_head(each_device, h_kv):
    x = make_decode_inputs(B, S_Q, H_Q, h_kv=h_kv, seqlens=[300, 70], device=each_device, seed=1)
    meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, S_Q * H_Q // h_kv, h_kv)
    _, lse = flashmla_cute.flash_mla_with_kvcache(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits,
                                                  causal=True)
    assert by_query_token(lse) if h_kv == 1 else lse.is_contiguous()
    _, ref_lse = flash_mla_reference(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, causal=True)
    torch.testing.assert_close(lse.cpu(), ref_lse.cpu())
    if h_kv == 1:  # FlashMLA's layout lets a query token's heads be viewed as one row
        assert lse.transpose(1, 2).view(B * S_Q, H_Q).shape == (B * S_Q, H_Q)


def test_sparse_lse_by_query_token(each_device):
    x = make_sparse_decode_inputs(B, S_Q, 64, 300, 64, 16, seed=2, device=each_device)
    plan, _ = api.get_mla_metadata()
    _, lse = api.flash_mla_with_kvcache(x.q, x.k_cache, None, None, 512, plan, softmax_scale=x.softmax_scale,
                                        is_fp8_kvcache=True, indices=x.indices)
    assert lse.stride() == (S_Q * 64, 1, 64)
    _, ref_lse = sparse_mla_reference(x.q, x.k_cache, x.indices, None, None, x.softmax_scale)
    torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), atol=1e-5, rtol=1e-5)
