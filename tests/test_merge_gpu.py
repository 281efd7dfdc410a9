"""merge_attention_states on a Hopper GPU: one kernel for the results the decode kernels
return (dv 512, 16- and 32-bit floats, rows on 16 bytes), with the tensor operations'
rules and answers; anything else still merges, by the tensor operations."""

import math

import pytest
import torch

from flashmla_cute import merge, merge_attention_states
from flashmla_cute.testing import cosine_distance, make_decode_inputs

from test_fast_path_gpu import raised
from test_merge import attend, count_operations, split_at_page

pytestmark = pytest.mark.gpu

DV = 512


def random_halves(b, s_q, h_q, dtype, device, seed=0, dv=DV):
    """Two (out, lse) results with every kind of row: both halves seen, a half empty
    (lse +inf or -inf, its values NaN), both empty."""
    gen = torch.Generator().manual_seed(seed)
    outs = [torch.randn(b, s_q, h_q, dv, generator=gen).to(dtype) for _ in range(2)]
    lses = [torch.randn(b, h_q, s_q, generator=gen) * 4 for _ in range(2)]
    for out, lse, row, mark in ((outs[0], lses[0], (0, 1, 0), math.inf), (outs[1], lses[1], (0, 2, 0), -math.inf),
                                (outs[0], lses[0], (b - 1, 0, s_q - 1), math.inf)):
        lse[row] = mark
        out[row[0], row[2], row[1]] = math.nan
    lses[1][b - 1, 0, s_q - 1] = -math.inf  # that row empty in both halves
    return [t.to(device) for t in (outs[0], lses[0], outs[1], lses[1])]


def rows_off_16_bytes(out):
    """``out``'s values in a view whose rows are ``dv + 4`` values apart (1032 bytes in
    bf16), so that they do not all start on 16 bytes."""
    wide = torch.randn(*out.shape[:-1], out.shape[-1] + 4, dtype=out.dtype, device=out.device)
    wide[..., :out.shape[-1]] = out
    return wide[..., :out.shape[-1]]


def assert_same_merge(got, expected, dtype):
    """The kernel's result against the tensor operations': the same NaN / inf pattern,
    values within a rounding of the output's dtype (both compute in float32)."""
    (out, lse), (ref_out, ref_lse) = got, expected
    assert out.dtype == ref_out.dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape and lse.is_contiguous()
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2 * ulp, rtol=2 * ulp)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,s_q,h_q", [(1, 1, 16), (3, 2, 128), (5, 1, 64)])
def test_the_kernel_merges_as_the_tensor_operations(requires_hopper, dtype, b, s_q, h_q):
    halves = random_halves(b, s_q, h_q, dtype, requires_hopper, seed=b)
    assert merge._kernel_merges(halves[0], halves[2])

    got = merge_attention_states(*halves)
    expected = merge._merge_with_tensor_operations(*halves)

    assert_same_merge(got, expected, dtype)
    out, lse = got
    assert torch.isfinite(out).all(), "an empty half's NaN values reached the result"
    assert torch.isposinf(lse[b - 1, 0, s_q - 1]) and (out[b - 1, s_q - 1, 0] == 0).all()


def test_the_kernel_is_one_launch(requires_hopper):
    halves = random_halves(4, 1, 128, torch.bfloat16, requires_hopper)
    merge_attention_states(*halves)  # compiled or loaded before counting
    # Two outputs allocated, then the kernel (which torch does not see as an operation).
    assert count_operations(lambda: merge_attention_states(*halves)) <= 2


def test_merged_decode_halves_equal_attention_over_the_whole(requires_hopper):
    x = make_decode_inputs(4, 2, 128, seqlens=[700, 250, 1300, 0], dtype=torch.bfloat16, seed=7,
                           device=requires_hopper)
    head, tail = split_at_page(x, 3)
    halves = [attend(head, causal=False), attend(tail, causal=True)]
    whole_out, whole_lse = attend(x, causal=True)

    out, lse = merge_attention_states(*halves[0], *halves[1])

    assert cosine_distance(out.float(), whole_out.float()) < 1e-5
    assert cosine_distance(lse, whole_lse) < 1e-5


def test_a_nan_lse_gives_a_nan_row_in_both_paths(requires_hopper):
    out_a, lse_a, out_b, lse_b = random_halves(2, 1, 16, torch.bfloat16, requires_hopper)
    lse_a[1, 3, 0] = math.nan
    for out, lse in (merge_attention_states(out_a, lse_a, out_b, lse_b),
                     merge._merge_with_tensor_operations(out_a, lse_a, out_b, lse_b)):
        assert torch.isnan(lse[1, 3, 0]) and torch.isnan(out[1, 0, 3]).all()


