"""The float32 reference against a float64 computation written out row by row, on
small random paged inputs (random page order, NaN in every unused cache slot)."""

import math

import pytest
import torch

from flashmla_cute import reference
from flashmla_cute.reference import flash_mla_reference
from flashmla_cute.testing import assert_equal_up_to_rounding, make_decode_inputs


def rowwise_attention(q, k_cache, block_table, cache_seqlens, dv, scale, causal):
    """Attention one (batch, query token, head) row at a time, in float64, reading only
    the cache rows each query may see."""
    b, s_q, h_q, d = q.shape
    h_kv = k_cache.shape[2]
    group = h_q // h_kv
    out = torch.zeros(b, s_q, h_q, dv, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        length = int(cache_seqlens[i])
        for j in range(s_q):
            visible = length - (s_q - 1 - j) if causal else length
            if visible <= 0:
                continue
            pages = [int(block_table[i, t // 64]) for t in range(visible)]
            slots = [t % 64 for t in range(visible)]
            for h in range(h_q):
                rows = k_cache[pages, slots, h // group].double()  # [visible, d]
                scores = (rows @ q[i, j, h].double()) * scale
                top = scores.max()
                weights = torch.exp(scores - top)
                total = weights.sum()
                lse[i, h, j] = top + torch.log(total)
                out[i, j, h] = (weights / total) @ rows[:, :dv]
    return out, lse


def scaled_inputs(b, s_q, h_q, h_kv, d, dtype, seqlens, seed):
    """Paged inputs whose scores spread over several units, so the softmax is far from
    uniform (make_decode_inputs draws small values)."""
    inp = make_decode_inputs(b, s_q, h_q, h_kv=h_kv, d=d, dtype=dtype, seqlens=seqlens, seed=seed)
    inp.q = (inp.q.float() * 10).to(dtype)
    inp.k_cache = (inp.k_cache.float() * 10).to(dtype)
    return inp


def check_against_rowwise(inp, dv, causal, softmax_scale=None):
    d = inp.q.shape[-1]
    out, lse = flash_mla_reference(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, dv, softmax_scale=softmax_scale, causal=causal
    )
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    exp_out, exp_lse = rowwise_attention(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, dv, scale, causal)
    b, s_q, h_q, _ = inp.q.shape
    assert out.shape == (b, s_q, h_q, dv) and out.dtype == inp.q.dtype
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    # out is rounded once to q's dtype; lse is float32.
    rtol = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 1e-5}[inp.q.dtype]
    torch.testing.assert_close(out.double(), exp_out, rtol=rtol, atol=1e-5)
    finite = torch.isfinite(exp_lse)
    assert torch.equal(torch.isposinf(lse), ~finite)
    torch.testing.assert_close(lse.double()[finite], exp_lse[finite], rtol=1e-5, atol=1e-5)
    return out, lse


LENGTHS = [0, 1, 2, 63, 64, 65, 130, 200]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("s_q", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h_q,h_kv", [(4, 1), (4, 2)])
def test_matches_rowwise_float64(dtype, s_q, causal, h_q, h_kv):
    seed = 1000 * s_q + 10 * h_q + h_kv + (5 if causal else 0)
    inp = scaled_inputs(len(LENGTHS), s_q, h_q, h_kv, 40, dtype, LENGTHS, seed)
    check_against_rowwise(inp, 24, causal)


@pytest.mark.parametrize("seed", range(3))
def test_varlen_full_head_dims(seed):
    # DeepSeek's shape: d = 576, dv = 512, with varying lengths.
    inp = make_decode_inputs(3, 2, 8, seqlen=150, varlen=True, seed=seed)
    check_against_rowwise(inp, 512, causal=True)


def test_custom_softmax_scale():
    inp = scaled_inputs(4, 2, 4, 1, 32, torch.bfloat16, [5, 64, 100, 129], seed=3)
    out, _ = check_against_rowwise(inp, 32, causal=False, softmax_scale=0.37)
    default, _ = flash_mla_reference(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 32)
    assert not torch.allclose(out.float(), default.float())


def test_head_dim_v_equal_to_d():
    inp = scaled_inputs(2, 1, 2, 1, 16, torch.float16, [70, 3], seed=4)
    check_against_rowwise(inp, 16, causal=False)


def test_rows_without_keys_give_zero_and_inf():
    # s_q = 3, causal: token j sees L - (2 - j) keys.
    lens = [0, 1, 2, 3]
    inp = make_decode_inputs(len(lens), 3, 2, d=32, seqlens=lens, seed=5)
    out, lse = flash_mla_reference(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 16, causal=True)
    empty = torch.tensor(
        [
            [True, True, True],  # L = 0
            [True, True, False],  # L = 1
            [True, False, False],  # L = 2
            [False, False, False],  # L = 3
        ]
    )  # [b, s_q]
    for i in range(len(lens)):
        for j in range(3):
            if empty[i, j]:
                assert (out[i, j] == 0).all()
                assert torch.isposinf(lse[i, :, j]).all()
            else:
                assert torch.isfinite(lse[i, :, j]).all()
                assert out[i, j].abs().sum() > 0
    # Without causal only the empty sequence has no keys.
    out, lse = flash_mla_reference(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 16)
    assert (out[0] == 0).all() and torch.isposinf(lse[0]).all()
    assert torch.isfinite(lse[1:]).all()


def test_causal_has_no_effect_with_one_query_token():
    inp = make_decode_inputs(3, 1, 4, d=32, seqlens=[1, 64, 100], seed=6)
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 32)
    a = flash_mla_reference(*args, causal=False)
    b = flash_mla_reference(*args, causal=True)
    assert_equal_up_to_rounding(a[0], b[0])
    assert_equal_up_to_rounding(a[1], b[1])


def test_unused_slots_and_table_entries_never_leak():
    lens = [0, 1, 63, 64, 65, 129]
    inp = make_decode_inputs(len(lens), 2, 4, d=32, seqlens=lens, seed=7, extra_blocks=3)
    args = (inp.block_table, inp.cache_seqlens, 16)
    out, lse = flash_mla_reference(inp.q, inp.k_cache, *args, causal=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()

    # make_decode_inputs filled every unused slot with NaN and every unused table entry
    # with garbage; replacing them with anything else changes nothing.
    k_cache = torch.nan_to_num(inp.k_cache, nan=1e4)
    table = inp.block_table.clone()
    table[table == 2147480000] = -7
    out2, lse2 = flash_mla_reference(inp.q, k_cache, table, inp.cache_seqlens, 16, causal=True)
    assert_equal_up_to_rounding(out, out2)
    assert_equal_up_to_rounding(lse, lse2)


def test_nan_slots_are_where_make_decode_inputs_says():
    lens = [0, 1, 63, 64, 65, 129]
    inp = make_decode_inputs(len(lens), 1, 1, d=8, seqlens=lens, seed=8, extra_blocks=2)
    nan_slots = torch.isnan(inp.k_cache).all(dim=(2, 3))  # [num_blocks, 64]
    assert torch.equal(nan_slots, torch.isnan(inp.k_cache).any(dim=(2, 3)))
    used = torch.zeros_like(nan_slots)
    for i, length in enumerate(lens):
        for t in range(length):
            used[int(inp.block_table[i, t // 64]), t % 64] = True
    assert torch.equal(~used, nan_slots)
    pages = [-(-n // 64) for n in lens]
    assert inp.k_cache.shape[0] == sum(pages) + 2
    for i, n in enumerate(pages):
        assert (inp.block_table[i, n:] == 2147480000).all()
    mapped = torch.cat([inp.block_table[i, :n] for i, n in enumerate(pages)])
    assert len(set(mapped.tolist())) == sum(pages)  # no page shared
    assert inp.block_table.shape[1] % 4 == 0 and inp.block_table.shape[1] > max(pages)


def test_page_order_is_random_and_fresh():
    a = make_decode_inputs(4, 1, 2, d=8, seqlen=640)
    b = make_decode_inputs(4, 1, 2, d=8, seqlen=640)
    identity = torch.arange(40, dtype=torch.int32).view(4, 10)
    assert not torch.equal(a.block_table[:, :10], identity)
    assert not torch.equal(a.q, b.q)
    c = make_decode_inputs(4, 1, 2, d=8, seqlen=640, seed=a.seed)
    assert torch.equal(a.q, c.q) and torch.equal(a.block_table, c.block_table)
    assert torch.equal(a.k_cache.nan_to_num(), c.k_cache.nan_to_num())


def test_chunked_batches_match_one_sequence_at_a_time(monkeypatch):
    lens = [300, 0, 5, 64, 1000, 17, 129, 1, 700, 256]
    inp = make_decode_inputs(len(lens), 2, 4, h_kv=2, d=32, seqlens=lens, seed=9)
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 16)
    whole, whole_lse = flash_mla_reference(*args, causal=True)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1)  # one sequence per chunk
    single, single_lse = flash_mla_reference(*args, causal=True)
    torch.testing.assert_close(whole.float(), single.float(), rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(whole_lse, single_lse, rtol=1e-6, atol=1e-6)


def test_many_short_sequences_and_one_long():
    gen = torch.Generator().manual_seed(10)
    lens = torch.randint(1, 130, (2048,), generator=gen)
    inp = make_decode_inputs(2048, 1, 16, seqlens=lens, seed=10)
    out, lse = flash_mla_reference(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512)
    assert torch.isfinite(lse).all() and not torch.isnan(out).any()

    inp = make_decode_inputs(1, 2, 16, seqlens=[65536], seed=11)
    out, lse = flash_mla_reference(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512, causal=True)
    assert torch.isfinite(lse).all() and not torch.isnan(out).any()
    # Nearly uniform attention over 65536 keys: lse close to log(65536).
    assert (lse - math.log(65536)).abs().max() < 0.1


def test_rejects_lengths_or_pages_that_do_not_fit():
    inp = make_decode_inputs(2, 1, 2, d=8, seqlens=[10, 70], seed=12)
    too_long = torch.tensor([10, 64 * inp.block_table.shape[1] + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_mla_reference(inp.q, inp.k_cache, inp.block_table, too_long, 8)
    table = inp.block_table.clone()
    table[1, 1] = inp.k_cache.shape[0]
    with pytest.raises(ValueError, match="block_table"):
        flash_mla_reference(inp.q, inp.k_cache, table, inp.cache_seqlens, 8)


def test_equal_up_to_rounding_allows_one_step_of_the_dtype_and_nothing_else():
    # How the CPU tests compare two computations of one result (torch's CPU operations
    # are not bitwise reproducible from one call to the next).
    x = torch.tensor([0.03125, 1.0, -2.5, math.inf], dtype=torch.bfloat16)
    one_step = x.clone()
    one_step[1] = 1.0 + 2**-7  # bf16's next value after 1
    assert_equal_up_to_rounding(one_step, x)
    for spoil in (lambda y: y.__setitem__(1, 1.0 + 2**-6), lambda y: y.__setitem__(3, -math.inf),
                  lambda y: y.__setitem__(0, math.nan)):
        y = x.clone()
        spoil(y)
        with pytest.raises(AssertionError):
            assert_equal_up_to_rounding(y, x)


def test_rejects_what_is_not_a_tensor_by_name():
    x = make_decode_inputs(1, 1, 16, seqlens=[70], seed=1)
    args = [x.q, x.k_cache, x.block_table, x.cache_seqlens]
    for i, name in enumerate(("q", "k_cache", "block_table", "cache_seqlens")):
        bad = list(args)
        bad[i] = bad[i].tolist()
        with pytest.raises(TypeError, match=f"^{name} must be a torch.Tensor, got list"):
            flash_mla_reference(*bad, 512)
