"""The decode kernel against the float32 reference, on fresh random inputs with NaN in
every cache slot no sequence uses and block tables that map to random pages.

Pass criterion (FlashMLA's own): cosine distance < 1e-5 for out and lse."""

import math

import pytest
import torch

from flashmla_cute.checks import MAX_S_Q
from flashmla_cute.reference import flash_mla_reference
from flashmla_cute.testing import cosine_distance, make_decode_inputs, written_by_a_long_kernel

pytestmark = pytest.mark.gpu

TOL = 1e-5


def run_and_check(inputs, h_q, s_q, causal, softmax_scale=None, dv=512):
    import flashmla_cute

    h_kv = inputs.k_cache.shape[2]
    meta, num_splits = flashmla_cute.get_mla_metadata(inputs.cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flashmla_cute.flash_mla_with_kvcache(
        inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, dv, meta, num_splits,
        softmax_scale=softmax_scale, causal=causal,
    )
    ref_out, ref_lse = flash_mla_reference(
        inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, dv,
        softmax_scale=softmax_scale, causal=causal,
    )
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert out.dtype == inputs.q.dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any(), "NaN in out"
    d_out = cosine_distance(out.float(), ref_out.float())
    d_lse = cosine_distance(lse, ref_lse)
    assert d_out < TOL, f"out cosine distance {d_out}"
    assert d_lse < TOL, f"lse cosine distance {d_lse}"
    return out, lse


GRID = [
    (seqlen, h_q, s_q, varlen)
    for seqlen in (4096, 8192)
    for h_q in (16, 32, 64, 128)
    for s_q in (1, 2)
    for varlen in (False, True)
]


@pytest.mark.parametrize("seqlen,h_q,s_q,varlen", GRID)
def test_flashmla_grid(requires_hopper, seqlen, h_q, s_q, varlen):
    inputs = make_decode_inputs(128, s_q, h_q, seqlen=seqlen, varlen=varlen, device="cuda")
    run_and_check(inputs, h_q, s_q, causal=True)


@pytest.mark.parametrize("seqlen", [1, 2, 63, 64, 65, 127, 128, 4095, 4097])
@pytest.mark.parametrize("s_q,h_q", [(1, 16), (2, 64), (1, 128)])
def test_sequence_lengths(requires_hopper, seqlen, s_q, h_q):
    inputs = make_decode_inputs(9, s_q, h_q, seqlens=[seqlen] * 9, device="cuda")
    run_and_check(inputs, h_q, s_q, causal=True)


def test_mixed_lengths_including_empty(requires_hopper):
    lens = [0, 1, 63, 64, 65, 4095, 4097, 0, 300, 1]
    inputs = make_decode_inputs(len(lens), 2, 32, seqlens=lens, device="cuda")
    out, lse = run_and_check(inputs, 32, 2, causal=True)
    assert (out[0] == 0).all() and torch.isposinf(lse[0]).all()


def test_empty_sequences_with_a_block_table_of_width_0(requires_hopper):
    # Nothing to read: the kernel must not touch the table (it has no entry), and every
    # row comes out as FlashMLA's empty sequence (zeros, lse +inf).
    import flashmla_cute

    inputs = make_decode_inputs(3, 1, 16, seqlens=[0, 0, 0], device="cuda")
    block_table = inputs.block_table[:, :0]
    meta, num_splits = flashmla_cute.get_mla_metadata(inputs.cache_seqlens, 16, 1)
    out, lse = flashmla_cute.flash_mla_with_kvcache(
        inputs.q, inputs.k_cache, block_table, inputs.cache_seqlens, 512, meta, num_splits
    )
    assert (out == 0).all() and torch.isposinf(lse).all()


def test_a_sequence_longer_than_a_table_of_width_0_gives_nan(requires_hopper):
    # As any sequence longer than its table (PAST_THE_TABLE below), taken whole: NaN out
    # and NaN lse, not the +inf of a sequence without keys; the empty one beside it is one.
    import flashmla_cute

    inputs = make_decode_inputs(2, 1, 16, seqlens=[5, 0], device="cuda", seed=8)
    meta, num_splits = flashmla_cute.get_mla_metadata(inputs.cache_seqlens, 16, 1)
    out, lse = flashmla_cute.flash_mla_with_kvcache(
        inputs.q, inputs.k_cache, inputs.block_table[:, :0], inputs.cache_seqlens, 512, meta, num_splits
    )
    assert torch.isnan(out[0]).all() and torch.isnan(lse[0]).all()
    assert (out[1] == 0).all() and torch.isposinf(lse[1]).all()


@pytest.mark.parametrize("h_q,h_kv", [(100, 1), (20, 5), (48, 1)])
def test_head_counts_off_the_mma_tiles(requires_hopper, h_q, h_kv):
    # Query rows a KV head that fill no whole tile of 16 or 64 rows, split and whole.
    inputs = make_decode_inputs(5, 2, h_q, h_kv=h_kv, seqlens=[9000, 1, 130, 0, 700], device="cuda", seed=h_q)
    run_and_check(inputs, h_q, 2, causal=True)


def test_a_split_whose_last_fragment_some_rows_cannot_see(requires_hopper):
    # Length 129 at s_q 4, split over many parts: the first query token sees 126 keys,
    # so in the last fragment some rows see nothing and others one key or more.
    import flashmla_cute

    inputs = make_decode_inputs(1, MAX_S_Q, 64, seqlens=[129], device="cuda", seed=9)
    _, num_splits = flashmla_cute.get_mla_metadata(inputs.cache_seqlens, MAX_S_Q * 64, 1)
    assert int(num_splits[1] - num_splits[0]) > 1
    run_and_check(inputs, 64, MAX_S_Q, causal=True)


def test_one_long_sequence(requires_hopper):
    inputs = make_decode_inputs(1, 1, 128, seqlens=[65536], device="cuda")
    run_and_check(inputs, 128, 1, causal=False)


@pytest.mark.parametrize("h_q,s_q", [(16, 1), (128, 2)])
def test_scores_whose_maximum_keeps_growing(requires_hopper, h_q, s_q):
    # Page j of every sequence scaled by (1 + j), with a large softmax scale: nearly every
    # block's maximum exceeds the running one, late in the sequence too, so O and the row
    # sums are rescaled at every step of both consumers (by factors far from 1).
    inputs = make_decode_inputs(8, s_q, h_q, seqlen=3000, varlen=True, device="cuda")
    for i in range(inputs.block_table.shape[0]):
        pages = -(-int(inputs.cache_seqlens[i]) // 64)
        for j in range(pages):
            inputs.k_cache[inputs.block_table[i, j]] *= 1 + j
    run_and_check(inputs, h_q, s_q, causal=True, softmax_scale=10.0)


def test_many_short_sequences(requires_hopper):
    gen = torch.Generator().manual_seed(7)
    lens = torch.randint(1, 300, (2048,), generator=gen).tolist()
    inputs = make_decode_inputs(2048, 1, 16, seqlens=lens, device="cuda")
    run_and_check(inputs, 16, 1, causal=False)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h_q", [16, 64, 128])
@pytest.mark.parametrize("s_q", range(3, MAX_S_Q + 1))
def test_more_query_tokens(requires_hopper, s_q, h_q, causal):
    # s_q up to MAX_S_Q, the most a call takes (multi-token prediction with more tokens).
    inputs = make_decode_inputs(16, s_q, h_q, seqlen=2000, varlen=True, device="cuda")
    run_and_check(inputs, h_q, s_q, causal=causal)


@pytest.mark.parametrize("s_q", [3, MAX_S_Q])
def test_more_query_tokens_short_sequences_and_kv_heads(requires_hopper, s_q):
    # Lengths below s_q leave causal rows with nothing to see; two KV heads.
    inputs = make_decode_inputs(6, s_q, 32, h_kv=2, seqlens=[0, 1, 2, 3, 65, 700], device="cuda")
    run_and_check(inputs, 32, s_q, causal=True)


@pytest.mark.parametrize("s_q,h_q,causal", [(1, 16, False), (2, 128, True), (2, 32, False), (MAX_S_Q, 64, True)])
def test_float16(requires_hopper, s_q, h_q, causal):
    inputs = make_decode_inputs(32, s_q, h_q, seqlen=2000, varlen=True, dtype=torch.float16, device="cuda")
    run_and_check(inputs, h_q, s_q, causal=causal)


@pytest.mark.parametrize("h_q,h_kv", [(32, 2), (16, 4)])
def test_several_kv_heads(requires_hopper, h_q, h_kv):
    inputs = make_decode_inputs(16, 2, h_q, h_kv=h_kv, seqlen=1500, varlen=True, device="cuda")
    run_and_check(inputs, h_q, 2, causal=True)


def test_noncausal_mtp(requires_hopper):
    inputs = make_decode_inputs(64, 2, 64, seqlen=3000, varlen=True, device="cuda")
    run_and_check(inputs, 64, 2, causal=False)


def test_custom_scale(requires_hopper):
    inputs = make_decode_inputs(32, 1, 64, seqlen=2000, varlen=True, device="cuda")
    run_and_check(inputs, 64, 1, causal=False, softmax_scale=0.3 / math.sqrt(576))


def test_bitwise_deterministic(requires_hopper):
    import flashmla_cute

    inputs = make_decode_inputs(64, 2, 128, seqlen=3000, varlen=True, device="cuda")
    meta, num_splits = flashmla_cute.get_mla_metadata(inputs.cache_seqlens, 2 * 128, 1)
    args = (inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512, meta, num_splits)
    out1, lse1 = flashmla_cute.flash_mla_with_kvcache(*args, causal=True)
    out2, lse2 = flashmla_cute.flash_mla_with_kvcache(*args, causal=True)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


def test_runs_on_a_side_stream(requires_hopper):
    import flashmla_cute

    inputs = make_decode_inputs(16, 1, 16, seqlen=1000, varlen=True, device="cuda")
    ref_out, _ = flash_mla_reference(inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512)
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        meta, num_splits = flashmla_cute.get_mla_metadata(inputs.cache_seqlens, 16, 1)
        out, _ = flashmla_cute.flash_mla_with_kvcache(
            inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512, meta, num_splits
        )
    stream.synchronize()
    assert cosine_distance(out.float(), ref_out.float()) < TOL


def test_reads_what_the_kernel_before_it_wrote(requires_hopper):
    """Q, written last by the kernel launched just before the call (a matmul into memory
    that held NaN), is read after that kernel ends: the guard for a launch that overlaps
    the previous kernel's end (benchmarks/NOTES.md, "Not kept: the decode kernels as
    programmatic dependents")."""
    import flashmla_cute

    inputs = make_decode_inputs(8, 2, 64, seqlen=3000, varlen=True, device="cuda", seed=5)
    meta, num_splits = flashmla_cute.get_mla_metadata(inputs.cache_seqlens, 2 * 64, 1)
    inputs.q = written_by_a_long_kernel(inputs.q, seed=5)
    out, lse = flashmla_cute.flash_mla_with_kvcache(
        inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512, meta, num_splits, causal=True
    )
    ref_out, ref_lse = flash_mla_reference(inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512,
                                           causal=True)
    assert not torch.isnan(out).any(), "NaN in out: Q read before the kernel that wrote it ended"
    assert cosine_distance(out.float(), ref_out.float()) < TOL
    assert cosine_distance(lse, ref_lse) < TOL


# Lengths the block table cannot hold: one token more, in a sequence split over parts
# or taken whole by one; a length of 2**31 - 1 (its block count wraps in 32 bits); and
# garbage lengths whose costs sum past 2**31 (the plan's sums wrap in 32 bits).
PAST_THE_TABLE = {
    "split": ([100, 700, 300, 64], [1]),
    "whole": ([100] * 200, [1]),
    "2**31 - 1": ([100, 700, 300, 64], [1]),
    "garbage": ([100] * 160, list(range(1, 160, 2))),
}


@pytest.mark.parametrize("case", list(PAST_THE_TABLE))
def test_length_past_the_block_table_gives_nan_not_a_read_out_of_bounds(requires_hopper, case):
    import flashmla_cute

    lengths, bad = PAST_THE_TABLE[case]
    inputs = make_decode_inputs(len(lengths), 1, 16, seqlens=lengths, device="cuda", seed=3)
    ok_seqlens = inputs.cache_seqlens.clone()
    if case == "garbage":
        gen = torch.Generator().manual_seed(4)
        inputs.cache_seqlens[bad] = torch.randint(2**31 - 2**20, 2**31 - 1, (len(bad),), generator=gen,
                                                  dtype=torch.int32).cuda()
    else:
        inputs.cache_seqlens[1] = 2**31 - 1 if case == "2**31 - 1" else inputs.block_table.shape[1] * 64 + 1
    meta, num_splits = flashmla_cute.get_mla_metadata(inputs.cache_seqlens, 16, 1)
    fragments = int(num_splits[2] - num_splits[1])
    assert fragments > 1 if case == "split" else fragments == 1 if case == "whole" else True
    out, lse = flashmla_cute.flash_mla_with_kvcache(
        inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512, meta, num_splits
    )
    assert torch.isnan(out[bad]).all() and torch.isnan(lse[bad]).all()
    keep = [i for i in range(len(lengths)) if i not in bad]
    ref_out, ref_lse = flash_mla_reference(inputs.q, inputs.k_cache, inputs.block_table, ok_seqlens, 512)
    assert cosine_distance(out[keep].float(), ref_out[keep].float()) < TOL
    assert cosine_distance(lse[keep], ref_lse[keep]) < TOL


def test_page_indices_outside_the_cache_read_as_zeros(requires_hopper):
    # Not checked on the GPU (a host synchronization): a used table entry past the cache,
    # or negative, reads a page of zeros (the reference: the same entries pointing at a
    # page of zeros appended to the cache).
    import flashmla_cute

    inputs = make_decode_inputs(3, 1, 16, seqlens=[100, 700, 300], device="cuda", seed=7)
    num_blocks = inputs.k_cache.shape[0]
    ref_cache = torch.cat([inputs.k_cache, torch.zeros_like(inputs.k_cache[:1])])
    ref_table = inputs.block_table.clone()
    for i, j, index in ((1, 0, num_blocks), (1, 3, -1), (1, 5, 2**31 - 1), (2, 1, -(2**31))):
        inputs.block_table[i, j] = index
        ref_table[i, j] = num_blocks
    meta, num_splits = flashmla_cute.get_mla_metadata(inputs.cache_seqlens, 16, 1)
    out, lse = flashmla_cute.flash_mla_with_kvcache(
        inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512, meta, num_splits
    )
    ref_out, ref_lse = flash_mla_reference(inputs.q, ref_cache, ref_table, inputs.cache_seqlens, 512)
    assert cosine_distance(out.float(), ref_out.float()) < TOL
    assert cosine_distance(lse, ref_lse) < TOL


def test_negative_length_is_an_empty_sequence(requires_hopper):
    # Not checked on the GPU (a host synchronization): it reads nothing, as length 0.
    import flashmla_cute

    inputs = make_decode_inputs(3, 2, 16, seqlens=[100, 700, 300], device="cuda", seed=5)
    inputs.cache_seqlens[1] = -5
    meta, num_splits = flashmla_cute.get_mla_metadata(inputs.cache_seqlens, 32, 1)
    out, lse = flashmla_cute.flash_mla_with_kvcache(
        inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512, meta, num_splits, causal=True
    )
    assert (out[1] == 0).all() and torch.isposinf(lse[1]).all()
    ok_seqlens = inputs.cache_seqlens.clone()
    ok_seqlens[1] = 0
    ref_out, ref_lse = flash_mla_reference(inputs.q, inputs.k_cache, inputs.block_table, ok_seqlens, 512,
                                           causal=True)
    assert cosine_distance(out.float(), ref_out.float()) < TOL
    assert cosine_distance(lse, ref_lse) < TOL


@pytest.mark.parametrize("s_q, h_q", [(1, 16), (2, 64)])
def test_a_nan_key_gives_nan_out_and_lse(requires_hopper, s_q, h_q):
    # A NaN in a token within a sequence's length (a corrupt cache) makes every row that
    # sees it NaN, out and lse, as in the reference: in a sequence taken whole (0) and in
    # one split across SMs (1). The sequence without one is unchanged.
    import flashmla_cute

    inputs = make_decode_inputs(3, s_q, h_q, seqlens=[100, 8000, 300], device="cuda", seed=6)
    for i, token in ((0, 40), (1, 5000)):
        inputs.k_cache[inputs.block_table[i, token // 64], token % 64, 0, 7] = math.nan
    meta, num_splits = flashmla_cute.get_mla_metadata(inputs.cache_seqlens, s_q * h_q, 1)
    assert int(num_splits[1] - num_splits[0]) == 1 and int(num_splits[2] - num_splits[1]) > 1
    out, lse = flashmla_cute.flash_mla_with_kvcache(
        inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512, meta, num_splits, causal=s_q > 1
    )
    ref_out, ref_lse = flash_mla_reference(inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512,
                                           causal=s_q > 1)
    assert torch.isnan(ref_out[:2]).all() and torch.isnan(ref_lse[:2]).all()
    assert torch.isnan(out[:2]).all() and torch.isnan(lse[:2]).all()
    assert cosine_distance(out[2:].float(), ref_out[2:].float()) < TOL
    assert cosine_distance(lse[2:], ref_lse[2:]) < TOL
