"""FlashMLA's current API (``flashmla_cute.api``) on CPU tensors: dense calls give the
Feb-2025 API's results, sparse calls the sparse reference's; the plan object is filled
by its first call and refuses a later call with another configuration; every bad sparse
argument is refused with a message naming it."""

import math

import numpy as np
import pytest
import torch

import flashmla_cute
from flashmla_cute import api, fp8_cache, sparse_checks, sparse_plan
from flashmla_cute.api import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata
from flashmla_cute.sparse_reference import sparse_mla_reference
from flashmla_cute.sparse_testing import make_sparse_decode_inputs
from flashmla_cute.testing import assert_equal_up_to_rounding, make_decode_inputs
from test_arguments import misaligned, padded_rows


def sparse_call(inp, plan=None, **overrides):
    args = dict(
        q=inp.q, k_cache=inp.k_cache, block_table=None, cache_seqlens=None, head_dim_v=512,
        tile_scheduler_metadata=plan if plan is not None else get_mla_metadata()[0], num_splits=None,
        softmax_scale=inp.softmax_scale, causal=False, is_fp8_kvcache=True, indices=inp.indices,
        attn_sink=inp.attn_sink, topk_length=inp.topk_length,
    )
    args.update(overrides)
    return flash_mla_with_kvcache(**args)


@pytest.fixture
def inp():
    return make_sparse_decode_inputs(2, 2, 16, 200, 128, 16, seed=11, with_sink=True, with_topk_length=True)


def test_get_mla_metadata_ignores_its_arguments():
    plan, nothing = get_mla_metadata(torch.zeros(3, dtype=torch.int32), 128, 1, anything="at all")
    assert isinstance(plan, FlashMLASchedMeta) and nothing is None
    assert not plan.have_initialized and plan.config is None


def test_sparse_call_is_the_reference(inp):
    plan, _ = get_mla_metadata()
    out, lse = sparse_call(inp, plan)
    exp_out, exp_lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, inp.topk_length, inp.attn_sink,
                                            inp.softmax_scale)
    assert_equal_up_to_rounding(out, exp_out)
    assert_equal_up_to_rounding(lse, exp_lse)
    assert plan.have_initialized
    assert plan.config == FlashMLASchedMeta.Config(2, 2, 16, 16, 1, False, True, 128, None, None)
    # The same plan serves the next layer.
    out2, _ = sparse_call(inp, plan)
    assert_equal_up_to_rounding(out2, out)


def test_sparse_default_scale_is_d_to_the_minus_half(inp):
    out, lse = sparse_call(inp, softmax_scale=None)
    exp_out, exp_lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, inp.topk_length, inp.attn_sink,
                                            576 ** -0.5)
    assert_equal_up_to_rounding(out, exp_out)
    assert_equal_up_to_rounding(lse, exp_lse)


def test_dense_call_is_the_feb_2025_api():
    d = make_decode_inputs(3, 2, 8, h_kv=1, d=576, dtype=torch.bfloat16, seqlens=[5, 70, 130], seed=3)
    plan, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(d.q, d.k_cache, d.block_table, d.cache_seqlens, 512, plan, causal=True)
    meta, splits = flashmla_cute.get_mla_metadata(d.cache_seqlens, 2 * 8, 1)
    exp_out, exp_lse = flashmla_cute.flash_mla_with_kvcache(
        d.q, d.k_cache, d.block_table, d.cache_seqlens, 512, meta, splits, causal=True
    )
    assert_equal_up_to_rounding(out, exp_out)
    assert_equal_up_to_rounding(lse, exp_lse)
    assert torch.equal(plan.tile_scheduler_metadata, meta) and torch.equal(plan.num_splits, splits)
    assert plan.config == FlashMLASchedMeta.Config(3, 2, 8, 64, 1, True, False, None, None, None)
    kept = plan.tile_scheduler_metadata
    flash_mla_with_kvcache(d.q, d.k_cache, d.block_table, d.cache_seqlens, 512, plan, causal=True)
    assert plan.tile_scheduler_metadata is kept, "later calls reuse the plan"


