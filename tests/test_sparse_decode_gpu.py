"""The sparse decode kernel against the float32 reference on FlashMLA's V3.2 test grid
and its MODEL1 (d_qk 512) grid with and without an extra cache (with sinks, some of them
+-inf), corner cases (every index invalid, empty sequences, topk_length, an empty main
cache beside a valid extra one), fewer heads than 64/128, a padded page stride, a cache of
one page, and the API's refusals on CUDA tensors. Every cache token no index uses holds
NaN bytes, so a kernel that reads one shows it; results are compared as FlashMLA does
(cosine distance, plus elementwise bounds), with +inf lse at the same places."""

import itertools
import math

import pytest
import torch

from flashmla_cute import runtime, sparse_runtime
from flashmla_cute.api import flash_mla_with_kvcache, get_mla_metadata
from flashmla_cute.fp8_cache import MODEL1, V32
from flashmla_cute.kernels.combine import GROUP_ROW_FRAGMENTS
from flashmla_cute.sparse_reference import sparse_mla_reference
from flashmla_cute.sparse_testing import NAN_BYTE, make_sparse_decode_inputs, page_bytes, with_page_stride
from flashmla_cute.testing import cosine_distance, written_by_a_long_kernel

pytestmark = pytest.mark.gpu

# (seqlen, topk, page size) of FlashMLA's sparse-decoding correctness grid.
V32_GRID = [
    (512, 64, 2), (512, 64, 64), (512, 64, 69),
    (1024, 576, 2), (1024, 576, 61),
    (2046, 2048, 2), (2046, 2048, 64), (2046, 2048, 576),
]

# (seqlen, topk, page size) of the main cache and of the extra cache (None: none) on
# FlashMLA's MODEL1 correctness grid, its larger sizes left out.
MODEL1_GRID = [(512, 64, 2), (512, 64, 64), (512, 64, 69), (1024, 576, 61)]
MODEL1_EXTRA_GRID = [None, (512, 64, 2), (512, 64, 64), (1024, 576, 61)]
MODEL1_SHAPES = list(itertools.product((74, 4), (3, 1), (128, 64)))  # (b, s_q, h_q), largest first
SLOW_ENTRIES = 10**5
"""(query token, entry) pairs, ``b * s_q * (topk + extra_topk)``, above which a case is marked slow."""


def run_kernel(inp):
    plan, _ = get_mla_metadata()
    return flash_mla_with_kvcache(
        inp.q, inp.k_cache, None, None, 512, plan, softmax_scale=inp.softmax_scale, is_fp8_kvcache=True,
        indices=inp.indices, attn_sink=inp.attn_sink, topk_length=inp.topk_length,
        extra_k_cache=inp.extra_k_cache, extra_indices_in_kvcache=inp.extra_indices,
        extra_topk_length=inp.extra_topk_length,
    )


def check(inp):
    out, lse = run_kernel(inp)
    torch.cuda.synchronize()
    exp_out, exp_lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, inp.topk_length, inp.attn_sink,
                                            inp.softmax_scale, extra_k_cache=inp.extra_k_cache,
                                            extra_indices=inp.extra_indices, extra_topk_length=inp.extra_topk_length)
    assert not out.isnan().any(), "NaN in out"
    assert not lse.isnan().any(), "NaN in lse"
    assert torch.equal(torch.isposinf(lse), torch.isposinf(exp_lse)), "+inf lse (rows without a token) differ"
    assert cosine_distance(out, exp_out) < 1e-5
    torch.testing.assert_close(out.float(), exp_out.float(), atol=1e-3, rtol=2.01 / 128)
    finite = torch.isfinite(exp_lse)
    torch.testing.assert_close(lse[finite], exp_lse[finite], atol=1e-6, rtol=8.01 / 65536)


def grid_params():
    for b in (4, 74, 321):
        for s_q in (1, 3):
            for h_q in (64, 128):
                for seqlen, topk, page in V32_GRID:
                    marks = [pytest.mark.slow] if b == 321 and topk == 2048 else []
                    yield pytest.param(b, s_q, h_q, seqlen, topk, page, marks=marks,
                                       id=f"b{b}-sq{s_q}-h{h_q}-len{seqlen}-topk{topk}-page{page}")


