"""The public functions are torch.library custom ops under torch.compile: a decode step
compiled with fullgraph=True traces them (CPU: through the reference; GPU: our kernels)."""

import pytest
import torch

import flashmla_cute
from flashmla_cute.reference import flash_mla_reference
from flashmla_cute.testing import cosine_distance, make_decode_inputs


def decode_step(q, k_cache, block_table, cache_seqlens):
    meta, splits = flashmla_cute.get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2], k_cache.shape[2])
    out, lse = flashmla_cute.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, 512, meta, splits, causal=True
    )
    return out * 2, lse


def check(device):
    x = make_decode_inputs(3, 2, 16, seqlens=[5, 130, 700], device=device)
    torch._dynamo.reset()
    step = torch.compile(decode_step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out, lse = step(x.q, x.k_cache, x.block_table, x.cache_seqlens)
    ref_out, ref_lse = flash_mla_reference(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, causal=True)
    assert cosine_distance(out.float(), 2 * ref_out.float()) < 1e-5
    assert cosine_distance(lse, ref_lse) < 1e-5


def test_ops_are_registered():
    from flashmla_cute import ops  # noqa: F401

    assert hasattr(torch.ops.flashmla_cute, "get_mla_metadata")
    assert hasattr(torch.ops.flashmla_cute, "flash_mla_with_kvcache")
    assert hasattr(torch.ops.flashmla_cute, "merge_attention_states")


def test_fake_implementations_give_shapes():
    from flashmla_cute import ops  # noqa: F401

    x = make_decode_inputs(2, 2, 16, seqlens=[10, 70])
    meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, 32, 1)
    torch.library.opcheck(torch.ops.flashmla_cute.get_mla_metadata, (x.cache_seqlens, 32, 1))
    torch.library.opcheck(
        torch.ops.flashmla_cute.flash_mla_with_kvcache,
        (x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits, None, True),
    )
    out, lse = flashmla_cute.flash_mla_with_kvcache(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits)
    torch.library.opcheck(torch.ops.flashmla_cute.merge_attention_states, (out, lse, out.clone(), lse + 1))


def test_compiled_step_cpu():
    check("cpu")


@pytest.mark.gpu
def test_compiled_step_gpu(requires_hopper):
    check("cuda")


def check_merge(device):
    """Two halves' results merged in a compiled step (a context-parallel decode's last
    step) equal the eager merge."""
    x = make_decode_inputs(2, 1, 16, seqlens=[300, 90], device=device)
    out, lse = flash_mla_reference(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512)
    halves = (out, lse, (out * 0.5).to(out.dtype), lse - 1.0)
    torch._dynamo.reset()
    step = torch.compile(flashmla_cute.merge_attention_states, fullgraph=True,
                         backend="aot_eager" if device == "cpu" else "inductor")
    for got, expected in zip(step(*halves), flashmla_cute.merge_attention_states(*halves)):
        torch.testing.assert_close(got, expected)


def test_compiled_merge_cpu():
    check_merge("cpu")


@pytest.mark.gpu
def test_compiled_merge_gpu(requires_hopper):
    check_merge("cuda")
