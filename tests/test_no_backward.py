"""The package's functions have no backward (``flashmla_cute.no_backward``). Given inputs
that require grad, under grad mode, their outputs require grad and a backward through them
raises a RuntimeError naming the function, on the CPU as on the GPU; under no_grad, or
with no input that requires grad, the outputs carry no autograd graph."""

import pytest
import torch

import flashmla_cute
from flashmla_cute import api
from flashmla_cute.sparse_testing import make_sparse_decode_inputs
from flashmla_cute.testing import make_decode_inputs

def dense(device, grad):
    x = make_decode_inputs(2, 1, 16, seqlens=[300, 70], device=device, seed=1)
    x.q.requires_grad_(grad)
    meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, 16, 1)
    return x.q, flashmla_cute.flash_mla_with_kvcache(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits)


def sparse(device, grad):
    x = make_sparse_decode_inputs(2, 1, 64, 300, 64, 16, seed=2, with_sink=True, device=device)
    x.attn_sink.requires_grad_(grad)
    plan, _ = api.get_mla_metadata()
    return x.attn_sink, api.flash_mla_with_kvcache(x.q, x.k_cache, None, None, 512, plan,
                                                   softmax_scale=x.softmax_scale, is_fp8_kvcache=True,
                                                   indices=x.indices, attn_sink=x.attn_sink)


def merge(device, grad):
    out_a = torch.randn(2, 1, 16, 512, device=device).requires_grad_(grad)
    lse_a, lse_b = torch.randn(2, 2, 16, 1, device=device)
    return out_a, flashmla_cute.merge_attention_states(out_a, lse_a, torch.randn_like(out_a), lse_b)


CALLS = {  # a call's kind: (the call, which returns an input and the outputs; the function's name)
    "dense": (dense, "flash_mla_with_kvcache"),
    "sparse": (sparse, "flash_mla_with_kvcache"),
    "merge": (merge, "merge_attention_states"),
}


@pytest.mark.parametrize("kind", list(CALLS))
def test_a_backward_raises_naming_the_function(each_device, kind):
    call, name = CALLS[kind]
    x, (out, lse) = call(each_device, grad=True)
    assert out.requires_grad and lse.requires_grad
    with pytest.raises(RuntimeError, match=f"^{name} has no backward: flashmla_cute computes attention for inference"):
        (out.float().sum() + x.float().sum()).backward()


@pytest.mark.parametrize("kind", list(CALLS))
def test_outputs_carry_no_graph_without_grad(each_device, kind):
    call, _ = CALLS[kind]
    results = [call(each_device, grad=False)[1]]
    for grad in (False, True):
        with torch.no_grad():
            results.append(call(each_device, grad)[1])
    assert not any(t.requires_grad for result in results for t in result)
