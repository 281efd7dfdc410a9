"""On the GPU, calls first take a fast path that leaves most argument checks to the
compiled function; these tests hold it to the checked path's behaviour: every bad
argument fails with the same exception and message as ``checks.py`` gives, and a valid
call gives the same result either way."""

import pytest
import torch

import flashmla_cute
from flashmla_cute import checks, interface, runtime
from flashmla_cute.reference import flash_mla_reference
from flashmla_cute.testing import cosine_distance, make_decode_inputs
from test_arguments import BAD, BAD_METADATA, H_KV, H_Q, S_Q, SEQLENS, every_other, misaligned

pytestmark = pytest.mark.gpu


def gpu_args():
    """test_arguments' good arguments (the ones its BAD cases spoil), on the GPU."""
    inp = make_decode_inputs(len(SEQLENS), S_Q, H_Q, h_kv=H_KV, seqlens=SEQLENS, device="cuda", seed=0)
    meta, num_splits = flashmla_cute.get_mla_metadata(inp.cache_seqlens, S_Q * H_Q // H_KV, H_KV)
    return dict(q=inp.q, k_cache=inp.k_cache, block_table=inp.block_table, cache_seqlens=inp.cache_seqlens,
                head_dim_v=512, tile_scheduler_metadata=meta, num_splits=num_splits, softmax_scale=None,
                causal=True)


def reference(args):
    return flash_mla_reference(args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"], 512)


def raised(fn, *args, **kwargs) -> BaseException:
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_decode_argument_fails_as_on_the_cpu(requires_hopper, case):
    args = gpu_args()
    flashmla_cute.flash_mla_with_kvcache(**args)  # the fast path now serves this configuration
    mutate, error, text = BAD[case]
    mutate(args)
    expected = raised(checks.check_decode_args, **args)
    actual = raised(flashmla_cute.flash_mla_with_kvcache, **args)
    assert (type(actual), str(actual)) == (type(expected), str(expected))
    assert type(actual) is error and text in str(actual)  # test_arguments' expectation on the CPU


def test_misaligned_q_of_several_kv_heads_fails_as_on_the_cpu(requires_hopper):
    # With s_q > 1 and several KV heads the kernel sees a copy of q's rows, aligned
    # wherever q is: the fast path tests q's address itself.
    inp = make_decode_inputs(2, 2, 16, h_kv=2, seqlens=[70, 130], device="cuda", seed=1)
    meta, num_splits = flashmla_cute.get_mla_metadata(inp.cache_seqlens, 2 * 16 // 2, 2)
    args = dict(q=inp.q, k_cache=inp.k_cache, block_table=inp.block_table, cache_seqlens=inp.cache_seqlens,
                head_dim_v=512, tile_scheduler_metadata=meta, num_splits=num_splits)
    flashmla_cute.flash_mla_with_kvcache(**args)  # the fast path now serves this configuration
    args["q"] = misaligned(inp.q)
    expected = raised(checks.check_decode_args, **args)
    actual = raised(flashmla_cute.flash_mla_with_kvcache, **args)
    assert (type(actual), str(actual)) == (type(expected), str(expected))
    assert "q data pointer must be 16-byte aligned" in str(actual)


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata_argument_fails_as_the_checks_say(requires_hopper, case):
    seqlens = torch.tensor([5, 100, 0], dtype=torch.int32, device="cuda")
    flashmla_cute.get_mla_metadata(seqlens, 16, 1)
    make, error, text = BAD_METADATA[case]
    args = make(seqlens)
    expected = raised(checks.check_metadata_args, *args)
    actual = raised(flashmla_cute.get_mla_metadata, *args)
    assert (type(actual), str(actual)) == (type(expected), str(expected))
    assert type(actual) is error and text in str(actual)


def test_metadata_of_strided_lengths_is_refused(requires_hopper):
    seqlens = torch.tensor([5, 100, 0], dtype=torch.int32, device="cuda")
    flashmla_cute.get_mla_metadata(seqlens, 16, 1)
    with pytest.raises(ValueError, match="cache_seqlens must be contiguous"):
        flashmla_cute.get_mla_metadata(every_other(seqlens), 16, 1)


def test_valid_calls_skip_the_python_checks(requires_hopper, monkeypatch):
    args = gpu_args()
    expected = flashmla_cute.flash_mla_with_kvcache(**args)

    def refuse(*a, **k):
        raise AssertionError("the checked path ran")

    monkeypatch.setattr(checks, "check_decode_args", refuse)
    monkeypatch.setattr(checks, "check_metadata_args", refuse)
    meta, num_splits = flashmla_cute.get_mla_metadata(args["cache_seqlens"], S_Q * H_Q // H_KV, H_KV)
    assert torch.equal(meta, args["tile_scheduler_metadata"]) and torch.equal(num_splits, args["num_splits"])
    for scale in (None, 0.05):
        args["softmax_scale"] = scale
        flashmla_cute.flash_mla_with_kvcache(**args)
    args["softmax_scale"] = None
    out, lse = flashmla_cute.flash_mla_with_kvcache(**args)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


def test_fast_and_checked_paths_agree(requires_hopper, monkeypatch):
    args = gpu_args()
    args["softmax_scale"] = 0.04
    checked = interface._checked_decode(**args)  # remembers the configuration

    def refuse(*a, **k):
        raise AssertionError("the checked path ran")

    monkeypatch.setattr(interface, "_checked_decode", refuse)
    fast = flashmla_cute.flash_mla_with_kvcache(**args)
    assert torch.equal(fast[0], checked[0]) and torch.equal(fast[1], checked[1])



# ------------------------------------------------------------ the split workspace
# All layers of a step share one plan: the first call with a plan allocates the fp32
# workspace for split partial results and keeps it on the plan's tensor for the calls
# after it on the same stream; a call on another stream allocates its own, and the plan
# keeps both.


def split_heavy_args():
    """A batch whose long sequence is split over many SM parts (the workspace is used)."""
    inp = make_decode_inputs(2, 1, 64, seqlens=[8000, 50], device="cuda")
    meta, num_splits = flashmla_cute.get_mla_metadata(inp.cache_seqlens, 64, 1)
    assert int(num_splits[1] - num_splits[0]) > 1
    return dict(q=inp.q, k_cache=inp.k_cache, block_table=inp.block_table, cache_seqlens=inp.cache_seqlens,
                head_dim_v=512, tile_scheduler_metadata=meta, num_splits=num_splits)


def kept_workspace(meta):
    """The workspace the plan keeps for calls on the current stream."""
    stream = torch.cuda.current_stream().cuda_stream
    (workspace,) = [w for (s, _), w in runtime.kept_workspaces(meta).items() if s == stream]
    return workspace


def test_workspace_is_kept_for_the_plans_next_calls(requires_hopper):
    args = split_heavy_args()
    first = flashmla_cute.flash_mla_with_kvcache(**args)
    workspace = kept_workspace(args["tile_scheduler_metadata"])
    args["q"] = torch.randn_like(args["q"]) / 10  # the next layer's queries
    second = flashmla_cute.flash_mla_with_kvcache(**args)
    assert kept_workspace(args["tile_scheduler_metadata"]) is workspace
    ref = reference(args)
    assert cosine_distance(second[0], ref[0]) < 1e-5 and cosine_distance(second[1], ref[1]) < 1e-5
    assert not torch.equal(first[0], second[0])


def test_other_streams_get_their_own_workspace(requires_hopper):
    args = split_heavy_args()
    meta = args["tile_scheduler_metadata"]
    flashmla_cute.flash_mla_with_kvcache(**args)
    on_default = kept_workspace(meta)
    queries = [torch.randn_like(args["q"]) / 10 for _ in range(4)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    results = []
    # Calls on two streams at once, sharing the plan: each stream's calls must have a
    # workspace of their own.
    with torch.cuda.stream(side):
        for q in queries[:2]:
            results.append(flashmla_cute.flash_mla_with_kvcache(**{**args, "q": q}))
        on_side = kept_workspace(meta)
    for q in queries[2:]:
        results.append(flashmla_cute.flash_mla_with_kvcache(**{**args, "q": q}))
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert on_side is not on_default and on_side.data_ptr() != on_default.data_ptr()
    assert kept_workspace(meta) is on_default  # the side stream's calls took nothing from it
    for q, (out, lse) in zip(queries, results):
        ref = reference({**args, "q": q})
        assert cosine_distance(out, ref[0]) < 1e-5 and cosine_distance(lse, ref[1]) < 1e-5


# ---------------------------------------------------------------- sparse calls (current API)


def test_sparse_calls_keep_the_workspace_on_the_plan(requires_hopper):
    # As the dense plan's tensor does: the next layer's call on the same stream reuses it.
    from flashmla_cute import api
    from flashmla_cute.sparse_reference import sparse_mla_reference
    from test_api import sparse_call

    inp = sparse_gpu_inputs()
    plan, _ = api.get_mla_metadata()
    first = sparse_call(inp, plan)
    workspace = kept_workspace(plan)
    next_q = torch.randn_like(inp.q) / 10
    second = sparse_call(inp, plan, q=next_q)
    assert kept_workspace(plan) is workspace
    ref = sparse_mla_reference(next_q, inp.k_cache, inp.indices, inp.topk_length, inp.attn_sink, inp.softmax_scale)
    assert cosine_distance(second[0], ref[0]) < 1e-5 and cosine_distance(second[1], ref[1]) < 1e-5
    assert not torch.equal(first[0], second[0])


def sparse_gpu_inputs():
    from flashmla_cute.sparse_testing import make_sparse_decode_inputs

    return make_sparse_decode_inputs(2, 2, 16, 200, 128, 16, seed=11, with_sink=True, with_topk_length=True,
                                     device="cuda")


@pytest.mark.parametrize("layout_name", ["V3.2", "MODEL1"])
def test_sparse_repeat_call_takes_the_fast_path_and_gives_the_same_result(requires_hopper, layout_name):
    from flashmla_cute import api, fp8_cache
    from flashmla_cute.sparse_testing import make_sparse_decode_inputs

    layout = next(x for x in fp8_cache.LAYOUTS if x.name == layout_name)
    extra = dict(extra_topk=64, extra_page_size=8) if layout is fp8_cache.MODEL1 else {}
    inp = make_sparse_decode_inputs(2, 2, 16, 200, 128, 16, seed=3, layout=layout, device="cuda", **extra)
    plan, _ = api.get_mla_metadata()
    api._known_sparse.clear()

    def call():
        return api.flash_mla_with_kvcache(
            inp.q, inp.k_cache, None, None, 512, plan, softmax_scale=inp.softmax_scale, is_fp8_kvcache=True,
            indices=inp.indices, extra_k_cache=inp.extra_k_cache, extra_indices_in_kvcache=inp.extra_indices)

    first = call()
    assert len(api._known_sparse) == 1  # the checked call remembered its configuration
    second = call()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("case", sorted(__import__("test_api").BAD_SPARSE))
def test_bad_sparse_argument_fails_as_on_the_checked_path(requires_hopper, case):
    from flashmla_cute import api
    from test_api import BAD_SPARSE, bad_overrides, sparse_call

    inp = sparse_gpu_inputs()
    what, _, _ = BAD_SPARSE[case]
    sparse_call(inp)  # the fast path now serves this configuration
    overrides = bad_overrides(inp, what)  # built once: a misaligned copy's address is in the message
    actual = raised(sparse_call, inp, **overrides)
    api._known_sparse.clear()
    expected = raised(sparse_call, inp, **overrides)
    assert (type(actual), str(actual)) == (type(expected), str(expected))
