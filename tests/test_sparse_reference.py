"""The sparse-decoding reference against a float64 computation written out row by row
(both FP8 layouts), and FlashMLA's conventions: invalid indices (-1, out of range, past
topk_length) are never read, rows without a valid index give out 0 and lse +inf, and the
attention sink scales out by exp(lse) / (exp(lse) + exp(sink)) without changing lse.
An extra cache is attended to in the same softmax as the main one: the same result as one
cache holding both caches' tokens."""

import math

import pytest
import torch

from flashmla_cute import fp8_cache
from flashmla_cute.fp8_cache import MODEL1, V32
from flashmla_cute.sparse_reference import sparse_mla_reference
from flashmla_cute.sparse_testing import make_sparse_decode_inputs, page_bytes
from flashmla_cute.testing import assert_equal_up_to_rounding

LAYOUTS = pytest.mark.parametrize("layout", [V32, MODEL1], ids=lambda layout: layout.name)


def dequantized(cache):
    """The bfloat16 keys ``[num_blocks, page_size, 1, d]`` of an FP8 cache of either layout."""
    if fp8_cache.layout_of(cache) is V32:
        return fp8_cache.dequantize_v32_kv_cache(cache)
    return fp8_cache.dequantize_model1_kv_cache(cache)


def extra_args(inp):
    """The extra-cache keyword arguments of the reference for ``inp``."""
    return dict(extra_k_cache=inp.extra_k_cache, extra_indices=inp.extra_indices,
                extra_topk_length=inp.extra_topk_length)


def rowwise(q, keys, indices, topk_length, attn_sink, scale, dv=512):
    """One (batch, query token, head) row at a time in float64; ``keys`` is the
    dequantized cache ``[num_blocks, page, 1, d]``."""
    b, s_q, h_q, d = q.shape
    flat = keys.reshape(-1, d).double()
    out = torch.zeros(b, s_q, h_q, dv, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        for j in range(s_q):
            used = [int(t) for k, t in enumerate(indices[i, j].tolist())
                    if 0 <= t < flat.shape[0] and (topk_length is None or k < int(topk_length[i]))]
            if not used:
                continue
            rows = flat[used]
            for h in range(h_q):
                scores = rows @ q[i, j, h].double() * scale
                row_lse = torch.logsumexp(scores, 0)
                o = torch.exp(scores - row_lse) @ rows[:, :dv]
                if attn_sink is not None:
                    o = o * (1.0 / (1.0 + math.exp(float(attn_sink[h]) - float(row_lse))))
                out[i, j, h] = o
                lse[i, h, j] = row_lse
    return out, lse


def model1_keys_by_hand(cache):
    """Every token's key ``[num_blocks * page_size, 512]`` (float64) of a MODEL1 cache, read
    from its page's bytes one token at a time: its 576-byte row (448 fp8 values, then 64
    bf16) at ``slot * 576``, its 8-byte scale row at ``page_size * 576 + slot * 8``, value j
    of the row times ``2 ** (scale byte j // 64 - 127)``."""
    page_size = cache.shape[1]
    row_bytes, scale_row_bytes = fp8_cache.MODEL1_ROW_BYTES, fp8_cache.MODEL1_SCALE_ROW_BYTES
    latent_dim, group_size = fp8_cache.MODEL1_LATENT_DIM, fp8_cache.MODEL1_GROUP_SIZE
    keys = []
    for page in page_bytes(cache):
        for slot in range(page_size):
            row = page[slot * row_bytes : (slot + 1) * row_bytes].clone()
            scale_at = page_size * row_bytes + slot * scale_row_bytes
            scale_row = page[scale_at : scale_at + scale_row_bytes].tolist()
            scales = [2.0 ** (scale_row[j // group_size] - fp8_cache.UE8M0_BIAS) for j in range(latent_dim)]
            latent = row[:latent_dim].view(torch.float8_e4m3fn).double() * torch.tensor(scales, dtype=torch.float64)
            keys.append(torch.cat([latent, row[latent_dim:].view(torch.bfloat16).double()]))
    return torch.stack(keys)


def check(inp, out, lse, keys):
    """``(out, lse)`` of the reference against ``rowwise`` over ``keys``."""
    exp_out, exp_lse = rowwise(inp.q, keys, inp.indices, inp.topk_length, inp.attn_sink, inp.softmax_scale)
    b, s_q, h_q, _ = inp.q.shape
    assert out.shape == (b, s_q, h_q, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), exp_out, rtol=2**-8, atol=1e-5)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(exp_lse))
    torch.testing.assert_close(lse.double(), exp_lse, rtol=1e-5, atol=1e-5)


def valid_or_minus_one(indices, topk_length, num_tokens):
    """``indices`` with every invalid entry (out of range, past ``topk_length``) set to -1."""
    valid = (indices >= 0) & (indices < num_tokens)
    if topk_length is not None:
        valid &= torch.arange(indices.shape[-1]) < topk_length[:, None, None]
    return torch.where(valid, indices, torch.full_like(indices, -1))


def one_cache_of_both(inp):
    """``(keys, indices)``: one cache of float keys, a token a page, holding the main
    cache's tokens then the extra cache's, and each query token's valid entries of both
    side by side (invalid ones -1), so that no topk_length is needed."""
    main_keys = dequantized(inp.k_cache).flatten(0, 1)  # [tokens, 1, d]
    extra_keys = dequantized(inp.extra_k_cache).flatten(0, 1)
    main = valid_or_minus_one(inp.indices, inp.topk_length, len(main_keys))
    extra = valid_or_minus_one(inp.extra_indices, inp.extra_topk_length, len(extra_keys))
    extra = torch.where(extra >= 0, extra + len(main_keys), extra)
    return torch.cat([main_keys, extra_keys])[:, None], torch.cat([main, extra], dim=-1)


# ---------------------------------------------------------------- one cache


@LAYOUTS
@pytest.mark.parametrize("s_q", [1, 3])
@pytest.mark.parametrize("topk,page", [(64, 2), (128, 61), (192, 64)])
@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("with_topk_length", [False, True])
def test_matches_rowwise_float64(layout, s_q, topk, page, with_sink, with_topk_length):
    inp = make_sparse_decode_inputs(3, s_q, 4, 150, topk, page, seed=topk + page + s_q, layout=layout,
                                    with_sink=with_sink, with_topk_length=with_topk_length, zero_lengths=True)
    out, lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, inp.topk_length, inp.attn_sink,
                                    inp.softmax_scale)
    check(inp, out, lse, dequantized(inp.k_cache))


@pytest.mark.parametrize("page", [1, 3, 64])
def test_model1_matches_a_naive_loop_over_the_cache_bytes(page):
    """A tiny MODEL1 case, keys read from the page bytes by hand rather than dequantized."""
    inp = make_sparse_decode_inputs(2, 2, 3, 40, 64, page, seed=page, layout=MODEL1, with_sink=True,
                                    with_topk_length=True)
    out, lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, inp.topk_length, inp.attn_sink,
                                    inp.softmax_scale)
    check(inp, out, lse, model1_keys_by_hand(inp.k_cache))


