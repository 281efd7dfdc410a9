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


def bad_step(q, k_cache, block_table, cache_seqlens, heads=32, head_dim_v=512, softmax_scale=None, causal=True):
    meta, splits = flashmla_cute.get_mla_metadata(cache_seqlens, heads, 1)
    return flashmla_cute.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits,
                                                softmax_scale, causal)


# What a call gets wrong: a Python scalar (refused while tracing) or q (refused when the
# op runs), and the eager call's exception and the start of its message.
BAD_COMPILED = {
    "causal 1": (dict(causal=1), TypeError, "causal must be a bool, got int"),
    "head_dim_v -1": (dict(head_dim_v=-1), ValueError, "head_dim_v must be >= 1, got -1"),
    "head_dim_v float": (dict(head_dim_v=512.0), TypeError, "head_dim_v must be an int, got float"),
    "scale str": (dict(softmax_scale="a"), TypeError, "softmax_scale must be a float or None, got str"),
    "scale -1": (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be a finite positive float, got -1.0"),
    "no heads": (dict(heads=0), ValueError, "num_heads_per_head_k must be >= 1, got 0"),
    "q float32": (lambda q: q.float(), TypeError, "q must have dtype torch.bfloat16 or torch.float16, got "
                                                  "torch.float32"),
    "q 3-D": (lambda q: q[:, 0], ValueError, "q must have 4 dimensions"),
}


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph breaks", "fullgraph"])
@pytest.mark.parametrize("case", list(BAD_COMPILED))
def test_compiled_calls_refuse_what_eager_calls_refuse(case, fullgraph):
    # Without fullgraph: the eager exception. With it: a bad q raises the eager exception
    # when the op runs; a bad scalar fails the trace with torch.compile's error, which
    # carries the eager message. A schema never converts a bad scalar (1 into True).
    x = make_decode_inputs(2, 2, 16, seqlens=[10, 70])
    bad, error, message = BAD_COMPILED[case]
    scalars = bad if isinstance(bad, dict) else {}
    q = x.q if isinstance(bad, dict) else bad(x.q)
    args = (q, x.k_cache, x.block_table, x.cache_seqlens)
    with pytest.raises(error, match=message):
        bad_step(*args, **scalars)
    torch._dynamo.reset()
    compiled = torch.compile(bad_step, fullgraph=fullgraph, backend="eager")
    with pytest.raises(Exception) as info:
        compiled(*args, **scalars)
    assert message in str(info.value)
    if not (fullgraph and scalars):
        assert type(info.value) is error


def test_compiled_merge_refuses_what_the_eager_merge_refuses():
    out = torch.zeros(2, 3, 4)
    lse = torch.zeros(2, 4, 3)
    torch._dynamo.reset()
    compiled = torch.compile(flashmla_cute.merge_attention_states, fullgraph=True, backend="eager")
    with pytest.raises(ValueError, match=r"out_a must be \[b, s_q, h_q, dv\], got shape \(2, 3, 4\)"):
        compiled(out, lse, out, lse)


def current_api_step(q, k_cache, block_table, cache_seqlens, softmax_scale=None):
    from flashmla_cute import api

    plan, _ = api.get_mla_metadata()
    return api.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, plan, None, softmax_scale)


def feb_api_step(q, k_cache, block_table, cache_seqlens, softmax_scale=None):
    meta, splits = flashmla_cute.get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2], k_cache.shape[2])
    return flashmla_cute.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, meta, splits,
                                                softmax_scale)


@pytest.mark.parametrize("scale", [None, 0.05, "from q"], ids=["default scale", "scale given", "scale from q"])
@pytest.mark.parametrize("step", [feb_api_step, current_api_step], ids=["Feb-2025 API", "current API"])
def test_dense_steps_compile_whole_with_dynamic_shapes(step, scale):
    # With dynamic=True every size and float is traced: a scale is then a symbolic float,
    # whose value is checked when the op runs.
    x = make_decode_inputs(2, 1, 16, seqlens=[50, 87])
    args = (x.q, x.k_cache, x.block_table, x.cache_seqlens)

    def run(*tensors):
        return step(*tensors, tensors[0].shape[-1] ** -0.5 if scale == "from q" else scale)

    torch._dynamo.reset()
    compiled = torch.compile(run, dynamic=True, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(*args), run(*args)):
        assert torch.equal(got, expected)


def test_sparse_calls_run_eagerly_under_compile():
    # No custom op: the sparse call is a graph break, and with fullgraph=True torch's
    # error names the function it may not trace.
    from flashmla_cute import api
    from flashmla_cute.sparse_testing import make_sparse_decode_inputs

    x = make_sparse_decode_inputs(2, 1, 64, 300, 64, 16, seed=3)

    def step(q):
        plan, _ = api.get_mla_metadata()
        out, lse = api.flash_mla_with_kvcache(q, x.k_cache, None, None, 512, plan, softmax_scale=x.softmax_scale,
                                              is_fp8_kvcache=True, indices=x.indices)
        return out * 2, lse

    expected = step(x.q)
    torch._dynamo.reset()
    for got, want in zip(torch.compile(step, backend="aot_eager")(x.q), expected):
        assert torch.equal(got, want)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="_sparse"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(x.q)
