"""GPU version of the split-KV plan (``scheduler.plan_torch`` is the specification).

One warp walks the batch in chunks of 32 sequences, twice: once to total the cost,
once with warp-wide prefix sums to place every part boundary that falls inside each
sequence's cost interval. Each boundary and each fragment count has a closed form, so
no thread waits on another beyond the prefix sums; the kernel reads ``cache_seqlens``
on the device and never synchronizes with the host (it can be captured in a CUDA
graph).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from ..scheduler import (
    BEGIN_BATCH,
    BEGIN_BLOCK,
    BEGIN_SPLIT,
    BLOCK_SIZE,
    BLOCKS_PER_FRAGMENT_MERGE,
    END_BATCH,
    END_BLOCK,
    FIXED_OVERHEAD_BLOCKS,
    METADATA_INTS,
    MIN_PAYLOAD,
    MIN_PAYLOAD_SHORT,
    SHORT_SEQUENCE_BLOCKS,
)


@cute.jit
def _warp_inclusive_sum(x: Int32, lane: Int32) -> Int32:
    for offset in cutlass.range_constexpr(5):
        y = cute.arch.shuffle_sync_up(x, offset=1 << offset)
        if lane >= (1 << offset):
            x = x + y
    return x


class MlaMetadata:
    """Computes ``(tile_scheduler_metadata, num_splits)`` from ``cache_seqlens``."""

    @cute.jit
    def __call__(self, mSeqlens: cute.Tensor, mMeta: cute.Tensor, mNumSplits: cute.Tensor, stream):
        self.kernel(mSeqlens, mMeta, mNumSplits).launch(grid=[1, 1, 1], block=[32, 1, 1], stream=stream)

    @cute.jit
    def num_blocks(self, mSeqlens: cute.Tensor, i: Int32) -> Int32:
        return cutlass.max((mSeqlens[i] + BLOCK_SIZE - 1) // BLOCK_SIZE, 1)

    @cute.jit
    def payload(self, total: Int32, num_parts: Int32, b: Int32) -> Int32:
        """``scheduler.payload_of``, with the same integer result."""
        per_sequence = (total + BLOCKS_PER_FRAGMENT_MERGE * b - 1) // (BLOCKS_PER_FRAGMENT_MERGE * b)
        # ceil(sqrt(x)) exactly: the float estimate is off by at most one either way.
        root = Int32(cute.math.sqrt(Float32(per_sequence)))
        if root * root < per_sequence:
            root = root + 1
        if (root - 1) * (root - 1) >= per_sequence:
            root = root - 1
        if root * root < per_sequence:
            root = root + 1
        least = Int32(MIN_PAYLOAD)
        if total <= (FIXED_OVERHEAD_BLOCKS + SHORT_SEQUENCE_BLOCKS) * b:
            least = Int32(MIN_PAYLOAD_SHORT)
        return cutlass.max((total + num_parts - 1) // num_parts, root, least)

    @cute.jit
    def write_empty(self, mMeta: cute.Tensor, p: Int32, b: Int32):
        mMeta[p, BEGIN_BATCH] = b
        mMeta[p, BEGIN_BLOCK] = 0
        mMeta[p, END_BATCH] = b - 1
        mMeta[p, END_BLOCK] = 0
        for c in cutlass.range_constexpr(BEGIN_SPLIT, METADATA_INTS):
            mMeta[p, c] = 0

    @cute.kernel
    def kernel(self, mSeqlens: cute.Tensor, mMeta: cute.Tensor, mNumSplits: cute.Tensor):
        lane, _, _ = cute.arch.thread_idx()
        b = mSeqlens.shape[0]
        num_parts = mMeta.shape[0]
        F = FIXED_OVERHEAD_BLOCKS

        total = Int32(0)
        for base in cutlass.range(0, b, 32, unroll=1):
            i = base + lane
            if i < b:
                total = total + self.num_blocks(mSeqlens, i) + F
        total = cute.arch.warp_reduction(total, lambda x, y: x + y)
        payload = self.payload(total, num_parts, b)

        if lane == 0:
            mNumSplits[0] = 0
        carry_cost = Int32(0)
        carry_frags = Int32(0)
        prev_n = Int32(0)
        for base in cutlass.range(0, b, 32, unroll=1):
            i = base + lane
            n = Int32(0)
            cost = Int32(0)
            if i < b:
                n = self.num_blocks(mSeqlens, i)
                cost = n + F
            cost_incl = _warp_inclusive_sum(cost, lane)
            begin = carry_cost + cost_incl - cost  # C_i
            lo = begin + F  # cost position of block 0
            frags = Int32(0)
            if i < b:
                frags = 1 + (lo + n - 1) // payload - lo // payload
            frags_incl = _warp_inclusive_sum(frags, lane)
            n_prev = cute.arch.shuffle_sync_up(n, offset=1)
            if lane == 0:
                n_prev = prev_n
            if i < b:
                mNumSplits[i + 1] = carry_frags + frags_incl
                # Parts whose first cost unit p * payload lies in [C_i, C_i + cost).
                p_first = (begin + payload - 1) // payload
                p_last = cutlass.min((begin + cost - 1) // payload, num_parts - 1)
                for p in cutlass.range(p_first, p_last + 1, unroll=1):
                    x = p * payload
                    block = cutlass.max(x - lo, 0)
                    if (p + 1) * payload <= lo:
                        # The next part also begins in this sequence's overhead: p is empty.
                        self.write_empty(mMeta, p, b)
                    else:
                        mMeta[p, BEGIN_BATCH] = i
                        mMeta[p, BEGIN_BLOCK] = block
                        split = Int32(0)
                        if block > 0:
                            split = p - lo // payload
                        mMeta[p, BEGIN_SPLIT] = split
                        for c in cutlass.range_constexpr(BEGIN_SPLIT + 1, METADATA_INTS):
                            mMeta[p, c] = 0
                    # Close part p - 1 where p begins (unless p - 1 was empty).
                    if p >= 1 and not (block == 0 and x - payload >= begin):
                        if block > 0:
                            mMeta[p - 1, END_BATCH] = i
                            mMeta[p - 1, END_BLOCK] = block
                        else:
                            mMeta[p - 1, END_BATCH] = i - 1
                            mMeta[p - 1, END_BLOCK] = n_prev
            carry_cost = carry_cost + cute.arch.shuffle_sync(cost_incl, 31)
            carry_frags = carry_frags + cute.arch.shuffle_sync(frags_incl, 31)
            prev_n = cute.arch.shuffle_sync(n, 31)

        # Parts that begin at or past the total cost are empty; the last one before closes the batch.
        parts_used = (total + payload - 1) // payload
        if lane == 0:
            mMeta[parts_used - 1, END_BATCH] = b - 1
            mMeta[parts_used - 1, END_BLOCK] = self.num_blocks(mSeqlens, b - 1)
        for p in cutlass.range(parts_used + lane, num_parts, 32, unroll=1):
            self.write_empty(mMeta, p, b)