@pytest.mark.parametrize("layout", ["other dv", "rows off 16 bytes", "float64"])
def test_what_the_kernel_does_not_take_merges_by_tensor_operations(requires_hopper, layout):
    dtype = torch.float64 if layout == "float64" else torch.bfloat16
    dv = 320 if layout == "other dv" else DV
    out_a, lse_a, out_b, lse_b = random_halves(2, 2, 16, dtype, requires_hopper, dv=dv)
    if layout == "rows off 16 bytes":
        out_a = rows_off_16_bytes(out_a)
    assert not merge._kernel_merges(out_a, out_b)

    got = merge_attention_states(out_a, lse_a, out_b, lse_b)

    assert_same_merge(got, merge._merge_with_tensor_operations(out_a.contiguous(), lse_a, out_b, lse_b), dtype)


def test_the_kernel_merges_under_cuda_graph_replay(requires_hopper):
    halves = random_halves(3, 2, 64, torch.bfloat16, requires_hopper)
    expected = merge_attention_states(*halves)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = merge_attention_states(*halves)
    torch.cuda.current_stream().wait_stream(stream)
    for t in captured:
        t.zero_()

    graph.replay()

    torch.cuda.synchronize()
    assert torch.equal(captured[0], expected[0]) and torch.equal(captured[1], expected[1])


# ------------------------------------------------------------ the fast path
# A configuration the kernel took once goes straight to the compiled kernel on later
# calls; its entry refuses what the Python checks would, and the refused call takes
# the checked path: the same results and the same errors either way.


def test_repeat_calls_skip_the_python_checks(requires_hopper, monkeypatch):
    halves = random_halves(3, 2, 64, torch.bfloat16, requires_hopper)
    expected = merge_attention_states(*halves)

    def refuse(*args):
        raise AssertionError("the checked path ran")

    monkeypatch.setattr(merge, "_check", refuse)
    out, lse = merge_attention_states(*halves)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


def spoiled(halves, case):
    """The good halves with one argument spoiled in a way the configuration's key does
    not see (out_a keeps its shape, dtype and device)."""
    out_a, lse_a, out_b, lse_b = halves
    b, s_q, h_q, dv = out_a.shape
    if case == "out_b other dv":
        out_b = torch.randn(b, s_q, h_q, dv // 2, dtype=out_a.dtype, device=out_a.device)
    elif case == "out_b other dtype":
        out_b = out_b.half()
    elif case == "lse_a other shape":
        lse_a = lse_a[:, :-1]
    elif case == "lse_b float64":
        lse_b = lse_b.double()
    elif case == "lse_b 4-d":
        lse_b = lse_b[..., None]
    elif case == "out_b a list":
        out_b = [1.0]
    return out_a, lse_a, out_b, lse_b


@pytest.mark.parametrize("case", ["out_b other dv", "out_b other dtype", "lse_a other shape", "lse_b float64",
                                  "lse_b 4-d", "out_b a list"])
def test_bad_arguments_after_a_known_configuration_fail_as_the_checks_say(requires_hopper, case):
    halves = random_halves(2, 2, 16, torch.bfloat16, requires_hopper)
    merge_attention_states(*halves)  # the fast path now serves this configuration
    args = spoiled(halves, case)

    expected = raised(merge._check, *args)
    actual = raised(merge_attention_states, *args)

    assert (type(actual), str(actual)) == (type(expected), str(expected))


def test_rows_off_16_bytes_after_a_known_configuration_merge_by_tensor_operations(requires_hopper):
    out_a, lse_a, out_b, lse_b = random_halves(2, 2, 16, torch.bfloat16, requires_hopper)
    merge_attention_states(out_a, lse_a, out_b, lse_b)  # the fast path now serves this configuration
    off = rows_off_16_bytes(out_a)  # out_a's shape, dtype and device

    got = merge_attention_states(off, lse_a, out_b, lse_b)

    assert_same_merge(got, merge._merge_with_tensor_operations(out_a, lse_a, out_b, lse_b), torch.bfloat16)


def test_a_size_one_dimension_may_have_any_stride(requires_hopper):
    # Its stride addresses nothing: the kernel takes such a call whether it comes first
    # (the checked path) or after a known configuration (the fast path, whose compiled
    # entry skips the strides of size-1 dimensions), so the result never depends on
    # which call came first.
    out_a, lse_a, out_b, lse_b = random_halves(1, 2, 16, torch.bfloat16, requires_hopper)
    odd = torch.empty(3 + out_a.numel(), dtype=out_a.dtype, device=out_a.device)
    odd = odd.as_strided(out_a.shape, (out_a.stride(0) + 3, *out_a.stride()[1:]), storage_offset=0)
    odd.copy_(out_a)
    assert merge._kernel_merges(odd, out_b)
    first = merge_attention_states(odd, lse_a, out_b, lse_b)
    known = merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert torch.equal(first[0], known[0]) and torch.equal(first[1], known[1])