@pytest.mark.parametrize("b,s_q,h_q,seqlen,topk,page", list(grid_params()))
def test_v32_grid(requires_hopper, b, s_q, h_q, seqlen, topk, page):
    check(make_sparse_decode_inputs(b, s_q, h_q, seqlen, topk, page, seed=b + topk + page + s_q, with_sink=True,
                                    device=requires_hopper))


def model1_grid_params():
    """Every (main cache, extra cache, lengths) combination once, on the (b, s_q, h_q)
    shapes taken in turn: every shape meets every main cache, in 44 cases rather than the
    full product's 352. Lengths: topk_length with or without an extra cache, and
    extra_topk_length alone or with topk_length."""
    combinations = [
        (main, extra, lengths)
        for main in MODEL1_GRID
        for extra in MODEL1_EXTRA_GRID
        for lengths in ([(False, False), (True, False)] if extra is None else
                        [(False, False), (False, True), (True, True)])
    ]
    for i, ((seqlen, topk, page), extra, (with_topk_length, with_extra_topk_length)) in enumerate(combinations):
        b, s_q, h_q = MODEL1_SHAPES[i % len(MODEL1_SHAPES)]
        options = dict(with_topk_length=with_topk_length)
        name = f"b{b}-sq{s_q}-h{h_q}-len{seqlen}-topk{topk}-page{page}" + ("-topklen" if with_topk_length else "")
        extra_topk = 0
        if extra is not None:
            extra_seqlen, extra_topk, extra_page = extra
            options.update(extra_seqlen=extra_seqlen, extra_topk=extra_topk, extra_page_size=extra_page,
                           with_extra_topk_length=with_extra_topk_length)
            name += f"-extra-len{extra_seqlen}-topk{extra_topk}-page{extra_page}"
            name += "-extratopklen" if with_extra_topk_length else ""
        marks = [pytest.mark.slow] if b * s_q * (topk + extra_topk) > SLOW_ENTRIES else []
        yield pytest.param(b, s_q, h_q, seqlen, topk, page, options, i, marks=marks, id=name)


@pytest.mark.parametrize("b,s_q,h_q,seqlen,topk,page,options,seed", list(model1_grid_params()))
def test_model1_grid(requires_hopper, b, s_q, h_q, seqlen, topk, page, options, seed):
    check(make_sparse_decode_inputs(b, s_q, h_q, seqlen, topk, page, seed=seed, layout=MODEL1, with_sink=True,
                                    device=requires_hopper, **options))


@pytest.mark.parametrize("b", [4, 74])
@pytest.mark.parametrize("seqlen,topk,page", [(512, 64, 61), (650, 576, 53)])
@pytest.mark.parametrize("all_invalid,zero_lengths,with_sink", [
    (True, False, False), (True, True, True), (False, True, False), (False, True, True), (False, False, True),
])
def test_corner_cases(requires_hopper, b, seqlen, topk, page, all_invalid, zero_lengths, with_sink):
    check(make_sparse_decode_inputs(b, 3, 128, seqlen, topk, page, seed=b + page, all_invalid=all_invalid,
                                    zero_lengths=zero_lengths, with_sink=with_sink, device=requires_hopper))


@pytest.mark.parametrize("b", [4, 74])
@pytest.mark.parametrize("all_invalid,zero_lengths,with_sink", [
    (True, False, False), (True, True, True), (False, True, True),
])
def test_model1_corner_cases(requires_hopper, b, all_invalid, zero_lengths, with_sink):
    """FlashMLA's corner sizes, both caches at once: every index of both invalid, or
    about half the sequences of each cache empty (each cache's own)."""
    check(make_sparse_decode_inputs(b, 3, 128, 512, 64, 61, seed=b, layout=MODEL1, extra_seqlen=650, extra_topk=576,
                                    extra_page_size=53, all_invalid=all_invalid, zero_lengths=zero_lengths,
                                    with_sink=with_sink, device=requires_hopper))


@pytest.mark.parametrize("b", [4, 74])
@pytest.mark.parametrize("emptied_by", ["indices", "topk_length"])
def test_model1_empty_main_cache_beside_a_valid_extra_cache(requires_hopper, b, emptied_by):
    """No main entry is valid (every index -1, or topk_length 0) and every main cache
    byte is NaN: each row sees its extra cache tokens only."""
    inp = make_sparse_decode_inputs(b, 2, 64, 512, 64, 64, seed=b, layout=MODEL1, extra_seqlen=1024, extra_topk=576,
                                    extra_page_size=61, with_extra_topk_length=True, with_sink=True,
                                    device=requires_hopper)
    if emptied_by == "indices":
        inp.indices.fill_(-1)
    else:
        inp.topk_length = torch.zeros(b, dtype=torch.int32, device=requires_hopper)
    inp.k_cache.view(torch.uint8).fill_(NAN_BYTE)  # the view covers every token's bytes, rows and scales
    check(inp)