def test_plan_refuses_another_configuration(inp):
    plan, _ = get_mla_metadata()
    sparse_call(inp, plan)
    with pytest.raises(ValueError, match=r"planned for another configuration.*h_q 16 -> 8"):
        sparse_call(inp, plan, q=inp.q[:, :, :8], attn_sink=None)
    with pytest.raises(ValueError, match=r"topk 128 -> 64"):
        sparse_call(inp, plan, indices=inp.indices[..., :64].contiguous())
    d = make_decode_inputs(2, 2, 16, h_kv=1, d=576, dtype=torch.bfloat16, seqlens=[5, 9], seed=1)
    with pytest.raises(ValueError, match=r"page_block_size 16 -> 64.*is_fp8_kvcache True -> False.*topk 128 -> None"):
        flash_mla_with_kvcache(d.q, d.k_cache, d.block_table, d.cache_seqlens, 512, plan)


def test_a_refused_first_call_leaves_the_plan_empty(inp):
    plan, _ = get_mla_metadata()
    with pytest.raises(ValueError):
        sparse_call(inp, plan, causal=True)
    assert not plan.have_initialized
    sparse_call(inp, plan, q=inp.q[:, :, :8], attn_sink=None)
    assert plan.config.h_q == 8


BAD_SPARSE = {
    "plan type": (dict(tile_scheduler_metadata=torch.zeros(1, 8, dtype=torch.int32)), TypeError,
                  "tile_scheduler_metadata must be the FlashMLASchedMeta"),
    "num_splits": (dict(num_splits=torch.zeros(3, dtype=torch.int32)), ValueError, "num_splits must be None"),
    "causal": (dict(causal=True), ValueError, "causal must be False with indices"),
    "not fp8": (dict(is_fp8_kvcache=False), ValueError, "is_fp8_kvcache must be True with indices"),
    "indices dtype": ("indices int64", TypeError, "indices must have dtype torch.int32"),
    "indices rank": ("indices rank", ValueError, r"indices must have 3 dimensions \[b, s_q, topk\]"),
    "indices sparse": ("indices sparse", ValueError, r"indices must be a strided \(dense\) tensor, got layout torch.sparse_coo"),
    "indices batch": ("indices batch", ValueError, r"indices must have shape \[b, s_q, topk\] = \[2, 2, topk\]"),
    "topk multiple": ("topk 100", ValueError, "topk.*multiple of 64"),
    "topk too big": ("topk 16448", ValueError, r"topk.*\[64, 16384\], got 16448"),
    "bytes per token": ("cache 600", ValueError,
                        r"k_cache must have shape \[num_blocks, page_size, 1, 656\] \(V3.2 FP8 layout\) or "
                        r"\[num_blocks, page_size, 1, 584\] \(MODEL1\)"),
    "model1 pages overlap": ("model1 overlapping", ValueError, "k_cache must be a MODEL1 cache view"),
    "cache dtype": ("cache bf16", TypeError, "k_cache must have dtype torch.float8_e4m3fn, torch.int8 or torch.uint8"),
    "cache token stride": ("cache strided", ValueError, r"k_cache must hold each page's tokens back to back"),
    "cache page stride": ("cache pages 4 GiB apart", ValueError,
                          r"k_cache.stride\(0\) \(page stride\) must be at most 4294967295 bytes"),
    # Pages of more than 2**31 - 1 bytes (the kernel's offsets in a page are 32-bit), of
    # one page or more, in the main cache or the extra one.
    "cache page past 2**31 bytes": ("one page of 3273604 tokens", ValueError,
                                    r"k_cache.shape\[1\] \(page block size\) must be at most 3273603 for the V3.2 "
                                    r"layout \(pages of at most 2147483647 bytes.*got shape \(1, 3273604, 1, 656\); "
                                    r"use smaller pages"),
    "model1 page past 2**31 bytes": ("model1 pages of 3677199 tokens", ValueError,
                                     r"k_cache.shape\[1\] \(page block size\) must be at most 3677198 for the MODEL1 "
                                     r"layout.*got shape \(2, 3677199, 1, 584\)"),
    "extra page past 2**31 bytes": ("extra page of 3273604 tokens", ValueError,
                                    r"extra_k_cache.shape\[1\] \(page block size\) must be at most 3273603"),
    # More tokens than int32 indices name (the kernel's validity test would wrap).
    "cache past 2**31 tokens": ("cache of 2**31 tokens", ValueError,
                                r"k_cache must hold at most 2147483647 tokens \(2\*\*31 - 1: int32 indices name "
                                r"them\), got 65537 pages of 32768 = 2147516416"),
    "indices row stride": ("index rows 2**32 apart", ValueError,
                           r"indices.stride\(1\) must be at most 4294967295 elements"),
    # The kernel's 16-byte loads and stores, refused on every device as on the GPU.
    "q rows off 16 bytes": ("q padded rows", ValueError,
                            r"q strides must be multiples of 8 elements \(16 bytes\) in all but the last dimension"),
    "q misaligned": ("q misaligned", ValueError, "q data pointer must be 16-byte aligned"),
    "cache misaligned": ("cache misaligned", ValueError, "k_cache data pointer must be 16-byte aligned"),
    "extra cache misaligned": ("extra misaligned", ValueError, "extra_k_cache data pointer must be 16-byte aligned"),
    "model1 pages off 16 bytes": ("model1 page stride 9352", ValueError,
                                  r"k_cache strides must be multiples of 16 elements \(16 bytes\) in the page "
                                  r"dimension, got strides \(9352, 584, 584, 1\)"),
    "q dtype": ("q fp16", TypeError, "q must have dtype torch.bfloat16"),
    "d_qk": ("q 512", ValueError, r"q.shape\[3\] \(d_qk\) must be 576 for k_cache's V3.2 layout"),
    "d_qk model1": ("model1 with q 576", ValueError, r"q.shape\[3\] \(d_qk\) must be 512 for k_cache's MODEL1 layout"),
    "s_q": ("s_q 5", ValueError, r"q.shape\[1\] \(s_q\) must be in \[1, 4\], got 5"),
    "h_q": ("h_q 192", ValueError, r"q.shape\[2\] \(h_q\) must be in \[1, 128\]"),
    "head_dim_v": (dict(head_dim_v=576), ValueError, "head_dim_v must be 512"),
    "head_dim_v numpy float": (dict(head_dim_v=np.float64(512)), TypeError,
                               "head_dim_v must be an int, got numpy.float64"),
    "sink dtype": ("sink bf16", TypeError, "attn_sink must have dtype torch.float32"),
    "sink shape": ("sink 8", ValueError, r"attn_sink must have shape \[h_q\] = \[16\], got \(8,\)"),
    "topk_length dtype": ("topk_length int64", TypeError, "topk_length must have dtype torch.int32"),
    "topk_length shape": ("topk_length 3", ValueError, r"topk_length must have shape \[b\] = \[2\], got \(3,\)"),
    "extra cache alone": ("extra", ValueError, "extra_k_cache and extra_indices_in_kvcache must be given together"),
    "extra indices alone": ("extra indices", ValueError,
                            "extra_k_cache and extra_indices_in_kvcache must be given together"),
    "extra length alone": ("extra length", ValueError, "extra_topk_length needs extra_k_cache"),
    "extra layout": ("extra model1", ValueError, "extra_k_cache must have k_cache's V3.2 layout"),
    "extra topk": ("extra topk 100", ValueError, r"extra_indices_in_kvcache.shape\[2\] \(topk\) must be a multiple of 64"),
    "extra batch": ("extra indices batch", ValueError,
                    r"extra_indices_in_kvcache must have shape \[b, s_q, topk\] = \[2, 2, topk\]"),
    "extra length dtype": ("extra length int64", TypeError, "extra_topk_length must have dtype torch.int32"),
    "scale": (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be a finite positive float"),
    "scale past float32": (dict(softmax_scale=1e39), ValueError, "softmax_scale must be within float32's normal range"),
    "scale past float": (dict(softmax_scale=10**400), ValueError,
                         "softmax_scale must be a finite positive float, got an int of 401 digits"),
    "causal numpy bool": (dict(causal=np.bool_(False)), TypeError, "causal must be a bool, got numpy.bool"),
    # The default scale is q's width to the -1/2: a q without one is refused, not divided by.
    "q 0-dim, default scale": (dict(q=torch.tensor(1.0, dtype=torch.bfloat16), softmax_scale=None), ValueError,
                               r"q must have 4 dimensions \[b, s_q, h_q, 576\]"),
    "q of width 0, default scale": ("q width 0", ValueError, r"q.shape\[3\] \(d_qk\) must be 576"),
    "plan marked initialized": (dict(tile_scheduler_metadata=FlashMLASchedMeta(have_initialized=True)), ValueError,
                                "tile_scheduler_metadata is marked initialized but holds no configuration"),
    "all on meta": ("all meta", ValueError, r"q must be a CUDA \(sm_90\) or CPU tensor, got device meta"),
}


def bad_overrides(inp, what):
    if isinstance(what, dict):
        return what
    q, cache, idx = inp.q, inp.k_cache, inp.indices
    model1_cache = fp8_cache.quantize_model1_kv_cache(torch.zeros(4, 16, 1, fp8_cache.MODEL1_HEAD_DIM))
    model1_q = torch.zeros(*q.shape[:3], fp8_cache.MODEL1_HEAD_DIM, dtype=torch.bfloat16)
    return {
        "indices int64": lambda: dict(indices=idx.long()),
        "indices rank": lambda: dict(indices=idx[0]),
        "indices sparse": lambda: dict(indices=idx.to_sparse()),
        "indices batch": lambda: dict(indices=idx[:1]),
        "topk 100": lambda: dict(indices=torch.zeros(2, 2, 100, dtype=torch.int32)),
        "topk 16448": lambda: dict(indices=torch.zeros(2, 2, 16448, dtype=torch.int32)),
        "cache 600": lambda: dict(k_cache=cache.view(torch.uint8)[..., :600]),
        "model1 overlapping": lambda: dict(q=model1_q, k_cache=torch.zeros(4, 16 * 584, dtype=torch.uint8).as_strided(
            (4, 16, 1, 584), (584, 584, 584, 1))),
        "model1 with q 576": lambda: dict(k_cache=model1_cache),
        "cache bf16": lambda: dict(k_cache=torch.zeros(4, 16, 1, 656, dtype=torch.bfloat16)),
        "cache strided": lambda: dict(k_cache=torch.zeros(4, 16, 1, 672, dtype=torch.uint8)[..., :656]),
        # On the meta device: a view of 4 GiB without the memory (refused before any device check).
        "cache pages 4 GiB apart": lambda: dict(k_cache=torch.empty(2**34, dtype=torch.uint8, device="meta").as_strided(
            (4, 16, 1, 656), (2**32, 656, 656, 1))),
        "one page of 3273604 tokens": lambda: dict(k_cache=torch.empty(1, 3273604, 1, 656, dtype=torch.uint8,
                                                                       device="meta")),
        "model1 pages of 3677199 tokens": lambda: dict(q=model1_q, k_cache=torch.empty(
            2, 3677199, 1, 584, dtype=torch.uint8, device="meta")),
        "extra page of 3273604 tokens": lambda: dict(
            extra_k_cache=torch.empty(1, 3273604, 1, 656, dtype=torch.uint8, device="meta"),
            extra_indices_in_kvcache=idx),
        "cache of 2**31 tokens": lambda: dict(k_cache=torch.empty(65537, 32768, 1, 656, dtype=torch.uint8,
                                                                  device="meta")),
        "index rows 2**32 apart": lambda: dict(indices=torch.empty(2**35, dtype=torch.int32, device="meta").as_strided(
            idx.shape, (idx.shape[2], 2**32, 1))),
        "q padded rows": lambda: dict(q=padded_rows(q)),
        "q misaligned": lambda: dict(q=misaligned(q)),
        "cache misaligned": lambda: dict(k_cache=misaligned(cache)),
        "extra misaligned": lambda: dict(extra_k_cache=misaligned(cache), extra_indices_in_kvcache=idx),
        "model1 page stride 9352": lambda: dict(q=model1_q, k_cache=torch.zeros(4 * 9352, dtype=torch.uint8).as_strided(
            (4, 16, 1, 584), (9352, 584, 584, 1))),
        "q fp16": lambda: dict(q=q.half()),
        "q width 0": lambda: dict(q=q[..., :0], softmax_scale=None),
        "all meta": lambda: dict(q=q.to("meta"), k_cache=cache.to("meta"), indices=idx.to("meta"),
                                 attn_sink=inp.attn_sink.to("meta"), topk_length=inp.topk_length.to("meta")),
        "q 512": lambda: dict(q=q[..., :512]),
        "s_q 5": lambda: dict(q=torch.zeros(2, 5, 16, 576, dtype=torch.bfloat16)),
        "h_q 192": lambda: dict(q=torch.zeros(2, 2, 192, 576, dtype=torch.bfloat16), attn_sink=None),
        "sink bf16": lambda: dict(attn_sink=inp.attn_sink.bfloat16()),
        "sink 8": lambda: dict(attn_sink=inp.attn_sink[:8]),
        "topk_length int64": lambda: dict(topk_length=inp.topk_length.long()),
        "topk_length 3": lambda: dict(topk_length=torch.zeros(3, dtype=torch.int32)),
        "extra": lambda: dict(extra_k_cache=cache),
        "extra indices": lambda: dict(extra_indices_in_kvcache=idx),
        "extra length": lambda: dict(extra_topk_length=torch.zeros(2, dtype=torch.int32)),
        "extra model1": lambda: dict(extra_k_cache=model1_cache, extra_indices_in_kvcache=idx),
        "extra topk 100": lambda: dict(extra_k_cache=cache, extra_indices_in_kvcache=torch.zeros(2, 2, 100, dtype=torch.int32)),
        "extra indices batch": lambda: dict(extra_k_cache=cache, extra_indices_in_kvcache=idx[:1]),
        "extra length int64": lambda: dict(extra_k_cache=cache, extra_indices_in_kvcache=idx,
                                           extra_topk_length=torch.zeros(2, dtype=torch.int64)),
    }[what]()


@pytest.mark.parametrize("case", list(BAD_SPARSE))
def test_bad_sparse_arguments(inp, case):
    what, error, message = BAD_SPARSE[case]
    with pytest.raises(error, match=message):
        sparse_call(inp, **bad_overrides(inp, what))


def test_no_sparse_batch_is_refused_for_the_split_workspace():
    # Dense calls whose split workspace would pass the kernels' 32-bit indices are refused
    # ("split the batch"); a sparse plan never splits that far (sparse_plan). b = 8191 of
    # 4 query tokens and 128 heads, where no split plan fits, is accepted and planned
    # whole for any SM count. On the meta device: the shapes without the memory.
    b, s_q, h_q, topk = 8191, 4, 128, 2048
    q = torch.empty(b, s_q, h_q, 576, dtype=torch.bfloat16, device="meta")
    k_cache = torch.empty(1, 64, 1, 656, dtype=torch.uint8, device="meta")
    indices = torch.empty(b, s_q, topk, dtype=torch.int32, device="meta")
    problem = sparse_checks.check_sparse_decode_args(q, k_cache, 512, None, False, True, indices)
    assert (problem.b, problem.s_q, problem.h_q, problem.topk) == (b, s_q, h_q, topk)
    for num_sms in (78, 114, 132):
        assert sparse_plan.plan_splits(b, s_q, h_q, topk, num_sms) == sparse_plan.SparsePlan(b, 1)


def test_sparse_pages_of_up_to_2_31_bytes_are_accepted():
    # The page sizes just below the refusals above: 3273603 x 656 and 3677198 x 584
    # bytes, at most 2**31 - 1, in the main cache and the extra one, of one page or more.
    # On the meta device: the shapes without the memory.
    for head_dim, page_size, bytes_per_token in ((576, 3273603, 656), (512, 3677198, 584)):
        q = torch.empty(2, 1, 16, head_dim, dtype=torch.bfloat16, device="meta")
        indices = torch.empty(2, 1, 64, dtype=torch.int32, device="meta")
        k_cache = torch.empty(1, page_size, 1, bytes_per_token, dtype=torch.uint8, device="meta")
        extra_k_cache = torch.empty(3, page_size, 1, bytes_per_token, dtype=torch.uint8, device="meta")
        problem = sparse_checks.check_sparse_decode_args(q, k_cache, 512, None, False, True, indices,
                                                         extra_k_cache=extra_k_cache, extra_indices_in_kvcache=indices)
        assert (problem.num_blocks, problem.page_size) == (1, page_size)
        assert (problem.extra_num_blocks, problem.extra_page_size) == (3, page_size)
        assert page_size * bytes_per_token <= sparse_checks.MAX_PAGE_BYTES == 2**31 - 1


def test_a_dimension_of_one_may_have_any_stride():
    # Its stride is never used: q of one query token with an odd token stride is taken,
    # and gives the reference's result.
    one_token = make_sparse_decode_inputs(2, 1, 16, 200, 128, 16, seed=12)
    q = torch.empty(2 * 16 * 576 + 8, dtype=torch.bfloat16).as_strided(one_token.q.shape, (16 * 576 + 8, 3, 576, 1))
    q.copy_(one_token.q)
    got = sparse_call(one_token, q=q, attn_sink=None, topk_length=None)
    want = sparse_mla_reference(one_token.q, one_token.k_cache, one_token.indices, None, None, one_token.softmax_scale)
    assert_equal_up_to_rounding(got[0], want[0])
    assert_equal_up_to_rounding(got[1], want[1])


@pytest.mark.parametrize("bad,message", [
    (lambda d: dict(q=torch.tensor(1.0, dtype=torch.bfloat16)), r"q must have 4 dimensions \[b, s_q, h_q, d\]"),
    (lambda d: dict(q=d.q[:, :, :0]), r"q.shape\[2\] \(h_q\) must be >= 1, got 0"),
    (lambda d: dict(q=d.q[:, :0]), r"q.shape\[1\] \(s_q, query tokens per sequence\) must be in \[1, 4\], got 0"),
    (lambda d: dict(cache_seqlens=d.cache_seqlens.to("meta")), r"cache_seqlens must be a CUDA \(sm_90\) or CPU tensor"),
], ids=["q 0-dim", "h_q 0", "s_q 0", "lengths on meta"])
def test_dense_refusals_name_the_argument_before_the_plan_is_made(bad, message):
    # The plan is made from q's and k_cache's sizes: they are checked first, in the
    # Feb-2025 API's words, not as the plan's arguments.
    d = make_decode_inputs(2, 1, 8, h_kv=1, d=576, dtype=torch.bfloat16, seqlens=[5, 70], seed=1)
    args = dict(q=d.q, k_cache=d.k_cache, block_table=d.block_table, cache_seqlens=d.cache_seqlens)
    args.update(bad(d))
    plan, _ = get_mla_metadata()
    with pytest.raises(ValueError, match=message):
        flash_mla_with_kvcache(args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"], 512, plan)
    assert not plan.have_initialized


def test_dense_refuses_sparse_arguments():
    d = make_decode_inputs(1, 1, 8, h_kv=1, d=576, dtype=torch.bfloat16, seqlens=[5], seed=1)
    plan, _ = get_mla_metadata()
    with pytest.raises(ValueError, match="attn_sink must be None without indices"):
        flash_mla_with_kvcache(d.q, d.k_cache, d.block_table, d.cache_seqlens, 512, plan,
                               attn_sink=torch.zeros(8))
    with pytest.raises(ValueError, match="is_fp8_kvcache must be False without indices"):
        flash_mla_with_kvcache(d.q, d.k_cache, d.block_table, d.cache_seqlens, 512, plan, is_fp8_kvcache=True)
    with pytest.raises(TypeError, match="block_table must be a torch.Tensor for dense decoding"):
        flash_mla_with_kvcache(d.q, d.k_cache, None, d.cache_seqlens, 512, plan)
    assert not plan.have_initialized


def test_fewer_heads_are_the_reference():
    inp = make_sparse_decode_inputs(2, 1, 5, 100, 64, 8, seed=12, with_sink=True)
    out, lse = sparse_call(inp)
    assert out.shape == (2, 1, 5, 512) and lse.shape == (2, 5, 1)
    assert not math.isnan(float(out.float().sum()))


def test_api_module_exports():
    assert set(api.__all__) == {"FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache"}
