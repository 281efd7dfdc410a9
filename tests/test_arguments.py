"""Argument checking: every bad argument raises TypeError (wrong type or dtype) or
ValueError (bad value, shape, layout or device) naming the argument; good CPU inputs
run through the float32 reference. These calls use CPU tensors, which go through the
same checks as CUDA tensors: everything refused here is refused on the GPU with the
same message (``test_fast_path_gpu.py`` holds the GPU to that)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import flashmla_cute
from flashmla_cute import checks, runtime, scheduler
from flashmla_cute.reference import flash_mla_reference
from flashmla_cute.testing import assert_equal_up_to_rounding, make_decode_inputs

B, S_Q, H_Q, H_KV, D, DV = 3, 2, 16, 1, 576, 512
SEQLENS = [0, 70, 130]


def good_args(dtype=torch.bfloat16):
    inp = make_decode_inputs(B, S_Q, H_Q, h_kv=H_KV, d=D, dtype=dtype, seqlens=SEQLENS, seed=0)
    meta, num_splits = flashmla_cute.get_mla_metadata(inp.cache_seqlens, S_Q * H_Q // H_KV, H_KV)
    return dict(
        q=inp.q,
        k_cache=inp.k_cache,
        block_table=inp.block_table,
        cache_seqlens=inp.cache_seqlens,
        head_dim_v=DV,
        tile_scheduler_metadata=meta,
        num_splits=num_splits,
        softmax_scale=None,
        causal=True,
    )


def strided(x, step=2):
    """A copy of ``x`` whose last dimension has stride ``step``."""
    wide = torch.zeros(*x.shape[:-1], x.shape[-1] * step, dtype=x.dtype, device=x.device)
    view = wide[..., ::step]
    view.copy_(x)
    return view


def every_other(x):
    """A copy of 1-D ``x`` with stride 2."""
    wide = torch.zeros(2 * x.shape[0], dtype=x.dtype, device=x.device)
    wide[::2] = x
    return wide[::2]


def misaligned(x):
    """A copy of ``x`` whose data pointer is 2 bytes past a 16-byte boundary."""
    flat = torch.zeros(x.numel() + 8, dtype=x.dtype, device=x.device)
    offset = next(k for k in range(1, 8) if (flat.data_ptr() + k * x.element_size()) % 16 == 2)
    view = flat[offset:offset + x.numel()].view(x.shape)
    view.copy_(x)
    assert view.data_ptr() % 16 != 0
    return view


def padded_rows(x, pad=4):
    """A copy of ``x`` whose rows are ``pad`` elements apart from the next (stride not a
    multiple of 8)."""
    wide = torch.zeros(*x.shape[:-1], x.shape[-1] + pad, dtype=x.dtype, device=x.device)
    view = wide[..., : x.shape[-1]]
    view.copy_(x)
    return view


def setter(name, fn):
    def mutate(a):
        a[name] = fn(a[name])

    return mutate


def plan_for_first_two(a):
    """The plan of another batch: the first two of the three sequences."""
    first_two = a["cache_seqlens"][:2].contiguous()
    a["tile_scheduler_metadata"], a["num_splits"] = flashmla_cute.get_mla_metadata(first_two, S_Q * H_Q // H_KV, H_KV)


BAD = {
    # name: (mutation, exception, text the message must contain)
    "q_list": (setter("q", lambda x: x.tolist()), TypeError, "q must be a torch.Tensor"),
    "k_cache_numpy": (setter("k_cache", lambda x: x.float().cpu().numpy()), TypeError, "k_cache must be a torch.Tensor"),
    "block_table_numpy": (setter("block_table", lambda x: x.cpu().numpy()), TypeError, "block_table must be a torch.Tensor"),
    "cache_seqlens_list": (setter("cache_seqlens", lambda x: x.tolist()), TypeError, "cache_seqlens must be a torch.Tensor"),
    "metadata_none": (setter("tile_scheduler_metadata", lambda x: None), TypeError, "tile_scheduler_metadata must be a torch.Tensor"),
    "num_splits_none": (setter("num_splits", lambda x: None), TypeError, "num_splits must be a torch.Tensor"),
    "q_sparse": (setter("q", lambda x: x.to_sparse()), ValueError, "q must be a strided (dense) tensor, got layout torch.sparse_coo"),
    "block_table_sparse": (setter("block_table", lambda x: x.to_sparse()), ValueError, "block_table must be a strided (dense) tensor, got layout torch.sparse_coo"),
    "q_float32": (setter("q", lambda x: x.float()), TypeError, "q must have dtype torch.bfloat16 or torch.float16, got torch.float32"),
    "q_int": (setter("q", lambda x: x.to(torch.int32)), TypeError, "q must have dtype"),
    "k_cache_other_dtype": (setter("k_cache", lambda x: x.half()), TypeError, "k_cache must have q's dtype torch.bfloat16, got torch.float16"),
    "q_rank3": (setter("q", lambda x: x[:, 0]), ValueError, "q must have 4 dimensions"),
    "k_cache_rank5": (setter("k_cache", lambda x: x[None]), ValueError, "k_cache must have 4 dimensions"),
    "q_batch0": (setter("q", lambda x: x[:0]), ValueError, "q.shape[0]"),
    "q_s_q0": (setter("q", lambda x: x[:, :0]), ValueError, "q.shape[1] (s_q"),
    "q_s_q_above_max": (setter("q", lambda x: x[:, :1].expand(-1, checks.MAX_S_Q + 1, -1, -1).contiguous()),
                        ValueError, f"q.shape[1] (s_q, query tokens per sequence) must be in [1, {checks.MAX_S_Q}], got {checks.MAX_S_Q + 1}"),
    "q_d_512": (setter("q", lambda x: x[..., :512].contiguous()), ValueError, "q.shape[3] (d) must be 576, got 512"),
    "q_h_q0": (setter("q", lambda x: x[:, :, :0]), ValueError, "q.shape[2] (h_q)"),
    "page_size_32": (setter("k_cache", lambda x: x[:, :32]), ValueError, "k_cache.shape[1] (page block size) must be 64"),
    "h_kv0": (setter("k_cache", lambda x: x[:, :, :0]), ValueError, "k_cache.shape[2] (h_kv)"),
    "d_mismatch": (setter("k_cache", lambda x: x[..., :512].contiguous()), ValueError, "k_cache.shape[3] must equal q.shape[3] (d = 576), got 512"),
    "h_q_not_multiple": (setter("k_cache", lambda x: x.expand(-1, -1, 3, -1).contiguous()), ValueError, "must be a multiple of k_cache.shape[2]"),
    "q_strided_last_dim": (setter("q", strided), ValueError, "q must have a contiguous last dimension"),
    "k_cache_strided_last_dim": (setter("k_cache", strided), ValueError, "k_cache must have a contiguous last dimension"),
    "head_dim_v_float": (setter("head_dim_v", float), TypeError, "head_dim_v must be an int"),
    "head_dim_v_bool": (setter("head_dim_v", lambda x: True), TypeError, "head_dim_v must be an int"),
    "head_dim_v_tensor": (setter("head_dim_v", torch.tensor), TypeError, "head_dim_v must be an int"),
    "head_dim_v_0": (setter("head_dim_v", lambda x: 0), ValueError, "head_dim_v must be >= 1"),
    "head_dim_v_above_d": (setter("head_dim_v", lambda x: D + 1), ValueError, "head_dim_v must be 512 with d = 576, got 577"),
    "head_dim_v_256": (setter("head_dim_v", lambda x: 256), ValueError, "head_dim_v must be 512 with d = 576, got 256"),
    "head_dim_v_448": (setter("head_dim_v", lambda x: 448), ValueError, "head_dim_v must be 512 with d = 576, got 448"),
    "block_table_int64": (setter("block_table", lambda x: x.long()), TypeError, "block_table must have dtype torch.int32"),
    "block_table_uint32": (setter("block_table", lambda x: x.to(torch.uint32)), TypeError, "block_table must have dtype torch.int32, got torch.uint32"),
    "block_table_rank1": (setter("block_table", lambda x: x[:, 0].contiguous()), ValueError, "block_table must have 2 dimensions"),
    "block_table_rows": (setter("block_table", lambda x: torch.cat([x, x[:1]])), ValueError, "block_table.shape[0] must equal the batch size b = 3"),
    # Rows that share one storage of 2**25 entries (128 MiB, never written)
    "block_table_too_wide": (setter("block_table", lambda x: torch.empty(2**25, dtype=x.dtype, device=x.device).expand(x.shape[0], -1)),
                             ValueError, "block_table.shape[1] must be at most 33554431 (the pages of the longest int32 length), got 33554432"),
    "block_table_strided": (setter("block_table", strided), ValueError, "block_table must have a contiguous last dimension"),
    "cache_seqlens_int64": (setter("cache_seqlens", lambda x: x.long()), TypeError, "cache_seqlens must have dtype torch.int32, got torch.int64"),
    "cache_seqlens_uint32": (setter("cache_seqlens", lambda x: x.to(torch.uint32)), TypeError, "cache_seqlens must have dtype torch.int32, got torch.uint32"),
    "cache_seqlens_rank2": (setter("cache_seqlens", lambda x: x[:, None]), ValueError, "cache_seqlens must have 1 dimension"),
    "cache_seqlens_length": (setter("cache_seqlens", lambda x: x[:2]), ValueError, "cache_seqlens.shape[0] must equal the batch size b = 3"),
    "cache_seqlens_strided": (setter("cache_seqlens", every_other), ValueError, "cache_seqlens must be contiguous"),
    "metadata_int64": (setter("tile_scheduler_metadata", lambda x: x.long()), TypeError, "tile_scheduler_metadata must have dtype torch.int32"),
    "metadata_uint32": (setter("tile_scheduler_metadata", lambda x: x.to(torch.uint32)), TypeError, "tile_scheduler_metadata must have dtype torch.int32"),
    "metadata_rank1": (setter("tile_scheduler_metadata", lambda x: x.flatten()), ValueError, "tile_scheduler_metadata must have 2 dimensions"),
    "metadata_width": (setter("tile_scheduler_metadata", lambda x: x[:, :7].contiguous()), ValueError, "tile_scheduler_metadata must have shape [num_sm_parts >= 1, 8]"),
    "metadata_no_parts": (setter("tile_scheduler_metadata", lambda x: x[:0]), ValueError, "tile_scheduler_metadata must have shape"),
    "metadata_transposed": (setter("tile_scheduler_metadata", lambda x: x.t().contiguous().t()), ValueError, "tile_scheduler_metadata must be contiguous"),
    "num_splits_int64": (setter("num_splits", lambda x: x.long()), TypeError, "num_splits must have dtype torch.int32"),
    "num_splits_uint32": (setter("num_splits", lambda x: x.to(torch.uint32)), TypeError, "num_splits must have dtype torch.int32"),
    "num_splits_length": (setter("num_splits", lambda x: x[:-1]), ValueError, "num_splits must have shape [b + 1] = [4]"),
    "num_splits_rank2": (setter("num_splits", lambda x: x[None]), ValueError, "num_splits must have shape [b + 1]"),
    "num_splits_strided": (setter("num_splits", every_other), ValueError, "num_splits must be contiguous"),
    "plan_for_other_batch_size": (plan_for_first_two, ValueError, "num_splits must have shape [b + 1] = [4] (as returned by get_mla_metadata), got (3,)"),
    "scale_string": (setter("softmax_scale", lambda x: "0.1"), TypeError, "softmax_scale must be a float or None"),
    "scale_bool": (setter("softmax_scale", lambda x: True), TypeError, "softmax_scale must be a float or None"),
    "scale_tensor": (setter("softmax_scale", lambda x: torch.tensor(0.1)), TypeError, "softmax_scale must be a float or None"),
    "scale_zero": (setter("softmax_scale", lambda x: 0.0), ValueError, "softmax_scale must be a finite positive float"),
    "scale_negative": (setter("softmax_scale", lambda x: -0.1), ValueError, "softmax_scale must be a finite positive float"),
    "scale_nan": (setter("softmax_scale", lambda x: math.nan), ValueError, "softmax_scale must be a finite positive float"),
    "scale_inf": (setter("softmax_scale", lambda x: math.inf), ValueError, "softmax_scale must be a finite positive float"),
    "scale_below_float32": (setter("softmax_scale", lambda x: 1e-40), ValueError,
                            "softmax_scale must be within float32's normal range [1.175494e-38, 3.402823e+38], got 1e-40"),
    "scale_above_float32": (setter("softmax_scale", lambda x: 1e39), ValueError,
                            "softmax_scale must be within float32's normal range"),
    "scale_past_float": (setter("softmax_scale", lambda x: 10**400), ValueError,
                         "softmax_scale must be a finite positive float, got an int of 401 digits"),
    "causal_int": (setter("causal", lambda x: 1), TypeError, "causal must be a bool"),
    "causal_none": (setter("causal", lambda x: None), TypeError, "causal must be a bool"),
    "causal_numpy_bool": (setter("causal", lambda x: np.bool_(x)), TypeError, "causal must be a bool, got numpy.bool"),
    "k_cache_other_device": (setter("k_cache", lambda x: x.to("meta")), ValueError, "k_cache must be on q's device"),
    "block_table_other_device": (setter("block_table", lambda x: x.to("meta")), ValueError, "block_table must be on q's device"),
    "cache_seqlens_other_device": (setter("cache_seqlens", lambda x: x.to("meta")), ValueError, "cache_seqlens must be on q's device"),
    "metadata_other_device": (setter("tile_scheduler_metadata", lambda x: x.to("meta")), ValueError, "tile_scheduler_metadata must be on q's device"),
    "num_splits_other_device": (setter("num_splits", lambda x: x.to("meta")), ValueError, "num_splits must be on q's device"),
    # What the kernel's TMA loads need.
    "k_cache_no_pages": (setter("k_cache", lambda x: x[:0]), ValueError, "k_cache must hold at least one page"),
    "q_padded_rows": (setter("q", padded_rows), ValueError, "q strides must be multiples of 8 elements"),
    "k_cache_padded_rows": (setter("k_cache", padded_rows), ValueError, "k_cache strides must be multiples of 8 elements"),
    # A size-1 dimension's stride too (k_cache's one KV head here).
    "k_cache_odd_head_stride": (setter("k_cache", lambda x: x.as_strided(x.shape, (*x.stride()[:2], 5, 1))), ValueError,
                                "k_cache strides must be multiples of 8 elements"),
    # q's heads a slice of wider rows: the kernel sees a copy of q's rows (s_q 2), yet q is refused.
    "q_heads_of_wider_rows": (setter("q", lambda x: padded_rows(torch.cat([x, x[:, :, :1]], dim=2))[:, :, :-1]),
                              ValueError, "q strides must be multiples of 8 elements"),
    "q_misaligned": (setter("q", misaligned), ValueError, "q data pointer must be 16-byte aligned"),
    "k_cache_misaligned": (setter("k_cache", misaligned), ValueError, "k_cache data pointer must be 16-byte aligned"),
    "fp16_q_bf16_cache": (setter("q", lambda x: x.half()), TypeError, "k_cache must have q's dtype torch.float16, got torch.bfloat16"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_decode_argument(case):
    mutate, error, text = BAD[case]
    args = good_args()
    mutate(args)
    with pytest.raises(error) as info:
        flashmla_cute.flash_mla_with_kvcache(**args)
    assert type(info.value) is error
    assert text in str(info.value), str(info.value)


def test_bad_arguments_by_position():
    args = good_args()
    positional = [args[k] for k in ("q", "k_cache", "block_table", "cache_seqlens", "head_dim_v",
                                    "tile_scheduler_metadata", "num_splits")]
    positional[4] = "512"
    with pytest.raises(TypeError, match="head_dim_v"):
        flashmla_cute.flash_mla_with_kvcache(*positional)


BAD_METADATA = {
    "seqlens_list": (lambda s: ([1, 2], 16, 1), TypeError, "cache_seqlens must be a torch.Tensor"),
    "seqlens_sparse": (lambda s: (s.to_sparse(), 16, 1), ValueError, "cache_seqlens must be a strided (dense) tensor, got layout torch.sparse_coo"),
    "seqlens_int64": (lambda s: (s.long(), 16, 1), TypeError, "cache_seqlens must have dtype torch.int32, got torch.int64"),
    "seqlens_uint32": (lambda s: (s.to(torch.uint32), 16, 1), TypeError, "cache_seqlens must have dtype torch.int32, got torch.uint32"),
    "seqlens_float": (lambda s: (s.float(), 16, 1), TypeError, "cache_seqlens must have dtype torch.int32"),
    "seqlens_rank2": (lambda s: (s[None], 16, 1), ValueError, "cache_seqlens must have 1 dimension"),
    "seqlens_empty": (lambda s: (s[:0], 16, 1), ValueError, "cache_seqlens must hold at least one sequence"),
    "seqlens_strided": (lambda s: (every_other(s), 16, 1), ValueError, "cache_seqlens must be contiguous"),
    "heads_per_k_zero": (lambda s: (s, 0, 1), ValueError, "num_heads_per_head_k must be >= 1, got 0"),
    "heads_per_k_float": (lambda s: (s, 16.0, 1), TypeError, "num_heads_per_head_k must be an int"),
    "heads_per_k_bool": (lambda s: (s, True, 1), TypeError, "num_heads_per_head_k must be an int"),
    "heads_k_zero": (lambda s: (s, 16, 0), ValueError, "num_heads_k must be >= 1"),
    "heads_k_none": (lambda s: (s, 16, None), TypeError, "num_heads_k must be an int"),
}

BAD_METADATA_ON_HOST = {
    # Refused only for CPU tensors: on CUDA, reading the values would need a host sync.
    "seqlens_negative": (lambda s: (torch.tensor([5, -3, 0], dtype=s.dtype, device=s.device), 16, 1), ValueError,
                         "cache_seqlens must be >= 0, got cache_seqlens[1] = -3"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA) + sorted(BAD_METADATA_ON_HOST))
def test_bad_metadata_argument(case):
    make, error, text = {**BAD_METADATA, **BAD_METADATA_ON_HOST}[case]
    seqlens = torch.tensor([5, 100, 0], dtype=torch.int32)
    with pytest.raises(error) as info:
        flashmla_cute.get_mla_metadata(*make(seqlens))
    assert type(info.value) is error
    assert text in str(info.value), str(info.value)


def test_numpy_ints_are_accepted():
    seqlens = torch.tensor([5, 100], dtype=torch.int32)
    meta, _ = flashmla_cute.get_mla_metadata(seqlens, np.int64(16), np.int32(1))
    assert meta.shape == (132, 8)


# ---------------------------------------------------------------- the kernel's layout
# check_kernel_layout looks only at metadata; check_decode_args runs it on every device.


def kernel_inputs():
    inp = make_decode_inputs(2, 1, 16, seqlens=[10, 100], seed=1)
    return inp.q, inp.k_cache


def test_kernel_layout_accepts_good_inputs():
    checks.check_kernel_layout(*kernel_inputs())


@pytest.mark.parametrize("name", ["q", "k_cache"])
@pytest.mark.parametrize("spoil,text", [(padded_rows, "strides must be multiples of 8 elements"),
                                        (misaligned, "data pointer must be 16-byte aligned")])
def test_kernel_layout_names_the_tensor(name, spoil, text):
    tensors = dict(zip(("q", "k_cache"), kernel_inputs()))
    tensors[name] = spoil(tensors[name])
    with pytest.raises(ValueError, match=f"{name} {text}"):
        checks.check_kernel_layout(tensors["q"], tensors["k_cache"])


def test_negative_length_is_refused_on_the_cpu():
    args = good_args()
    args["cache_seqlens"] = torch.tensor([0, -1, 130], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cache_seqlens must be >= 0, got cache_seqlens\[1\] = -1"):
        flashmla_cute.flash_mla_with_kvcache(**args)


def test_non_hopper_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(runtime, "device_capability", lambda index: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake A100")
    with pytest.raises(RuntimeError, match=r"Hopper GPU \(compute capability 9.0, sm_90\).*Fake A100.*8\.0"):
        runtime.require_hopper(torch.device("cuda", 0))


# ---------------------------------------------------------------- good inputs


def test_checks_read_no_tensor_values():
    # Tensors on the meta device have no data: any read (.item(), .tolist()) would fail.
    args = good_args()
    for key, value in args.items():
        if isinstance(value, torch.Tensor):
            args[key] = value.to("meta")
    problem = checks.check_decode_args(**args)
    assert problem.b == B


def test_calls_on_the_meta_device_are_refused():
    # The checks take meta tensors (above); a call, which computes, refuses them.
    args = good_args()
    for key, value in args.items():
        if isinstance(value, torch.Tensor):
            args[key] = value.to("meta")
    with pytest.raises(ValueError, match=r"q must be a CUDA \(sm_90\) or CPU tensor, got device meta"):
        flashmla_cute.flash_mla_with_kvcache(**args)
    with pytest.raises(ValueError, match=r"cache_seqlens must be a CUDA \(sm_90\) or CPU tensor, got device meta"):
        flashmla_cute.get_mla_metadata(args["cache_seqlens"], S_Q * H_Q // H_KV, H_KV)


def meta_decode_args(b: int, s_q: int, h_q: int, num_parts: int) -> dict:
    """A dense call's arguments for ``b`` sequences on the meta device (no memory): one
    cache page, a plan of ``num_parts`` parts."""
    def empty(*shape, dtype=torch.int32):
        return torch.empty(shape, dtype=dtype, device="meta")

    return dict(q=empty(b, s_q, h_q, D, dtype=torch.bfloat16), k_cache=empty(1, 64, 1, D, dtype=torch.bfloat16),
                block_table=empty(b, 1), cache_seqlens=empty(b), head_dim_v=DV,
                tile_scheduler_metadata=empty(num_parts, scheduler.METADATA_INTS), num_splits=empty(b + 1))


def test_split_workspace_past_32_bit_indices_is_refused():
    # s_q 4 x h_q 128 rows of 512 values: 2**18 partial values a workspace row, and
    # b + num_parts rows; the kernels index at most 2**31 - 1 values, 8191 rows.
    s_q, h_q, num_parts = 4, 128, 16
    checks.check_decode_args(**meta_decode_args(8191 - num_parts, s_q, h_q, num_parts))
    with pytest.raises(ValueError, match=r"split-KV workspace for b=8176, 16 SM parts and s_q \* h_q = 512 would "
                                         r"hold 2147483648 values, more than the kernels index \(2\*\*31 - 1\): "
                                         r"split the batch"):
        checks.check_decode_args(**meta_decode_args(8192 - num_parts, s_q, h_q, num_parts))


def test_decode_problem_fields():
    args = good_args()
    args["softmax_scale"] = 0.25
    p = checks.check_decode_args(**args)
    num_parts = args["tile_scheduler_metadata"].shape[0]
    assert p == checks.DecodeProblem(
        b=B, s_q=S_Q, h_q=H_Q, h_kv=H_KV, d=D, dv=DV, num_blocks=args["k_cache"].shape[0],
        max_blocks=args["block_table"].shape[1], heads_per_kv=H_Q // H_KV, rows_per_kv=S_Q * H_Q // H_KV,
        num_parts=num_parts, softmax_scale=0.25, causal=True,
    )
    with pytest.raises(AttributeError):
        p.b = 5


def test_default_scale_and_causal_with_one_token():
    inp = make_decode_inputs(2, 1, 8, h_kv=2, seqlens=[3, 70], seed=2)
    meta, num_splits = flashmla_cute.get_mla_metadata(inp.cache_seqlens, 4, 2)
    p = checks.check_decode_args(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512, meta, num_splits,
                                 None, True)
    assert p.softmax_scale == 576 ** -0.5
    assert p.causal is False  # no effect with s_q == 1
    assert (p.heads_per_kv, p.rows_per_kv) == (4, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_call_is_the_reference(dtype, causal):
    args = good_args(dtype=dtype)
    args["causal"] = causal
    args["softmax_scale"] = 0.2
    out, lse = flashmla_cute.flash_mla_with_kvcache(**args)
    ref_out, ref_lse = flash_mla_reference(
        args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"], DV, softmax_scale=0.2, causal=causal
    )
    assert out.dtype == dtype and out.shape == (B, S_Q, H_Q, DV)
    assert lse.dtype == torch.float32 and lse.shape == (B, H_Q, S_Q)
    assert_equal_up_to_rounding(out, ref_out)
    assert_equal_up_to_rounding(lse, ref_lse)
    assert (out[0] == 0).all() and torch.isposinf(lse[0]).all()  # the empty sequence
    assert not torch.isnan(out).any()


def test_cpu_call_takes_empty_sequences_with_a_block_table_of_width_0():
    # As on the GPU (test_decode_gpu.py): nothing to read, FlashMLA's empty sequence.
    inp = make_decode_inputs(3, 1, 16, seqlens=[0, 0, 0], seed=5)
    meta, num_splits = flashmla_cute.get_mla_metadata(inp.cache_seqlens, 16, 1)
    out, lse = flashmla_cute.flash_mla_with_kvcache(
        inp.q, inp.k_cache, inp.block_table[:, :0], inp.cache_seqlens, 512, meta, num_splits
    )
    assert (out == 0).all() and torch.isposinf(lse).all()


def test_full_size_cpu_call_accepts_integer_scale():
    inp = make_decode_inputs(2, 2, 16, seqlens=[1, 200], seed=3)
    meta, num_splits = flashmla_cute.get_mla_metadata(inp.cache_seqlens, 32, 1)
    out, lse = flashmla_cute.flash_mla_with_kvcache(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512, meta, num_splits, 1, True
    )
    assert out.shape == (2, 2, 16, 512) and torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("s_q,h_q,h_kv", [(1, 16, 1), (2, 64, 1), (1, 128, 1), (2, 128, 1), (2, 32, 4)])
def test_cpu_metadata(s_q, h_q, h_kv):
    seqlens = torch.tensor([0, 1, 64, 5000, 300], dtype=torch.int32)
    hpk = s_q * h_q // h_kv
    meta, num_splits = flashmla_cute.get_mla_metadata(seqlens, hpk, h_kv)
    parts = scheduler.num_sm_parts(scheduler.DEFAULT_NUM_SMS, hpk, h_kv)
    assert meta.dtype == torch.int32 and meta.shape == (parts, scheduler.METADATA_INTS)
    assert num_splits.dtype == torch.int32 and num_splits.shape == (seqlens.numel() + 1,)
    assert meta.device == seqlens.device and num_splits.device == seqlens.device
    ref_meta, ref_splits = scheduler.plan_torch(seqlens, parts)
    assert torch.equal(meta, ref_meta) and torch.equal(num_splits, ref_splits)


def test_public_names():
    assert set(flashmla_cute.__all__) >= {"get_mla_metadata", "flash_mla_with_kvcache"}


def test_import_and_cpu_calls_stay_light():
    # Neither importing the package nor a CPU call loads CUTLASS (the runtime module is
    # plain Python and is imported with the package, so that GPU calls need no import).
    code = (
        "import sys, torch\n"
        "before = {m for m in sys.modules if m.startswith('cutlass')}\n"
        "import flashmla_cute\n"
        "from flashmla_cute.testing import make_decode_inputs\n"
        "inp = make_decode_inputs(2, 1, 4, seqlens=[3, 90], seed=0)\n"
        "meta, ns = flashmla_cute.get_mla_metadata(inp.cache_seqlens, 4, 1)\n"
        "flashmla_cute.flash_mla_with_kvcache(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512, meta, ns)\n"
        "new = {m for m in sys.modules if m.startswith('cutlass')} - before\n"
        "assert not new, sorted(new)\n"
    )
    package_root = str(Path(flashmla_cute.__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