@pytest.mark.parametrize("layout", [V32, MODEL1], ids=["V3.2", "MODEL1"])
def test_large_scores_move_the_running_maximum_in_later_steps(requires_hopper, layout):
    # A softmax scale 300 times the inputs' spreads the scores over about 30 in the exp2
    # domain: of the later steps, about 8% exceed the running maximum by more than the
    # rescale threshold (softmax.next_max, which moves it) and 10% by less (kept).
    inp = make_sparse_decode_inputs(4, 2, 64, 3000, 1024, 64, seed=5, with_sink=True, layout=layout,
                                    device=requires_hopper)
    inp.softmax_scale *= 300
    check(inp)


def test_reads_what_the_kernel_before_it_wrote(requires_hopper):
    """Q, written last by the kernel launched just before the call (a matmul into memory
    that held NaN), is read after that kernel ends (as the dense test of that name)."""
    inp = make_sparse_decode_inputs(20, 2, 128, 1024, 576, 61, seed=11, with_sink=True, device=requires_hopper)
    inp.q = written_by_a_long_kernel(inp.q, seed=11)
    check(inp)


@pytest.mark.parametrize("b,s_q,h_q,seqlen,topk", [(2, 2, 128, 4096, 2048), (1, 3, 10, 2100, 2048),
                                                   (1, 1, 64, 16500, 16384)])
def test_many_fragments_are_merged_through_shared_memory(requires_hopper, b, s_q, h_q, seqlen, topk):
    """Query tokens split into more fragments than a thread group merges are merged with
    the fragments' rows staged in shared memory (``MlaCombine.launch_staged``): V3.2's
    b = 2 production case, rows that leave the last block of the merge part-filled
    (3 x 10), and 64 fragments (several rounds of ``STAGED_ROUND_FRAGMENTS``)."""
    plan = sparse_runtime.plan_splits(b, s_q, h_q, topk, runtime.num_sms(torch.cuda.current_device()))
    assert plan.splits > GROUP_ROW_FRAGMENTS
    check(make_sparse_decode_inputs(b, s_q, h_q, seqlen, topk, 64, seed=topk + h_q, with_sink=True,
                                    device=requires_hopper))


@pytest.mark.parametrize("h_q", [1, 16, 100, 127])
def test_fewer_heads_are_padded(requires_hopper, h_q):
    check(make_sparse_decode_inputs(5, 2, h_q, 300, 128, 16, seed=h_q, with_sink=True, device=requires_hopper))


@pytest.mark.parametrize("layout", [V32, MODEL1], ids=lambda layout: layout.name)
@pytest.mark.parametrize("page", [1, 3, 1000])
def test_any_page_size(requires_hopper, layout, page):
    """The kernel divides cache positions by the page size with a multiply and shifts:
    sizes 1 (every position a page), odd, and larger than the topk."""
    extra = dict(extra_topk=64, extra_page_size=page + 1) if layout is MODEL1 else {}
    check(make_sparse_decode_inputs(6, 2, 64, 1500, 256, page, seed=page, layout=layout, with_sink=True,
                                    device=requires_hopper, **extra))


@pytest.mark.parametrize("topk,page", [(64, 8), (576, 64), (2048, 2)])
def test_topk_length(requires_hopper, topk, page):
    check(make_sparse_decode_inputs(17, 2, 64, 1000, topk, page, seed=topk, with_sink=True, with_topk_length=True,
                                    device=requires_hopper))


def test_sinks_of_both_infinities(requires_hopper):
    inp = make_sparse_decode_inputs(3, 1, 64, 200, 64, 16, seed=3, device=requires_hopper)
    inp.attn_sink = torch.zeros(64, device=requires_hopper)
    inp.attn_sink[::3] = math.inf
    inp.attn_sink[1::3] = -math.inf
    check(inp)
    out, _ = run_kernel(inp)
    assert bool((out[:, :, ::3] == 0).all())


