"""GPU version of the split-KV plan (``scheduler.plan_torch`` is the specification).

One CTA. Its threads turn ``cache_seqlens`` into the prefix sums of the sequences'
costs, ``PLAN_CHUNK`` sequences at a time, in shared memory; then one warp fills the
parts in order, as the specification does, reading only shared memory:

- a part ends where its budget does, ``target`` on the cost line (the sum of the costs
  before it, plus its budget);
- a part that starts inside a sequence which does not end by ``target`` (most parts at
  small batches) splits it again with no memory access at all;
- otherwise the 32 lanes compare the next 32 sequences' cost ends with ``target`` and a
  ballot counts those that fit whole (one step, or one more per 32 sequences a part holds).

When the walk reaches the end of the chunk in shared memory, it stops where it is, the
CTA loads the next chunk, and the walk goes on. The specification's other two plans:

- a balanced plan needs no walk: where there are no more sequences than parts, the CTA
  counts the fragments it would need for each largest fragment it may take, and if they
  fit, each thread writes the rows of its sequences' fragments, their first part found
  with a prefix sum of the fragment counts;
- a packed plan is the walk with one F more a part and no split (``walk``'s packing
  mode), tried first for batches of at most ``PACKED_MAX_BATCH`` sequences (one chunk);
  where it does not place every sequence, the walk starts over.

The kernel reads ``cache_seqlens`` on the device and never synchronizes with the host
(it can be captured in a CUDA graph). Costs and their sums are 64-bit: lengths no cache
can hold (up to 2**31 - 1 tokens each, garbage included) still give the specification's
plan, which the decode kernel reads nothing past the block table for.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float64, Int32, Int64, const_expr

from ..scheduler import (
    BALANCED_SLACK_BLOCKS,
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
    PACKED_MAX_BATCH,
    SHORT_SEQUENCE_BLOCKS,
)
from .utils import WARP_THREADS

PLAN_THREADS = 1024
PLAN_CHUNK = PLAN_THREADS  # sequences whose cost ends are in shared memory at once: one a thread
PLAN_WARPS = PLAN_THREADS // WARP_THREADS
assert PACKED_MAX_BATCH <= PLAN_CHUNK  # a packed attempt walks the first chunk only


@cute.jit
def _warp_inclusive_sum(x, lane: Int32):
    for offset in cutlass.range_constexpr(WARP_THREADS.bit_length() - 1):  # log2 of the warp's width
        y = cute.arch.shuffle_sync_up(x, offset=1 << offset)
        if lane >= (1 << offset):
            x = x + y
    return x


class MlaMetadata:
    """Computes ``(tile_scheduler_metadata, num_splits)`` from ``cache_seqlens``."""

    @cute.jit
    def __call__(self, mSeqlens: cute.Tensor, mMeta: cute.Tensor, mNumSplits: cute.Tensor, stream):
        self.kernel(mSeqlens, mMeta, mNumSplits).launch(grid=[1, 1, 1], block=[PLAN_THREADS, 1, 1], stream=stream)

    @cute.jit
    def num_blocks(self, mSeqlens: cute.Tensor, i: Int32) -> Int32:
        """``scheduler.plan_blocks``: in 64 bits, as a length near 2**31 would wrap."""
        return Int32(cutlass.max((Int64(mSeqlens[i]) + BLOCK_SIZE - 1) // BLOCK_SIZE, Int64(1)))

    @cute.jit
    def sequence_blocks(self, mSeqlens: cute.Tensor, blocks: cute.Tensor, i: Int32, tidx: Int32) -> Int32:
        """Sequence ``i``'s block count (``i = first + tidx`` of a chunk's ``first``):
        from the first chunk's copy in shared memory where the batch fits one chunk."""
        n = Int32(0)
        if mSeqlens.shape[0] <= PLAN_CHUNK:
            n = blocks[tidx]
        else:
            n = self.num_blocks(mSeqlens, i)
        return n

    @cute.jit
    def payload(self, total: Int64, num_parts: Int32, b: Int32) -> Int64:
        """``scheduler.payload_of``, with the same integer result."""
        per_sequence = (total + BLOCKS_PER_FRAGMENT_MERGE * b - 1) // (BLOCKS_PER_FRAGMENT_MERGE * b)
        # ceil(sqrt(x)) exactly: the float estimate is off by at most one either way.
        root = Int64(cute.math.sqrt(Float64(per_sequence)))
        if root * root < per_sequence:
            root = root + 1
        if (root - 1) * (root - 1) >= per_sequence:
            root = root - 1
        if root * root < per_sequence:
            root = root + 1
        least = Int64(MIN_PAYLOAD)
        if total <= (FIXED_OVERHEAD_BLOCKS + SHORT_SEQUENCE_BLOCKS) * Int64(b):
            least = Int64(MIN_PAYLOAD_SHORT)
        return cutlass.max((total + num_parts - 1) // num_parts, root, least)

    @cute.jit
    def block_sum(self, x: Int64, warp_sums: cute.Tensor, tidx: Int32) -> Int64:
        """The sum of ``x`` over the CTA, in every thread."""
        x = cute.arch.warp_reduction(x, lambda u, v: u + v)
        if tidx % WARP_THREADS == 0:
            warp_sums[tidx // WARP_THREADS] = x
        cute.arch.sync_threads()
        x = cute.arch.warp_reduction(warp_sums[tidx % WARP_THREADS], lambda u, v: u + v)
        cute.arch.sync_threads()  # warp_sums may be written again
        return x

    @cute.jit
    def block_inclusive_sum(self, x: Int64, warp_sums: cute.Tensor, tidx: Int32):
        """(the sum of ``x`` over threads ``0 .. tidx``, its sum over the CTA)."""
        lane = tidx % WARP_THREADS
        incl = _warp_inclusive_sum(x, lane)
        if lane == WARP_THREADS - 1:
            warp_sums[tidx // WARP_THREADS] = incl
        cute.arch.sync_threads()
        warp_incl = _warp_inclusive_sum(warp_sums[lane], lane)
        warp_before = cute.arch.shuffle_sync(warp_incl - warp_sums[lane], tidx // WARP_THREADS)
        cta_total = cute.arch.shuffle_sync(warp_incl, PLAN_WARPS - 1)
        cute.arch.sync_threads()  # warp_sums may be written again
        return warp_before + incl, cta_total

    @cute.jit
    def load_chunk(self, mSeqlens: cute.Tensor, cost_end: cute.Tensor, blocks: cute.Tensor, warp_sums: cute.Tensor,
                   tidx: Int32, first: Int32, cost_before: Int64):
        """Sequence ``first + t``'s block count into ``blocks[t]`` and the end of its cost
        on the whole cost line (``cost_before`` + the costs of the chunk up to it) into
        ``cost_end[t]``; past the batch, costs are 0."""
        i = first + tidx
        n = Int32(0)
        if i < mSeqlens.shape[0]:
            n = self.num_blocks(mSeqlens, i)
        cost = Int64(n) + FIXED_OVERHEAD_BLOCKS if i < mSeqlens.shape[0] else Int64(0)
        incl, _ = self.block_inclusive_sum(cost, warp_sums, tidx)
        cost_end[tidx] = cost_before + incl
        blocks[tidx] = n
        cute.arch.sync_threads()

    @cute.jit
    def balanced_fragment_blocks(self, mSeqlens: cute.Tensor, blocks: cute.Tensor, warp_sums: cute.Tensor,
                                 tidx: Int32, num_parts: Int32, payload: Int64) -> Int64:
        """``scheduler.balanced_fragment_blocks``, in every thread."""
        largest = Int64(0)
        for slack in cutlass.range_constexpr(BALANCED_SLACK_BLOCKS + 1):
            m = payload + slack
            needed = Int64(0)
            for i in cutlass.range(tidx, mSeqlens.shape[0], PLAN_THREADS, unroll=1):
                needed = needed + (self.sequence_blocks(mSeqlens, blocks, i, tidx) + m - 1) // m
            needed = self.block_sum(needed, warp_sums, tidx)
            if (largest == 0) & (needed <= num_parts):
                largest = m
        return largest

    @cute.jit
    def write_balanced_plan(self, mSeqlens: cute.Tensor, mMeta: cute.Tensor, mNumSplits: cute.Tensor,
                            blocks: cute.Tensor, warp_sums: cute.Tensor, tidx: Int32, largest: Int64) -> Int32:
        """The balanced plan's rows and ``num_splits``: thread ``t`` writes those of
        sequences ``t``, ``t + PLAN_THREADS``, ...; returns the parts it fills."""
        parts_before = Int32(0)  # parts of the sequences of the chunks before
        for first in cutlass.range(0, mSeqlens.shape[0], PLAN_THREADS, unroll=1):
            i = first + tidx
            n = Int32(0)
            k = Int32(0)
            if i < mSeqlens.shape[0]:
                n = self.sequence_blocks(mSeqlens, blocks, i, tidx)
                k = Int32((n + largest - 1) // largest)  # at most n
            incl_wide, chunk_parts_wide = self.block_inclusive_sum(Int64(k), warp_sums, tidx)
            incl, chunk_parts = Int32(incl_wide), Int32(chunk_parts_wide)  # at most the parts
            if i < mSeqlens.shape[0]:
                mNumSplits[i + 1] = parts_before + incl
                size = n // k
                extra = n - size * k  # the first ``extra`` fragments take one block more
                begin = Int32(0)
                for j in cutlass.range(k, unroll=1):
                    end = begin + size
                    if j < extra:
                        end = end + 1
                    p = parts_before + incl - k + j
                    mMeta[p, BEGIN_BATCH] = i
                    mMeta[p, BEGIN_BLOCK] = begin
                    mMeta[p, END_BATCH] = i
                    mMeta[p, END_BLOCK] = end
                    mMeta[p, BEGIN_SPLIT] = j
                    for c in cutlass.range_constexpr(BEGIN_SPLIT + 1, METADATA_INTS):
                        mMeta[p, c] = 0
                    begin = end
            parts_before = parts_before + chunk_parts
        return parts_before

    @cute.jit
    def write_row(self, mMeta: cute.Tensor, lane: Int32, p: Int32, begin_batch: Int32, begin_block: Int32,
                  end_batch: Int32, end_block: Int32, begin_split: Int32):
        """Plan row ``p``, a column a lane."""
        if lane < METADATA_INTS:
            v = Int32(0)
            if lane == BEGIN_BATCH:
                v = begin_batch
            if lane == BEGIN_BLOCK:
                v = begin_block
            if lane == END_BATCH:
                v = end_batch
            if lane == END_BLOCK:
                v = end_block
            if lane == BEGIN_SPLIT:
                v = begin_split
            mMeta[p, lane] = v

    @cute.jit
    def walk(self, mMeta: cute.Tensor, mNumSplits: cute.Tensor, mSeqlens: cute.Tensor, cost_end: cute.Tensor,
             blocks: cute.Tensor, warp_sums: cute.Tensor, walk_state: cute.Tensor, tidx: Int32, total: Int64,
             budget: Int64, packing: cutlass.Constexpr):
        """The plan's rows and ``num_splits`` by the walk (``packing`` False), or by the
        packed plan's walk (whole sequences, ``budget + F`` a part, no last part taking
        the rest); warp 0 walks, from the first chunk of sequences (in shared memory).
        Returns (the parts filled, whether every sequence got its parts)."""
        lane = tidx % WARP_THREADS
        b = mSeqlens.shape[0]
        num_parts = mMeta.shape[0]
        F = FIXED_OVERHEAD_BLOCKS
        # The walk's state (meaningful in warp 0, which alone walks): where the next
        # part begins (sequence ``batch``, block ``block``), the cost ends of sequences
        # ``batch - 1`` and ``batch`` and the blocks of ``batch - 1``, fragments so far.
        p = Int32(0)
        batch = Int32(0)
        block = Int32(0)
        split = Int32(0)  # fragments of ``batch`` so far
        frags_before = Int32(0)  # fragments of the sequences before ``batch``
        prev_end = Int64(0)
        prev_blocks = Int32(0)
        # The part being filled: where it began, and where its budget ends on the cost line.
        in_part = Int32(0)
        target = Int64(0)
        begin_batch = Int32(0)
        begin_block = Int32(0)
        begin_split = Int32(0)

        first = Int32(0)  # the chunk's first sequence
        parts_filled = Int32(0)
        complete = Int32(1)
        more_chunks = True
        while more_chunks:
            last = cutlass.min(b, first + PLAN_CHUNK)  # one past the chunk's last sequence
            stopped = Int32(0)
            failed = Int32(0)
            if tidx < 32:
                cur_end = cost_end[batch - first]  # batch == first: at the start or where the walk stopped
                walking = p < num_parts and batch < b
                while walking:
                    if in_part == 0:
                        begin_batch = batch
                        begin_block = block
                        begin_split = split
                        target = prev_end + block + budget
                        if const_expr(packing):
                            target = target + F  # a split's overhead, which packing saves
                        elif p == num_parts - 1:
                            target = prev_end + block + total + F  # the last part takes the rest
                        in_part = Int32(1)
                    if cur_end <= target:
                        # The rest of this sequence fits, then whole sequences while they do.
                        stepping = True
                        while stepping:
                            i = batch + lane
                            end_i = Int64(0)
                            blocks_i = Int32(0)
                            if i < last:
                                end_i = cost_end[i - first]
                                blocks_i = blocks[i - first]
                            fits = i < last and end_i <= target
                            whole = cute.arch.popc(cute.arch.vote_ballot_sync(fits))  # a prefix of the lanes
                            if fits:
                                mNumSplits[i + 1] = frags_before + split + 1 + lane
                            if whole > 0:
                                prev_end = cute.arch.shuffle_sync(end_i, whole - 1)
                                prev_blocks = cute.arch.shuffle_sync(blocks_i, whole - 1)
                                frags_before = frags_before + split + whole
                                split = Int32(0)
                                block = Int32(0)
                                batch = batch + whole
                            # valid when whole < WARP_THREADS
                            cur_end = cute.arch.shuffle_sync(end_i, whole % WARP_THREADS)
                            stepping = whole == WARP_THREADS and batch < last
                        if batch == last and batch < b:
                            stopped = Int32(1)  # the next sequence's cost end is in the next chunk
                    if stopped == 0:
                        left = target - prev_end - block
                        end_batch = batch - 1  # a part always takes something: batch >= 1
                        end_block = prev_blocks
                        if const_expr(packing):
                            if batch == begin_batch:
                                failed = Int32(1)  # the next sequence does not fit an empty part
                        elif batch < b and left > F:
                            # Split the next sequence after ``left - F`` of its blocks
                            # (fewer than it has: it does not end by ``target``).
                            block = block + Int32(left - F)
                            split = split + 1
                            end_batch = batch
                            end_block = block
                        self.write_row(mMeta, lane, p, begin_batch, begin_block, end_batch, end_block, begin_split)
                        p = p + 1
                        in_part = Int32(0)
                    walking = p < num_parts and batch < b and stopped == 0 and failed == 0
                if tidx == 0:
                    walk_state[0] = stopped
                    walk_state[1] = p
                    walk_state[2] = Int32(batch == b)
            cute.arch.sync_threads()
            more_chunks = walk_state[0] != 0
            parts_filled = walk_state[1]
            complete = walk_state[2]
            cost_before = cost_end[PLAN_CHUNK - 1]
            cute.arch.sync_threads()  # the chunk is read
            if more_chunks:
                first = first + PLAN_CHUNK
                self.load_chunk(mSeqlens, cost_end, blocks, warp_sums, tidx, first, cost_before)
        return parts_filled, complete

    @cute.kernel
    def kernel(self, mSeqlens: cute.Tensor, mMeta: cute.Tensor, mNumSplits: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        b = mSeqlens.shape[0]
        num_parts = mMeta.shape[0]
        F = FIXED_OVERHEAD_BLOCKS

        @cute.struct
        class Storage:
            cost_end: cute.struct.MemRange[Int64, PLAN_CHUNK]
            blocks: cute.struct.MemRange[Int32, PLAN_CHUNK]
            warp_sums: cute.struct.MemRange[Int64, PLAN_WARPS]
            walk_state: cute.struct.MemRange[Int32, 3]  # (walk stopped at the chunk's end, parts filled, done)

        storage = cutlass.memory.SmemAllocator().allocate(Storage)
        cost_end = storage.cost_end.get_tensor(cute.make_layout((PLAN_CHUNK,)))
        blocks = storage.blocks.get_tensor(cute.make_layout((PLAN_CHUNK,)))
        warp_sums = storage.warp_sums.get_tensor(cute.make_layout((PLAN_WARPS,)))
        walk_state = storage.walk_state.get_tensor(cute.make_layout((3,)))

        total = Int64(0)
        if b > PLAN_CHUNK:
            for i in cutlass.range(tidx, b, PLAN_THREADS, unroll=1):
                total = total + self.num_blocks(mSeqlens, i) + F
            total = self.block_sum(total, warp_sums, tidx)
        self.load_chunk(mSeqlens, cost_end, blocks, warp_sums, tidx, Int32(0), Int64(0))
        if b <= PLAN_CHUNK:
            total = cost_end[b - 1]
        payload = self.payload(total, num_parts, b)
        budget = payload + F  # what one part of the walk may take, overheads included
        largest = Int64(0)
        if b <= num_parts:  # else each sequence's fragment alone needs more parts than there are
            largest = self.balanced_fragment_blocks(mSeqlens, blocks, warp_sums, tidx, num_parts, payload)
        if tidx == 0:
            mNumSplits[0] = 0
        parts_filled = Int32(0)
        if largest > 0:
            parts_filled = self.write_balanced_plan(mSeqlens, mMeta, mNumSplits, blocks, warp_sums, tidx, largest)

        # Not balanced: packed if the batch is small enough and every sequence fits
        # whole, else the walk (each from the first chunk of sequences, which a packed
        # attempt, of one chunk, has not left).
        complete = Int32(largest > 0)
        if complete == 0 and b <= PACKED_MAX_BATCH:
            parts_filled, complete = self.walk(mMeta, mNumSplits, mSeqlens, cost_end, blocks, warp_sums, walk_state,
                                               tidx, total, budget, True)
        if complete == 0:
            parts_filled, complete = self.walk(mMeta, mNumSplits, mSeqlens, cost_end, blocks, warp_sums, walk_state,
                                               tidx, total, budget, False)

        # Parts left with nothing to do (the batch ran out first).
        for q in cutlass.range(parts_filled + tidx, num_parts, PLAN_THREADS, unroll=1):
            mMeta[q, BEGIN_BATCH] = b
            mMeta[q, BEGIN_BLOCK] = 0
            mMeta[q, END_BATCH] = b - 1
            mMeta[q, END_BLOCK] = 0
            for c in cutlass.range_constexpr(BEGIN_SPLIT, METADATA_INTS):
                mMeta[q, c] = 0
