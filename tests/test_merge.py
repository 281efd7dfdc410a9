"""merge_attention_states: attention over two disjoint parts of the keys, merged, equals
attention over all of them; empty parts (lse +inf or -inf) contribute nothing."""

import math

import pytest
import torch

from flashmla_cute import merge_attention_states
from flashmla_cute.reference import flash_mla_reference
from flashmla_cute.testing import PAGE_SIZE, DecodeInputs, cosine_distance, make_decode_inputs

DV = 512


def split_at_page(x: DecodeInputs, first_pages: int) -> tuple[DecodeInputs, DecodeInputs]:
    """The same sequences' keys split into the first ``first_pages`` pages of each sequence
    and the rest, as two paged inputs over the same cache."""
    cut = first_pages * PAGE_SIZE
    lens = x.cache_seqlens
    head = DecodeInputs(x.q, x.k_cache, x.block_table[:, :first_pages].contiguous(), lens.clamp(max=cut))
    tail_table = x.block_table[:, first_pages:].contiguous()
    tail = DecodeInputs(x.q, x.k_cache, tail_table, (lens - cut).clamp(min=0))
    return head, tail


def attend(x: DecodeInputs, causal: bool):
    return flash_mla_reference(x.q, x.k_cache, x.block_table, x.cache_seqlens, DV, causal=causal)


@pytest.mark.parametrize("first_pages", [1, 2, 5])
@pytest.mark.parametrize("s_q", [1, 2])
def test_merged_halves_equal_attention_over_the_whole(first_pages, s_q):
    # Lengths cover: both halves non-empty, an empty tail (<= 64 * first_pages), a length
    # of 0 (both halves empty), and a sequence ending exactly on the cut.
    x = make_decode_inputs(5, s_q, 16, seqlens=[300, 40, 0, 130, 64 * first_pages], dtype=torch.float32, seed=3)
    head, tail = split_at_page(x, first_pages)
    whole_out, whole_lse = attend(x, causal=False)

    out, lse = merge_attention_states(*attend(head, causal=False), *attend(tail, causal=False))

    torch.testing.assert_close(out, whole_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, whole_lse, atol=1e-5, rtol=1e-6)
    assert torch.isposinf(lse[2]).all() and (out[2] == 0).all()


