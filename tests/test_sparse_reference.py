"""The sparse-decoding reference against a float64 computation written out row by row,
and FlashMLA's conventions: invalid indices (-1, out of range, past topk_length) are never
read, rows without a valid index give out 0 and lse +inf, and the attention sink scales
out by exp(lse) / (exp(lse) + exp(sink)) without changing lse."""

import math

import pytest
import torch

from flashmla_cute import fp8_cache
from flashmla_cute.sparse_reference import sparse_mla_reference
from flashmla_cute.sparse_testing import make_sparse_decode_inputs


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


def check(inp, out, lse):
    keys = fp8_cache.dequantize_v32_kv_cache(inp.k_cache)
    exp_out, exp_lse = rowwise(inp.q, keys, inp.indices, inp.topk_length, inp.attn_sink, inp.softmax_scale)
    b, s_q, h_q, _ = inp.q.shape
    assert out.shape == (b, s_q, h_q, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), exp_out, rtol=2**-8, atol=1e-5)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(exp_lse))
    torch.testing.assert_close(lse.double(), exp_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s_q", [1, 3])
@pytest.mark.parametrize("topk,page", [(64, 2), (128, 61), (192, 64)])
@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("with_topk_length", [False, True])
def test_matches_rowwise_float64(s_q, topk, page, with_sink, with_topk_length):
    inp = make_sparse_decode_inputs(3, s_q, 4, 150, topk, page, seed=topk + page + s_q,
                                    with_sink=with_sink, with_topk_length=with_topk_length, zero_lengths=True)
    out, lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, inp.topk_length, inp.attn_sink,
                                    inp.softmax_scale)
    check(inp, out, lse)


def test_dequantized_cache_gives_the_same_result():
    inp = make_sparse_decode_inputs(2, 2, 8, 100, 64, 16, seed=7, with_sink=True)
    from_fp8 = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, attn_sink=inp.attn_sink)
    keys = fp8_cache.dequantize_v32_kv_cache(inp.k_cache)
    from_bf16 = sparse_mla_reference(inp.q, keys, inp.indices, attn_sink=inp.attn_sink)
    assert torch.equal(from_fp8[0], from_bf16[0]) and torch.equal(from_fp8[1], from_bf16[1])


def test_every_index_invalid_gives_zero_and_posinf():
    inp = make_sparse_decode_inputs(2, 3, 4, 100, 64, 8, seed=1, all_invalid=True, with_sink=True)
    out, lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, attn_sink=inp.attn_sink)
    assert bool((out == 0).all()) and bool(torch.isposinf(lse).all())


def test_out_of_range_and_negative_indices_are_invalid():
    inp = make_sparse_decode_inputs(1, 1, 4, 64, 64, 8, seed=2, varlen=False)
    num_tokens = inp.k_cache.shape[0] * inp.k_cache.shape[1]
    bad = inp.indices.clone()
    bad[..., 10:20] = -1
    bad[..., 20:30] = -123456
    bad[..., 30:40] = num_tokens
    bad[..., 40:50] = 2**31 - 1
    keep = torch.cat([bad[..., :10], bad[..., 50:]], dim=-1)
    out_bad, lse_bad = sparse_mla_reference(inp.q, inp.k_cache, bad)
    out_keep, lse_keep = sparse_mla_reference(inp.q, inp.k_cache, keep)
    assert torch.equal(out_bad, out_keep) and torch.equal(lse_bad, lse_keep)


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


def test_sink_conventions():
    inp = make_sparse_decode_inputs(2, 1, 4, 100, 64, 8, seed=4, varlen=False)
    plain_out, plain_lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices)
    sink = torch.tensor([math.inf, -math.inf, 0.0, 3.0])
    out, lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, attn_sink=sink)
    assert torch.equal(lse, plain_lse), "the sink does not change lse"
    assert bool((out[:, :, 0] == 0).all()), "+inf sink: out 0"
    assert torch.equal(out[:, :, 1], plain_out[:, :, 1]), "-inf sink: out unchanged"
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


def test_default_scale_is_d_to_the_minus_half():
    inp = make_sparse_decode_inputs(1, 1, 2, 64, 64, 8, seed=6)
    default = sparse_mla_reference(inp.q, inp.k_cache, inp.indices)
    explicit = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, softmax_scale=576 ** -0.5)
    assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])
