"""Invariants of the split-KV plan (scheduler.plan_torch), the specification the GPU
metadata kernel is tested against.

For sequence lengths L_i the work list is every (batch i, block k) with
k < n_i = max(ceil(L_i / 64), 1), batch-major; F = FIXED_OVERHEAD_BLOCKS, the total
cost T = sum(n_i + F), and each of P parts gets a contiguous piece of the list."""

import random

import pytest
import torch

from flashmla_cute import scheduler
from flashmla_cute.scheduler import (
    BEGIN_BATCH,
    BEGIN_BLOCK,
    BEGIN_SPLIT,
    END_BATCH,
    END_BLOCK,
    FIXED_OVERHEAD_BLOCKS as F,
    METADATA_INTS,
    part_fragments,
    plan_blocks,
)


def test_a_sequence_counts_its_pages_and_an_empty_one_counts_one():
    assert plan_blocks([0, 1, 63, 64, 65, 128, 129]) == [1, 1, 1, 1, 2, 2, 3]


def test_a_part_row_reads_as_its_fragments():
    blocks = [5, 7, 9, 4, 6]
    row = [1, 3, 3, 2, 1, 0, 0, 0]  # from batch 1 block 3 to batch 3 before block 2, split 1
    assert part_fragments(row, blocks) == [(1, 3, 7), (2, 0, 9), (3, 0, 2)]
    assert part_fragments([4, 2, 4, 5, 0, 0, 0, 0], blocks) == [(4, 2, 5)]
    assert part_fragments([5, 0, 4, 0, 0, 0, 0, 0], blocks) == []  # an empty part: (b, 0, b - 1, 0, 0)