def test_causal_tail_with_non_causal_head_equals_causal_whole():
    # With s_q = 2 only the last key is hidden from the first query token: a head that
    # ends before it is seen whole (non-causal), the tail keeps the causal mask.
    s_q = 2
    x = make_decode_inputs(3, s_q, 16, seqlens=[300, 129, 200], dtype=torch.float32, seed=4)
    head, tail = split_at_page(x, 2)
    whole_out, whole_lse = attend(x, causal=True)

    out, lse = merge_attention_states(*attend(head, causal=False), *attend(tail, causal=True))

    torch.testing.assert_close(out, whole_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, whole_lse, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_outputs_merge_within_flashmla_tolerance(dtype):
    x = make_decode_inputs(4, 1, 32, seqlens=[500, 700, 64, 900], dtype=dtype, seed=5)
    head, tail = split_at_page(x, 3)
    whole_out, whole_lse = attend(x, causal=False)

    out, lse = merge_attention_states(*attend(head, causal=False), *attend(tail, causal=False))

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert cosine_distance(out.float(), whole_out.float()) < 1e-5
    assert cosine_distance(lse, whole_lse) < 1e-5


def test_merge_is_symmetric():
    x = make_decode_inputs(2, 2, 16, seqlens=[400, 250], dtype=torch.float32, seed=6)
    a, b = (attend(half, causal=False) for half in split_at_page(x, 2))
    out_ab, lse_ab = merge_attention_states(*a, *b)
    out_ba, lse_ba = merge_attention_states(*b, *a)
    torch.testing.assert_close(out_ab, out_ba)
    torch.testing.assert_close(lse_ab, lse_ba)


def random_state(b=2, s_q=2, h_q=4, dv=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(b, s_q, h_q, dv, generator=gen).to(dtype)
    lse = torch.randn(b, h_q, s_q, generator=gen) * 3
    return out, lse


@pytest.mark.parametrize("empty_lse", [math.inf, -math.inf])
@pytest.mark.parametrize("empty_out", [0.0, math.nan])
def test_an_empty_half_gives_the_other_half(empty_lse, empty_out):
    out, lse = random_state()
    empty = (torch.full_like(out, empty_out), torch.full_like(lse, empty_lse))

    for merged_out, merged_lse in (merge_attention_states(out, lse, *empty), merge_attention_states(*empty, out, lse)):
        torch.testing.assert_close(merged_out, out)
        torch.testing.assert_close(merged_lse, lse)


@pytest.mark.parametrize("lse_a, lse_b", [(math.inf, math.inf), (-math.inf, -math.inf), (math.inf, -math.inf)])
def test_two_empty_halves_give_zero_and_plus_inf(lse_a, lse_b):
    out, lse = random_state()
    out, lse = merge_attention_states(out, torch.full_like(lse, lse_a), out.clone(), torch.full_like(lse, lse_b))
    assert (out == 0).all()
    assert torch.isposinf(lse).all()


def test_rows_are_merged_independently():
    # One row empty in a, another empty in b, the rest regular: each row follows its own rule.
    out_a, lse_a = random_state(seed=1)
    out_b, lse_b = random_state(seed=2)
    lse_a[0, 1, 0] = math.inf
    lse_b[1, 3, 1] = -math.inf
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out[0, 0, 1], out_b[0, 0, 1])
    torch.testing.assert_close(out[1, 1, 3], out_a[1, 1, 3])
    expected = torch.logaddexp(lse_a[1, 0, 0], lse_b[1, 0, 0])
    torch.testing.assert_close(lse[1, 0, 0], expected)


def test_large_lse_values_do_not_overflow():
    out_a, lse_a = random_state(seed=1)
    out_b, lse_b = random_state(seed=2)
    out, lse = merge_attention_states(out_a, lse_a + 1000, out_b, lse_b + 1000)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(lse, torch.logaddexp(lse_a, lse_b) + 1000)


MAX_MERGE_OPERATIONS = 26  # the merge's tensor operations (views included), as written


def count_operations(fn) -> int:
    """How many tensor operations (views included) ``fn()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOperations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    with CountOperations() as ops:
        fn()
    return ops.count


@pytest.mark.parametrize("s_q", [1, 2])
def test_the_merge_is_a_few_tensor_operations_whatever_the_batch(s_q):
    # At decode sizes a merge's time is its operations' launches, not their arithmetic
    # (benchmarks/NOTES.md, "The context-parallel example's exchange and merge"): their
    # number must not grow with the batch or the heads.
    counts = []
    for b, h_q in ((1, 16), (4, 128), (32, 64)):
        out_a, out_b = (torch.randn(b, s_q, h_q, DV, dtype=torch.bfloat16) for _ in range(2))
        lse_a, lse_b = (torch.randn(b, h_q, s_q) for _ in range(2))
        counts.append(count_operations(lambda: merge_attention_states(out_a, lse_a, out_b, lse_b)))
    assert len(set(counts)) == 1 and counts[0] <= MAX_MERGE_OPERATIONS, counts


def _bad(**changes):
    out, lse = random_state()
    args = {"out_a": out, "lse_a": lse, "out_b": out.clone(), "lse_b": lse.clone()}
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args, error, message",
    [
        (_bad(out_a=torch.zeros(2, 2, 4)), ValueError, "out_a must be"),
        (_bad(out_a=torch.zeros(2, 2, 4, 8, dtype=torch.int32)), TypeError, "out_a must have a floating dtype"),
        (_bad(out_b=torch.zeros(2, 2, 4, 9)), ValueError, "out_b must have out_a's shape"),
        (_bad(out_b=torch.zeros(2, 2, 4, 8, dtype=torch.bfloat16)), TypeError, "out_b must have out_a's dtype"),
        (_bad(lse_a=torch.zeros(2, 2, 4)), ValueError, r"lse_a must be \[b, h_q, s_q\] = \(2, 4, 2\)"),
        (_bad(lse_b=torch.zeros(2, 4, 2, dtype=torch.float64)), TypeError, "lse_b must be float32"),
        (_bad(lse_b=torch.zeros(2, 4, 2, device="meta")), ValueError, "lse_b must be on out_a's device"),
        (_bad(out_b=[1.0]), TypeError, "out_b must be a torch.Tensor, got list"),
        (_bad(lse_a=torch.zeros(2, 4, 2).numpy()), TypeError, "lse_a must be a torch.Tensor, got numpy.ndarray"),
        (_bad(out_a=torch.zeros(2, 2, 4, 8).to_sparse()), ValueError, r"out_a must be a strided \(dense\) tensor, got layout torch.sparse_coo"),
        (_bad(lse_b=torch.zeros(2, 4, 2).to_sparse()), ValueError, r"lse_b must be a strided \(dense\) tensor, got layout torch.sparse_coo"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(args, error, message):
    with pytest.raises(error, match=message):
        merge_attention_states(**args)