@LAYOUTS
def test_dequantized_cache_gives_the_same_result(layout):
    inp = make_sparse_decode_inputs(2, 2, 8, 100, 64, 16, seed=7, layout=layout, with_sink=True)
    from_fp8 = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, attn_sink=inp.attn_sink)
    from_bf16 = sparse_mla_reference(inp.q, dequantized(inp.k_cache), inp.indices, attn_sink=inp.attn_sink)
    assert_equal_up_to_rounding(from_fp8[0], from_bf16[0])
    assert_equal_up_to_rounding(from_fp8[1], from_bf16[1])


def test_every_index_invalid_gives_zero_and_posinf():
    inp = make_sparse_decode_inputs(2, 3, 4, 100, 64, 8, seed=1, all_invalid=True, with_sink=True)
    out, lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, attn_sink=inp.attn_sink)
    assert bool((out == 0).all()) and bool(torch.isposinf(lse).all())


@LAYOUTS
def test_out_of_range_and_negative_indices_are_invalid(layout):
    inp = make_sparse_decode_inputs(1, 1, 4, 64, 64, 8, seed=2, layout=layout, varlen=False)
    num_tokens = inp.k_cache.shape[0] * inp.k_cache.shape[1]
    bad = inp.indices.clone()
    bad[..., 10:20] = -1
    bad[..., 20:30] = -123456
    bad[..., 30:40] = num_tokens
    bad[..., 40:50] = 2**31 - 1
    keep = torch.cat([bad[..., :10], bad[..., 50:]], dim=-1)
    out_bad, lse_bad = sparse_mla_reference(inp.q, inp.k_cache, bad)
    out_keep, lse_keep = sparse_mla_reference(inp.q, inp.k_cache, keep)
    assert_equal_up_to_rounding(out_bad, out_keep)
    assert_equal_up_to_rounding(lse_bad, lse_keep)