def check_plan(seqlens, num_parts):
    seqlens = torch.as_tensor(seqlens, dtype=torch.int32)
    meta, num_splits = scheduler.plan_torch(seqlens, num_parts)
    b = seqlens.numel()
    blocks = plan_blocks(seqlens.tolist())
    total = sum(blocks) + F * b
    payload = scheduler.payload_of(total, num_parts, b)
    largest = scheduler.balanced_fragment_blocks(blocks, num_parts, payload)  # 0: packed or the walk
    packed = (not largest and b <= scheduler.PACKED_MAX_BATCH
              and scheduler.packed_parts(blocks, payload + F, scheduler.empty_rows(b, num_parts)) is not None)

    assert meta.dtype == torch.int32 and meta.shape == (num_parts, METADATA_INTS)
    assert num_splits.dtype == torch.int32 and num_splits.shape == (b + 1,)
    assert (meta[:, BEGIN_SPLIT + 1:] == 0).all()  # reserved columns

    # Walk the parts in order: the pieces must chain through every block of every
    # sequence exactly once, in order.
    next_batch, next_block = 0, 0
    touching = [0] * b  # parts that touch each sequence so far
    for p in range(num_parts):
        row = meta[p].tolist()
        pieces = part_fragments(row, blocks)
        if not pieces:
            assert row == [b, 0, b - 1, 0, 0, 0, 0, 0], (p, row)
            continue
        assert 0 <= row[BEGIN_BATCH] <= row[END_BATCH] < b, (p, row)
        assert row[BEGIN_SPLIT] == touching[row[BEGIN_BATCH]], (p, row)
        for batch, lo, hi in pieces:
            assert lo < hi <= blocks[batch], (p, row)
            assert (batch, lo) == (next_batch, next_block), (p, row, next_batch, next_block)
            next_batch, next_block = (batch + 1, 0) if hi == blocks[batch] else (batch, hi)
            touching[batch] += 1
        work_blocks = sum(hi - lo for _, lo, hi in pieces)
        if largest:
            # Balanced: one fragment a part, of at most ``largest`` blocks, and a
            # sequence's fragments differ by at most one block.
            assert len(pieces) == 1 and work_blocks <= largest <= payload + scheduler.BALANCED_SLACK_BLOCKS, (p, row)
            batch = pieces[0][0]
            k = -(-blocks[batch] // largest)
            assert work_blocks in (blocks[batch] // k, -(-blocks[batch] // k)), (p, row, k)
        elif packed:
            # Packed: whole sequences, at most one F over the walk's budget.
            assert all(lo == 0 and hi == blocks[batch] for batch, lo, hi in pieces), (p, row)
            assert work_blocks + F * len(pieces) <= payload + 2 * F, (p, work_blocks, len(pieces), payload)
        else:
            assert work_blocks <= payload, (p, work_blocks, payload)
            assert work_blocks + F * len(pieces) <= payload + F, (p, work_blocks, len(pieces), payload)
    assert (next_batch, next_block) == (b, 0), "some blocks are not covered"

    splits = num_splits.tolist()
    assert splits[0] == 0
    counts = [splits[i + 1] - splits[i] for i in range(b)]
    assert counts == touching
    assert min(counts) >= 1
    assert splits[-1] <= b + num_parts - 1
    return meta, num_splits


def block_list(seqlens, meta):
    """Every (batch, block) pair the plan assigns, in part order."""
    blocks = plan_blocks(seqlens)
    out = []
    for row in meta.tolist():
        for batch, lo, hi in part_fragments(row, blocks):
            out.extend((batch, k) for k in range(lo, hi))
    return out


def test_hand_worked_example():
    # n = [1, 1, 2, 30], costs n + 4 = [5, 5, 6, 34], T = 50, P = 4: payload 13, budget
    # 17 a part. Part 0 takes sequences 0, 1 and 2 whole (5 + 5 + 6 = 16); the 1 unit
    # left is not more than F. Part 1 cannot hold sequence 3 (34): it takes 17 - 4 = 13
    # blocks of it. Part 2: the rest (17 blocks + 4) does not fit either: 13 more. Part
    # 3, the last, takes what is left (4 blocks). Sequence 3 has three fragments.
    assert F == 4
    meta, num_splits = scheduler.plan_torch(torch.tensor([0, 64, 65, 1920], dtype=torch.int32), 4)
    assert meta.tolist() == [
        [0, 0, 2, 2, 0, 0, 0, 0],
        [3, 0, 3, 13, 0, 0, 0, 0],
        [3, 13, 3, 26, 1, 0, 0, 0],
        [3, 26, 3, 30, 2, 0, 0, 0],
    ]
    assert num_splits.tolist() == [0, 1, 2, 3, 6]


def test_equal_sequences_that_fit_a_part_are_not_split():
    # b = 128 sequences of 8192 tokens (128 blocks, cost 132) on 132 parts: payload
    # ceil(16896 / 132) = 128, budget 132. Each part takes one sequence whole, with
    # nothing left, so it stops there. 4 parts stay empty; nothing is merged.
    b, parts = 128, 132
    meta, num_splits = check_plan([8192] * b, parts)
    assert meta[:b].tolist() == [[i, 0, i, 128, 0, 0, 0, 0] for i in range(b)]
    assert meta[b:].tolist() == [[b, 0, b - 1, 0, 0, 0, 0, 0]] * (parts - b)
    assert num_splits.tolist() == list(range(b + 1))


def test_short_sequences_are_not_spread_thin():
    # n = [2, 1], costs [6, 5], T = 11 over P = 8 parts: ceil(T / P) would be 2, but
    # sequences of at most 2 blocks on average (T <= (4 + 2) b) give parts at least
    # MIN_PAYLOAD_SHORT = 4. One fragment a sequence fits the parts (a balanced plan):
    # part 0 takes the first sequence, part 1 the second; the rest are empty.
    assert scheduler.MIN_PAYLOAD_SHORT == 4
    meta, num_splits = scheduler.plan_torch(torch.tensor([100, 10], dtype=torch.int32), 8)
    empty = [2, 0, 1, 0, 0, 0, 0, 0]
    assert meta.tolist() == [[0, 0, 0, 2, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0, 0, 0]] + [empty] * 6
    assert num_splits.tolist() == [0, 1, 2]


def test_a_part_takes_at_least_min_payload():
    # n = [4, 1], costs [8, 5], T = 13 > (4 + 2) b over P = 8 parts: payload
    # MIN_PAYLOAD = 2. ceil(4 / 2) + 1 = 3 fragments fit the parts (a balanced plan):
    # the first sequence in two fragments of 2 blocks, the second whole.
    assert scheduler.MIN_PAYLOAD == 2
    meta, num_splits = scheduler.plan_torch(torch.tensor([200, 10], dtype=torch.int32), 8)
    empty = [2, 0, 1, 0, 0, 0, 0, 0]
    assert meta.tolist() == [[0, 0, 0, 2, 0, 0, 0, 0], [0, 2, 0, 4, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0, 0, 0]] + [empty] * 5
    assert num_splits.tolist() == [0, 2, 3]


def test_balanced_plan_cuts_sequences_evenly():
    # n = [16, 16] (1024 tokens each) over P = 8 parts: T = 40, payload 5. The walk would
    # cut each sequence 5 + 5 + 5 + 1 (three pairs of blocks on the longest part);
    # ceil(16 / 5) = 4 fragments a sequence fit the 8 parts, so each goes 4 + 4 + 4 + 4,
    # one fragment a part.
    meta, num_splits = check_plan([1024, 1024], 8)
    assert meta.tolist() == [[i, 4 * j, i, 4 * j + 4, j, 0, 0, 0] for i in range(2) for j in range(4)]
    assert num_splits.tolist() == [0, 4, 8]


def test_balanced_plan_takes_one_block_of_slack():
    # n = [9, 9, 9] over P = 5: T = 39, payload 8, and 2 fragments a sequence (6) do not
    # fit; at 8 + BALANCED_SLACK_BLOCKS = 9 each sequence is one fragment on a part of its
    # own, where the walk would have split two of them over parts of 8 blocks.
    assert scheduler.BALANCED_SLACK_BLOCKS == 1
    meta, num_splits = check_plan([576] * 3, 5)
    empty = [3, 0, 2, 0, 0, 0, 0, 0]
    assert meta.tolist() == [[i, 0, i, 9, 0, 0, 0, 0] for i in range(3)] + [empty] * 2
    assert num_splits.tolist() == [0, 1, 2, 3]


def test_packed_plan_keeps_every_sequence_whole():
    # n = [30] * 7 over P = 4: T = 238, payload 60, budget 64. The walk would fit one
    # sequence (34) and split the next after 26 blocks; one F more (68) holds two whole
    # sequences, so the parts go 2 + 2 + 2 + 1 and nothing is merged. (A balanced plan
    # would need 7 parts.)
    meta, num_splits = check_plan([1920] * 7, 4)
    assert meta.tolist() == [[2 * p, 0, min(2 * p + 1, 6), 30, 0, 0, 0, 0] for p in range(4)]
    assert num_splits.tolist() == list(range(8))


@pytest.mark.parametrize("b", [scheduler.PACKED_MAX_BATCH, scheduler.PACKED_MAX_BATCH + 1])
def test_packing_is_tried_for_batches_up_to_packed_max_batch(b):
    # n = [30] * b (costs 34) over P = 141: payload 62, budget 66. The walk takes one
    # sequence and 66 - 34 - F = 28 blocks of the next; one F more (70) holds two whole
    # sequences, so up to PACKED_MAX_BATCH = 256 sequences the parts go two by two
    # (129 parts of 141); past it the walk decides.
    assert scheduler.PACKED_MAX_BATCH == 256
    meta, num_splits = check_plan([1920] * b, 141)
    packed = num_splits.tolist() == list(range(b + 1))
    assert packed == (b <= scheduler.PACKED_MAX_BATCH)
    first_part = [0, 0, 1, 30, 0, 0, 0, 0] if packed else [0, 0, 1, 28, 0, 0, 0, 0]
    assert meta[0].tolist() == first_part


def test_fragment_blocks():
    # 10 blocks in 4 fragments: 3, 3, 2, 2.
    assert [scheduler.fragment_blocks(10, 4, j) for j in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


@pytest.mark.parametrize(
    "total,parts,batch,payload",
    [(20, 132, 1, 2), (260, 132, 1, 3), (2064, 132, 4, 16), (160, 66, 8, 3), (16896, 132, 128, 128), (6, 132, 1, 4),
     (8196, 1024, 1, 17)],
)
def test_payload_fills_the_parts_or_balances_blocks_against_merges(total, parts, batch, payload):
    # max(ceil(T / P), ceil(sqrt(ceil(T / 32b))), 2 (4 for sequences of 2 blocks or
    # fewer, T = 6)): b = 1 with 16 blocks (T = 20) takes
    # 2 a part; with 256 blocks (T = 260), 3; 8192 blocks (T = 8196) over 1024 parts, 17
    # rather than 9; larger batches fill the parts.
    assert scheduler.payload_of(total, parts, batch) == payload


@pytest.mark.parametrize("x", list(range(0, 200)) + [2**24 - 1, 2**24, 2**24 + 1, 2**31 - 1])
def test_isqrt_ceil(x):
    s = scheduler.isqrt_ceil(x)
    assert s * s >= x and (s == 0 or (s - 1) * (s - 1) < x)


def test_one_part_takes_everything():
    meta, num_splits = scheduler.plan_torch(torch.tensor([5, 0, 200], dtype=torch.int32), 1)
    assert meta.tolist() == [[0, 0, 2, 4, 0, 0, 0, 0]]
    assert num_splits.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "seqlens",
    [[0], [1], [64], [65], [0, 0, 0], [1, 0, 1], [4097, 1, 0, 63, 64, 65], [128] * 7],
)
@pytest.mark.parametrize("num_parts", [1, 2, 3, 5, 8, 13, 40])
def test_small_plans_cover_each_block_once_in_order(seqlens, num_parts):
    meta, _ = check_plan(seqlens, num_parts)
    expected = [(i, k) for i, n in enumerate(plan_blocks(seqlens)) for k in range(n)]
    assert block_list(seqlens, meta) == expected


def random_lengths(rng, b):
    kind = rng.randrange(6)
    if kind == 0:
        return [rng.randrange(0, 3) for _ in range(b)]  # 0, 1 and 2 tokens
    if kind == 1:
        return [rng.randrange(0, 300) for _ in range(b)]
    if kind == 2:
        return [rng.randrange(0, 20000) for _ in range(b)]
    if kind == 3:
        return [rng.choice([0, 1, 63, 64, 65, 8192]) for _ in range(b)]
    if kind == 4:
        return [max(int(rng.gauss(4096, 2048)), 1) for _ in range(b)]
    return [rng.randrange(1, 10)] * b  # all equal


def test_random_plans():
    rng = random.Random(1234)
    for _ in range(150):
        b = rng.choice([1, 2, 3, 7, 31, 64, 128, 500])
        check_plan(random_lengths(rng, b), rng.randint(1, 200))


@pytest.mark.parametrize("num_parts", [1, 66, 132, 200])
def test_large_batch(num_parts):
    rng = random.Random(num_parts)
    check_plan([rng.randrange(0, 5000) for _ in range(10000)], num_parts)


@pytest.mark.parametrize("num_parts", [1, 2, 7, 132, 200])
def test_one_huge_sequence(num_parts):
    # 2**31 - 1 tokens, the most an int32 length can say: 33554432 blocks, split across
    # every part (a balanced plan: ceil(n / payload) fragments fit), in fragments that
    # differ by at most one block.
    length = 2**31 - 1
    meta, num_splits = check_plan([length], num_parts)
    assert num_splits.tolist() == [0, num_parts]
    n = plan_blocks([length])
    sizes = [hi - lo for row in meta.tolist() for _, lo, hi in part_fragments(row, n)]
    assert len(sizes) == num_parts
    assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1


def test_huge_sequence_among_short_ones():
    check_plan([1, 0, 3_000_000, 5, 64, 0], 132)


def test_plan_follows_the_tensor_device_and_dtype():
    seqlens = torch.tensor([100, 200], dtype=torch.int32)
    meta, num_splits = scheduler.plan_torch(seqlens, 3)
    assert meta.device == seqlens.device and num_splits.device == seqlens.device


@pytest.mark.parametrize(
    "num_sms,rows,h_kv,expected",
    [(132, 16, 1, 132), (132, 64, 1, 132), (132, 128, 1, 66), (132, 256, 1, 33), (132, 16, 4, 33), (132, 64, 200, 1)],
)
def test_num_sm_parts(num_sms, rows, h_kv, expected):
    assert scheduler.num_sm_parts(num_sms, rows, h_kv) == expected


def test_split_workspace_holds_16_bit_partials_then_fp32_log_sum_exps():
    # The kernels view one fp32 workspace as partial outputs of PARTIAL_VALUE_BYTES each
    # (the output's dtype), then one fp32 log-sum-exp per partial row.
    b, num_parts, h_kv, rows, dv = 3, 5, 2, 24, 512
    values = scheduler.split_workspace_values(b, num_parts, h_kv, rows, dv)
    assert values == (b + num_parts) * h_kv * rows * dv
    elems = scheduler.split_workspace_elems(b, num_parts, h_kv, rows, dv)
    assert elems * 4 == values * scheduler.PARTIAL_VALUE_BYTES + (b + num_parts) * h_kv * rows * 4
