"""GPU version of the split-KV plan (``scheduler.plan_torch`` is the specification).

One warp totals the cost, then fills the parts in order as the specification does:
for each part, the lanes look at the next 32 sequences at once, and a prefix sum of
their costs with a ballot tells how many of them fit whole (one step, or one more per
32 sequences a part holds). The kernel reads ``cache_seqlens`` on the device and never
synchronizes with the host (it can be captured in a CUDA graph).
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
        budget = self.payload(total, num_parts, b) + F  # what one part may take, overheads included

        if lane == 0:
            mNumSplits[0] = 0
        # Where the next part begins, and how many fragments the sequences before it have.
        batch = Int32(0)
        block = Int32(0)
        split = Int32(0)  # fragments of ``batch`` so far
        frags_before = Int32(0)
        for p in cutlass.range(num_parts, unroll=1):
            if batch >= b:
                if lane == 0:
                    self.write_empty(mMeta, p, b)
            else:
                begin_batch = batch
                begin_block = block
                begin_split = split
                left = budget
                if p == num_parts - 1:
                    left = total + F  # the last part takes the rest
                # The rest of this sequence, then whole sequences while they fit, 32 at a time.
                more = True
                while more:
                    i = batch + lane
                    cost = Int32(0)
                    if i < b:
                        cost = self.num_blocks(mSeqlens, i) + F
                    if lane == 0:
                        cost = cost - block
                    cost_incl = _warp_inclusive_sum(cost, lane)
                    fits = i < b and cost_incl <= left
                    whole = cute.arch.popc(cute.arch.vote_ballot_sync(fits))  # a prefix of the lanes
                    if fits:
                        mNumSplits[i + 1] = frags_before + split + 1 + lane
                    if whole > 0:
                        left = left - cute.arch.shuffle_sync(cost_incl, whole - 1)
                        frags_before = frags_before + split + whole
                        batch = batch + whole
                        block = Int32(0)
                        split = Int32(0)
                    more = whole == 32 and batch < b
                end_batch = batch - 1
                end_block = Int32(0)
                if batch > 0:
                    end_block = self.num_blocks(mSeqlens, batch - 1)
                if batch < b and left > F:
                    # Split the next sequence after ``left - F`` of its blocks.
                    block = block + left - F
                    split = split + 1
                    end_batch = batch
                    end_block = block
                if lane == 0:
                    mMeta[p, BEGIN_BATCH] = begin_batch
                    mMeta[p, BEGIN_BLOCK] = begin_block
                    mMeta[p, END_BATCH] = end_batch
                    mMeta[p, END_BLOCK] = end_block
                    mMeta[p, BEGIN_SPLIT] = begin_split
                    for c in cutlass.range_constexpr(BEGIN_SPLIT + 1, METADATA_INTS):
                        mMeta[p, c] = 0