@pytest.mark.parametrize("layout", [V32, MODEL1], ids=lambda layout: layout.name)
def test_padded_page_stride_and_byte_dtypes(requires_hopper, layout):
    """Caches (the extra one too, for MODEL1) with twice their page stride, NaN bytes
    between the pages, viewed as uint8, int8 or float8_e4m3fn: the same results."""
    extra = dict(extra_topk=128, extra_page_size=16) if layout is MODEL1 else {}
    inp = make_sparse_decode_inputs(6, 2, 128, 400, 128, 32, seed=9, layout=layout, with_sink=True,
                                    device=requires_hopper, **extra)
    expected = run_kernel(inp)
    padded = with_page_stride(inp.k_cache, 2 * inp.k_cache.stride(0))
    padded_extra = None
    if inp.extra_k_cache is not None:
        padded_extra = with_page_stride(inp.extra_k_cache, 2 * inp.extra_k_cache.stride(0))
    for dtype in (torch.uint8, torch.int8, torch.float8_e4m3fn):
        inp.k_cache = padded.view(dtype)
        inp.extra_k_cache = None if padded_extra is None else padded_extra.view(dtype)
        out, lse = run_kernel(inp)
        assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


def test_a_cache_of_one_page_whatever_its_page_stride(requires_hopper):
    """A V3.2 cache of one page (the pages of a paged cache laid end to end, so the same
    indices address the same tokens) whose page stride, never used, is not a multiple
    of 16 bytes: the same results."""
    inp = make_sparse_decode_inputs(4, 2, 64, 300, 128, 16, seed=5, device=requires_hopper)
    expected = run_kernel(inp)
    num_blocks, page_size, _, bytes_per_token = inp.k_cache.shape
    tokens = page_bytes(inp.k_cache).reshape(-1)
    inp.k_cache = tokens.as_strided((1, num_blocks * page_size, 1, bytes_per_token),
                                    (7, bytes_per_token, bytes_per_token, 1))
    out, lse = run_kernel(inp)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


@pytest.mark.parametrize("layout,h_q", [(V32, 64), (V32, 128), (MODEL1, 64)], ids=["V3.2-h64", "V3.2-h128", "MODEL1"])
def test_out_of_range_indices_are_ignored(requires_hopper, layout, h_q):
    # In the main cache and, for MODEL1, the extra one; 128 heads take the pair kernel.
    extra = dict(extra_topk=128, extra_page_size=8) if layout is MODEL1 else {}
    inp = make_sparse_decode_inputs(4, 1, h_q, 300, 128, 16, seed=4, layout=layout, varlen=False,
                                    device=requires_hopper, **extra)
    caches = [(inp.indices, inp.k_cache)] + ([(inp.extra_indices, inp.extra_k_cache)] if extra else [])
    for indices, cache in caches:
        num_tokens = cache.shape[0] * cache.shape[1]
        indices[..., 64:80] = num_tokens
        indices[..., 80:96] = 2**31 - 1
        indices[..., 96:112] = -(2**31)
    check(inp)


@pytest.mark.parametrize("layout", [V32, MODEL1], ids=lambda layout: layout.name)
def test_topk_lengths_past_topk_or_negative_count_as_topk_or_0(requires_hopper, layout):
    # Not checked on the GPU (a host synchronization): the reference's rule, an entry
    # counts where its position is below the length.
    extra = dict(extra_topk=128, extra_page_size=8) if layout is MODEL1 else {}
    inp = make_sparse_decode_inputs(4, 2, 64, 300, 128, 16, seed=6, layout=layout, with_sink=True,
                                    device=requires_hopper, **extra)
    lengths = torch.tensor([-3, 128 + 50, -(2**31), 2**31 - 1], dtype=torch.int32, device=requires_hopper)
    inp.topk_length = lengths
    if extra:
        inp.extra_topk_length = lengths.flip(0).contiguous()
    check(inp)


def test_same_refusals_as_on_the_cpu(requires_hopper):
    for device in ("cpu", requires_hopper):
        inp = make_sparse_decode_inputs(2, 1, 64, 100, 64, 8, seed=1, device=device)
        plan, _ = get_mla_metadata()
        with pytest.raises(ValueError, match="causal must be False with indices"):
            flash_mla_with_kvcache(inp.q, inp.k_cache, None, None, 512, plan, causal=True, is_fp8_kvcache=True,
                                   indices=inp.indices)
        with pytest.raises(TypeError, match="indices must have dtype torch.int32"):
            flash_mla_with_kvcache(inp.q, inp.k_cache, None, None, 512, plan, is_fp8_kvcache=True,
                                   indices=inp.indices.long())