def test_topk_length_uses_the_first_entries_only():
    inp = make_sparse_decode_inputs(3, 2, 4, 300, 128, 32, seed=3, varlen=False)
    lengths = torch.tensor([0, 50, 128], dtype=torch.int32)
    out, lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, topk_length=lengths)
    assert bool((out[0] == 0).all()) and bool(torch.isposinf(lse[0]).all())
    for i, n in ((1, 50), (2, 128)):
        o, l = sparse_mla_reference(inp.q[i : i + 1], inp.k_cache, inp.indices[i : i + 1, :, :n])
        # The same sums, except for float32 rounding in a longer reduction.
        torch.testing.assert_close(out[i : i + 1], o, rtol=2**-8, atol=1e-6)
        torch.testing.assert_close(lse[i : i + 1], l, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout,extra_topk", [(V32, None), (MODEL1, None), (MODEL1, 64)],
                         ids=["V3.2", "MODEL1", "MODEL1-extra"])
def test_sink_conventions(layout, extra_topk):
    """With an extra cache, the sink scales the joint result by the joint lse."""
    inp = make_sparse_decode_inputs(2, 1, 4, 100, 64, 8, seed=4, layout=layout, varlen=False, extra_topk=extra_topk)
    plain_out, plain_lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, **extra_args(inp))
    sink = torch.tensor([math.inf, -math.inf, 0.0, 3.0])
    out, lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, attn_sink=sink, **extra_args(inp))
    assert_equal_up_to_rounding(lse, plain_lse)  # the sink does not change lse
    assert bool((out[:, :, 0] == 0).all()), "+inf sink: out 0"
    assert_equal_up_to_rounding(out[:, :, 1], plain_out[:, :, 1])  # -inf sink: out unchanged
    for h in (2, 3):
        factor = torch.sigmoid(plain_lse[:, h, :] - sink[h])  # exp(lse) / (exp(lse) + exp(sink))
        expected = (plain_out[:, :, h].float() * factor[:, :, None]).to(torch.bfloat16)
        torch.testing.assert_close(out[:, :, h].float(), expected.float(), rtol=2**-7, atol=1e-6)


def test_duplicate_indices_count_twice():
    inp = make_sparse_decode_inputs(1, 1, 2, 64, 64, 8, seed=5, varlen=False)
    twice = torch.cat([inp.indices[..., :32], inp.indices[..., :32]], dim=-1)
    _, lse_once = sparse_mla_reference(inp.q, inp.k_cache, inp.indices[..., :32])
    _, lse_twice = sparse_mla_reference(inp.q, inp.k_cache, twice)
    torch.testing.assert_close(lse_twice, lse_once + math.log(2))


@LAYOUTS
def test_default_scale_is_d_to_the_minus_half(layout):
    inp = make_sparse_decode_inputs(1, 1, 2, 64, 64, 8, seed=6, layout=layout)
    default = sparse_mla_reference(inp.q, inp.k_cache, inp.indices)
    explicit = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, softmax_scale=layout.head_dim ** -0.5)
    assert_equal_up_to_rounding(default[0], explicit[0])
    assert_equal_up_to_rounding(default[1], explicit[1])


# ---------------------------------------------------------------- with an extra cache


@LAYOUTS
@pytest.mark.parametrize("extra_topk,extra_page", [(64, 2), (128, 61)])
@pytest.mark.parametrize("with_topk_length,with_extra_topk_length",
                         [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("with_sink", [False, True])
def test_extra_cache_is_one_softmax_with_the_main_cache(layout, extra_topk, extra_page, with_topk_length,
                                                        with_extra_topk_length, with_sink):
    inp = make_sparse_decode_inputs(3, 2, 4, 150, 64, 16, seed=extra_topk + extra_page, layout=layout,
                                    extra_topk=extra_topk, extra_page_size=extra_page, with_sink=with_sink,
                                    with_topk_length=with_topk_length,
                                    with_extra_topk_length=with_extra_topk_length, zero_lengths=True)
    out, lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, inp.topk_length, inp.attn_sink,
                                    inp.softmax_scale, **extra_args(inp))
    keys, joint = one_cache_of_both(inp)
    exp_out, exp_lse = sparse_mla_reference(inp.q, keys, joint, None, inp.attn_sink, inp.softmax_scale)
    torch.testing.assert_close(out.float(), exp_out.float(), rtol=2**-8, atol=1e-6)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(exp_lse))
    torch.testing.assert_close(lse, exp_lse, rtol=1e-6, atol=1e-6)


def test_extra_cache_may_be_given_as_float_keys():
    inp = make_sparse_decode_inputs(2, 2, 8, 100, 64, 16, seed=8, layout=MODEL1, extra_topk=64, extra_page_size=5,
                                    with_sink=True, with_extra_topk_length=True)
    from_fp8 = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, attn_sink=inp.attn_sink, **extra_args(inp))
    from_bf16 = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, attn_sink=inp.attn_sink,
                                     **{**extra_args(inp), "extra_k_cache": dequantized(inp.extra_k_cache)})
    assert_equal_up_to_rounding(from_fp8[0], from_bf16[0])
    assert_equal_up_to_rounding(from_fp8[1], from_bf16[1])