def test_cuda_graph_capture(requires_hopper):
    inp = make_sparse_decode_inputs(8, 2, 128, 500, 256, 64, seed=8, with_sink=True, device=requires_hopper)
    plan, _ = get_mla_metadata()

    def step():
        return flash_mla_with_kvcache(inp.q, inp.k_cache, None, None, 512, plan, softmax_scale=inp.softmax_scale,
                                      is_fp8_kvcache=True, indices=inp.indices, attn_sink=inp.attn_sink)

    eager = step()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])


@pytest.mark.parametrize("h_q", [64, 128])
@pytest.mark.parametrize("b, topk", [(132, 64), (1, 2048)], ids=["whole", "split"])
def test_a_nan_key_gives_nan_out_and_lse(requires_hopper, b, topk, h_q):
    """A valid token whose bytes read back NaN (the quantizers make a group holding inf or
    NaN do so): every row that sees it gets NaN out and NaN lse, as in the reference, in a
    query token decoded whole and in one split across SMs; the other rows are unchanged."""
    inp = make_sparse_decode_inputs(b, 1, h_q, 4096, topk, 64, seed=4, device=requires_hopper)
    token = int(inp.indices[0, 0, 0])
    page = inp.k_cache.shape[1]
    inp.k_cache.view(torch.uint8)[token // page, token % page, 0, :8] = NAN_BYTE
    out, lse = run_kernel(inp)
    exp_out, exp_lse = sparse_mla_reference(inp.q, inp.k_cache, inp.indices, inp.topk_length, inp.attn_sink,
                                            inp.softmax_scale)
    sees_it = exp_lse.isnan()
    assert bool(sees_it[0].all())
    assert torch.equal(lse.isnan(), sees_it)
    assert torch.equal(out.isnan().all(-1), sees_it.transpose(1, 2))
    clean = ~sees_it.transpose(1, 2)
    if clean.any():  # b = 1: its one query token sees the token
        assert cosine_distance(out[clean], exp_out[clean]) < 1e-5
        assert cosine_distance(lse[~sees_it], exp_lse[~sees_it]) < 1e-5


def test_a_batch_past_65535_sequences_with_a_query_token_in_many_shares(requires_hopper):
    # The plan keeps all but the last sequence whole and cuts that one's topk in more
    # than 8 shares, which the staged merge takes: its grid must hold every sequence
    # (on x, the one dimension without a limit of 65535). Every sequence reads the same
    # tokens with the same query, so each must equal one sequence's reference.
    from flashmla_cute.fp8_cache import quantize_v32_kv_cache
    from flashmla_cute.sparse_plan import plan_splits

    h_q, topk = 16, 2048
    device = requires_hopper
    num_sms = runtime.num_sms(device.index)
    b = next(b for b in range(65536, 70000) if plan_splits(b, 1, h_q, topk, num_sms).splits > 8)  # 65605 at 132 SMs
    gen = torch.Generator().manual_seed(12)
    cache = quantize_v32_kv_cache(torch.randn(4, 64, 1, 576, generator=gen).to(device))
    q_one = torch.randn(1, 1, h_q, 576, generator=gen).to(device, torch.bfloat16)
    q = q_one.expand(b, -1, -1, -1).contiguous()
    indices = (torch.arange(topk, dtype=torch.int32, device=device) % 256).view(1, 1, topk).expand(b, 1, topk)
    assert plan_splits(b, 1, h_q, topk, num_sms).whole_batches < b
    out, lse = flash_mla_with_kvcache(q, cache, None, None, 512, get_mla_metadata()[0], softmax_scale=576**-0.5,
                                      is_fp8_kvcache=True, indices=indices)
    ref_out, ref_lse = sparse_mla_reference(q_one, cache, indices[:1], None, None, 576**-0.5)
    for i in (0, b - 1):  # a whole sequence, and the one in shares
        assert cosine_distance(out[i:i + 1], ref_out) < 1e-5
        assert cosine_distance(lse[i:i + 1], ref_lse) < 1e-5