def test_no_valid_entry_in_either_cache_gives_zero_and_posinf():
    inp = make_sparse_decode_inputs(2, 3, 4, 100, 64, 8, seed=9, layout=MODEL1, extra_topk=64, all_invalid=True,
                                    with_sink=True)
    out, lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, attn_sink=inp.attn_sink, **extra_args(inp))
    assert bool((out == 0).all()) and bool(torch.isposinf(lse).all())


def test_rows_without_main_entries_attend_to_the_extra_cache_alone():
    inp = make_sparse_decode_inputs(2, 2, 4, 100, 64, 8, seed=10, layout=MODEL1, extra_topk=128,
                                    extra_page_size=3, with_extra_topk_length=True, with_sink=True)
    no_main = torch.full_like(inp.indices, -1)
    out, lse = sparse_mla_reference(inp.q, inp.k_cache, no_main, None, inp.attn_sink, inp.softmax_scale,
                                    **extra_args(inp))
    exp_out, exp_lse = sparse_mla_reference(inp.q, inp.extra_k_cache, inp.extra_indices, inp.extra_topk_length,
                                            inp.attn_sink, inp.softmax_scale)
    assert_equal_up_to_rounding(out, exp_out)
    assert_equal_up_to_rounding(lse, exp_lse)


def test_extra_arguments_are_checked():
    inp = make_sparse_decode_inputs(2, 1, 4, 100, 64, 8, seed=11, layout=MODEL1, extra_topk=64)
    with pytest.raises(ValueError, match="extra_k_cache and extra_indices must be given together"):
        sparse_mla_reference(inp.q, inp.k_cache, inp.indices, extra_k_cache=inp.extra_k_cache)
    with pytest.raises(ValueError, match="extra_k_cache and extra_indices must be given together"):
        sparse_mla_reference(inp.q, inp.k_cache, inp.indices, extra_indices=inp.extra_indices)
    with pytest.raises(ValueError, match="extra_topk_length needs extra_k_cache"):
        sparse_mla_reference(inp.q, inp.k_cache, inp.indices, extra_topk_length=torch.zeros(2, dtype=torch.int32))
    v32 = make_sparse_decode_inputs(2, 1, 4, 100, 64, 8, seed=11)
    with pytest.raises(ValueError, match="extra_k_cache must hold one KV head of keys of q's width 512"):
        sparse_mla_reference(inp.q, inp.k_cache, inp.indices, extra_k_cache=v32.k_cache, extra_indices=v32.indices)
    with pytest.raises(ValueError, match=r"extra_indices must be \[b=2, s_q=1, topk\]"):
        sparse_mla_reference(inp.q, inp.k_cache, inp.indices, extra_k_cache=inp.extra_k_cache,
                             extra_indices=inp.extra_indices[:1])
    with pytest.raises(ValueError, match="extra_k_cache must have shape"):
        sparse_mla_reference(inp.q, inp.k_cache, inp.indices, extra_k_cache=inp.extra_k_cache[..., :576],
                             extra_indices=inp.extra_indices)
    overlapping = inp.extra_k_cache.view(torch.uint8).as_strided(inp.extra_k_cache.shape, (584, 584, 584, 1))
    with pytest.raises(ValueError, match="extra_k_cache must be a MODEL1 cache view"):
        sparse_mla_reference(inp.q, inp.k_cache, inp.indices, extra_k_cache=overlapping,
                             extra_indices=inp.extra_indices)


def test_the_reference_refuses_what_it_cannot_read():
    inp = make_sparse_decode_inputs(2, 1, 4, 300, 64, 16, seed=1)
    args = (inp.q, inp.k_cache, inp.indices, None, None, inp.softmax_scale)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got NoneType"):
        sparse_mla_reference(None, *args[1:])
    with pytest.raises(TypeError, match="indices must have an integer dtype, got torch.float32"):
        sparse_mla_reference(inp.q, inp.k_cache, inp.indices.float(), *args[3:])
    with pytest.raises(ValueError, match=r"topk_length must be \[b\] = \[2\], got \(1,\)"):
        sparse_mla_reference(inp.q, inp.k_cache, inp.indices, torch.tensor([64], dtype=torch.int32), *args[4:])
    with pytest.raises(ValueError, match=r"attn_sink must be \[h_q\] = \[4\], got \(1,\)"):
        sparse_mla_reference(*args[:4], torch.zeros(1), inp.softmax_scale)
