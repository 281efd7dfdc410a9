"""Merging the partial results of split sequences into ``out`` and ``lse``.

The decode kernel writes, for every fragment of a sequence that the scheduler split
over several SM parts, the fragment's normalized output ``O_k`` (in the output's 16-bit
dtype, ``scheduler.PARTIAL_VALUE_BYTES``) and its fp32 log-sum-exp ``L_k`` (``-inf``
when the fragment saw no key of that row). The merged result is
``out = sum_k exp(L_k - L) O_k`` with ``L = log(sum_k exp(L_k))``.

Every split sequence is merged by ``MlaCombine``, a kernel launched right after the
decode kernel as its programmatic dependent: it spreads each sequence's merge over its
rows (a CTA per row for a batch of one) and each row's fragments over four thread
groups, so that the fragments are read by many SMs with many loads in flight. (The
decode kernel once merged sequences of two fragments itself, in the CTA that finished
last; the combine kernel measured faster also there: b32 sk1024 h128 62 -> 50 us.)
The sparse kernel's query tokens of many fragments are merged by the same class's staged
kernel (``launch_staged``), which brings the fragments' rows into shared memory by bulk
copies rather than into registers, so that all of them are in flight at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, pipeline
from cutlass.cute.nvgpu import cpasync

from ..scheduler import ROWS_PER_TILE
from .utils import WARP_THREADS, accumulators

VEC = 4  # partial values a thread loads at once (8 bytes): a row's piece
THREADS_PER_ROW = 128  # one row's 512 values, as pieces of VEC
COMBINE_FRAGMENT_GROUPS = 4  # thread groups of a combine CTA that read a row's fragments side by side
COMBINE_THREADS = THREADS_PER_ROW * COMBINE_FRAGMENT_GROUPS
# Fragments whose loads a thread of ``MlaCombine`` has in flight: its CTA of 512 threads
# runs alone on an SM, at up to 128 registers a thread, which the warp-per-row merge's 4
# fragments x 16 values a lane take. (The sparse kernel's query tokens of more fragments
# than a thread group merges, GROUP_ROW_FRAGMENTS, go to ``launch_staged``.)
FRAGS_IN_FLIGHT = 8
GROUP_ROW_FRAGMENTS = 8  # a sequence of at most this many fragments is merged a thread group per row
WARPS_PER_CTA = COMBINE_THREADS // WARP_THREADS
WARP_ROW_FRAGMENTS = 4  # a sequence of at most this many fragments is merged a warp per row
# The staged merge (``launch_staged``): a CTA's thread groups take a row each, and the
# rows' fragments come into shared memory by bulk copies, STAGED_ROUND_FRAGMENTS of each
# row at a time (4 rows x 16 fragments x 1 KB: 64 KB).
STAGED_ROWS_PER_CTA = COMBINE_FRAGMENT_GROUPS
STAGED_ROUND_FRAGMENTS = 16
# Combine CTAs launched per CTA of the kernel that wrote the partials (``launch``'s
# ``ctas_per_producer``), measured (benchmarks/NOTES.md, "Small sparse batches" and
# "Where the serving cases below FlashMLA lose"): the dense decode kernel's split
# sequences have few fragments from b = 8 up, lost up to 8% with 6 CTAs and gained up to
# 2.5% with 1 against 2; the sparse kernel's split query tokens have 128-256 rows of
# 9 or more fragments each, merged row by row, and gained 2-8% with a CTA per row.
CTAS_PER_DECODE_CTA = 1
CTAS_PER_SPARSE_CTA = 6
# The combine's preferred L1 / shared-memory split, in percent of the most shared memory:
# the decode kernels' (they use nearly all of it), so that an SM passing from a decode
# CTA to a combine CTA and back keeps its configuration (b1 cases 0.7-1.3% faster than
# the default, which runs the combine at 16 KB; benchmarks/NOTES.md, "The combine's
# loads past a row's last fragment").
SHARED_MEMORY_CARVEOUT_PERCENT = 100


class MlaCombine:
    """The merge of split sequences, as a kernel of its own.

    Launched as the decode kernel's programmatic dependent, it is scheduled while the
    decode kernel drains. Grid ``(slots, h_kv, row_groups)``: slot ``j`` takes the
    sequences ``j, j + slots, ...`` (``slots = min(b, num_parts)``), and of each one
    it merges, row group ``g``'s share of the rows (``first_row``). The row groups
    are as many as give about ``ctas_per_producer`` CTAs per CTA of the kernel that
    wrote the partials (which ran about one per SM) in all, so that the one sequence
    of a batch of one is merged by as many CTAs as it has rows, while a large batch
    does not launch waves of CTAs with nothing to merge; where a sequence's rows are
    few, no more than fit in one wave.

    A CTA reads the fragment counts before it waits for the decode kernel (the plan
    was complete before the decode kernel let this one launch: the dense decode kernel
    does so only once its own wait for the kernel before it has returned); only a CTA
    with a sequence to merge waits (``griddepcontrol.wait``), and CTA (0, 0, 0) always
    does, so that this kernel never completes before the one it depends on.

    A CTA is ``COMBINE_FRAGMENT_GROUPS`` groups of 128 threads, each thread one 8-byte
    piece of a row, summing fragments with a running maximum, ``FRAGS_IN_FLIGHT``
    fragments' loads at a time. A sequence of very few fragments (at most
    ``WARP_ROW_FRAGMENTS``) has each warp merge rows of its own; one of few (at most
    ``GROUP_ROW_FRAGMENTS``) has each group merge rows of its own, ``FRAGS_IN_FLIGHT``
    fragments' loads at once; one of many has all the groups read each row's fragments
    side by side (group ``f`` the fragments ``f``, ``f + groups``, ... in runs of
    ``FRAGS_IN_FLIGHT``), then combines the groups' sums through shared memory.

    Static configuration: output dtype and ``head_dim_v``.
    """

    def __init__(self, dtype, head_dim_v: int = 512):
        if THREADS_PER_ROW * VEC != head_dim_v:
            raise ValueError(f"head_dim_v must be {THREADS_PER_ROW * VEC}, got {head_dim_v}")
        self.dtype = dtype
        self.head_dim_v = head_dim_v

    @cute.jit
    def __call__(
        self,
        mAccum: cute.Tensor,  # partial results as utils.accumulators lays them out
        mMeta: cute.Tensor,  # (num_parts, 8) int32, see scheduler.py
        mNumSplits: cute.Tensor,  # (b + 1,) int32
        mO: cute.Tensor,  # (b, s_q, h_q, dv)
        mLse: cute.Tensor,  # (b, h_q, s_q) fp32
        heads_per_kv: Int32,
        stream,
    ):
        """The merge alone, over a workspace in the decode kernel's layout (for tests)."""
        rows = mO.shape[1] * heads_per_kv
        h_kv = mO.shape[2] // heads_per_kv
        num_acc = mO.shape[0] + mMeta.shape[0]
        mOAccum, mLseAccum = accumulators(mAccum, num_acc, h_kv, rows, self.head_dim_v, self.dtype)
        num_m_tiles = (rows + ROWS_PER_TILE - 1) // ROWS_PER_TILE
        self.launch(mOAccum, mLseAccum, mNumSplits, mO, mLse, mLse, Int32(0), heads_per_kv,
                    mMeta.shape[0] * num_m_tiles, CTAS_PER_DECODE_CTA, stream, False)

    @cute.jit
    def launch(self, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, mNumSplits: cute.Tensor, mO: cute.Tensor,
               mLse: cute.Tensor, mSink: cute.Tensor, has_sink: Int32, heads_per_kv: Int32, producer_ctas: Int32,
               ctas_per_producer: cutlass.Constexpr, stream, after_producer: cutlass.Constexpr):
        """Launch on ``stream``: sequence ``i``'s fragments are ``mNumSplits[i] ..
        mNumSplits[i + 1] - 1`` of ``mOAccum`` / ``mLseAccum``; with ``has_sink``, each
        row's output is scaled by ``exp(lse) / (exp(lse) + exp(mSink[head]))``.
        ``producer_ctas``: how many CTAs of the kernel that wrote the partials ran at
        once (about the SM count), which with ``ctas_per_producer`` sizes the grid (see
        the class). ``after_producer``: launched
        as that kernel's programmatic dependent, right after it."""
        rows = mOAccum.shape[2]
        num_slots = cutlass.max(cutlass.min(mO.shape[0], producer_ctas), 1)
        budget = ctas_per_producer * producer_ctas
        row_groups = cutlass.max(cutlass.min((budget + num_slots - 1) // num_slots, rows), 1)
        one_wave = cutlass.max(budget // num_slots, 1)
        if rows <= one_wave * WARPS_PER_CTA:
            # Few rows a sequence: a warp or less per row already with the row groups
            # of one wave, so no CTA waits for a second one.
            row_groups = cutlass.min(row_groups, one_wave)
        self.kernel(mOAccum, mLseAccum, mNumSplits, mO, mLse, mSink, has_sink, heads_per_kv, num_slots,
                    row_groups).launch(
            grid=[num_slots, mOAccum.shape[1], row_groups], block=[COMBINE_THREADS, 1, 1], stream=stream,
            use_pdl=after_producer, preferred_smem_carveout=SHARED_MEMORY_CARVEOUT_PERCENT,
            min_blocks_per_mp=1,
        )

    @cute.kernel
    def kernel(
        self,
        mOAccum: cute.Tensor,
        mLseAccum: cute.Tensor,
        mNumSplits: cute.Tensor,
        mO: cute.Tensor,
        mLse: cute.Tensor,
        mSink: cute.Tensor,
        has_sink: Int32,
        heads_per_kv: Int32,
        num_slots: Int32,
        row_groups: Int32,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        slot, kv_head, row_group = cute.arch.block_idx()

        @cute.struct
        class Storage:
            group_max: cute.struct.MemRange[Float32, COMBINE_FRAGMENT_GROUPS]
            group_sum: cute.struct.MemRange[Float32, COMBINE_FRAGMENT_GROUPS]
            group_acc: cute.struct.Align[
                cute.struct.MemRange[Float32, COMBINE_FRAGMENT_GROUPS * THREADS_PER_ROW * VEC], 16]

        storage = cutlass.memory.SmemAllocator().allocate(Storage)
        groups = GroupPartials(
            storage.group_max.get_tensor(cute.make_layout((COMBINE_FRAGMENT_GROUPS,))),
            storage.group_sum.get_tensor(cute.make_layout((COMBINE_FRAGMENT_GROUPS,))),
            storage.group_acc.get_tensor(cute.make_layout((COMBINE_FRAGMENT_GROUPS, THREADS_PER_ROW, VEC),
                                                          stride=(THREADS_PER_ROW * VEC, VEC, 1))),
        )
        barrier = pipeline.NamedBarrier(barrier_id=1, num_threads=COMBINE_THREADS)
        if (slot == 0) & (kv_head == 0) & (row_group == 0):
            cute.arch.griddepcontrol_wait()
        group = tidx // THREADS_PER_ROW
        piece_idx = tidx % THREADS_PER_ROW
        rows = mOAccum.shape[2]
        for batch in cutlass.range(slot, mO.shape[0], num_slots, unroll=1):
            first = mNumSplits[batch]
            num_frags = mNumSplits[batch + 1] - first
            if num_frags > 1:
                # The decode kernel's partials are complete past this point.
                cute.arch.griddepcontrol_wait()
                if num_frags <= WARP_ROW_FRAGMENTS:
                    # Very few (a large batch's split sequences): a warp per row, so that
                    # the CTA has 16 rows in flight rather than 4.
                    warp, lane = tidx // WARP_THREADS, tidx % WARP_THREADS
                    for row in cutlass.range(first_row(row_group, row_groups, warp, WARPS_PER_CTA, rows), rows,
                                             row_groups * WARPS_PER_CTA, unroll=1):
                        self.merge_row_by_warp(mOAccum, mLseAccum, mO, mLse, mSink, has_sink, lane, batch,
                                               kv_head, row, first, num_frags, heads_per_kv)
                elif num_frags <= GROUP_ROW_FRAGMENTS:
                    # Few fragments: each thread group merges rows of its own, a row's
                    # loads in runs of FRAGS_IN_FLIGHT (all at once at one CTA an SM), with
                    # no shared memory and no barrier.
                    for row in cutlass.range(first_row(row_group, row_groups, group, COMBINE_FRAGMENT_GROUPS, rows),
                                             rows, row_groups * COMBINE_FRAGMENT_GROUPS, unroll=1):
                        acc, row_max, total = self.sum_fragments(mOAccum, mLseAccum, kv_head, row, first, num_frags,
                                                                 0, 1, piece_idx)
                        self.store_row(mO, mLse, mSink, has_sink, acc, row_max, total, batch, kv_head, row,
                                       heads_per_kv, piece_idx)
                else:
                    # Many: the groups read a row's fragments side by side.
                    for row in cutlass.range(row_group, rows, row_groups, unroll=1):
                        self.merge_row_by_all_groups(mOAccum, mLseAccum, mO, mLse, mSink, has_sink, groups, barrier,
                                                     group, piece_idx, batch, kv_head, row, first, num_frags,
                                                     heads_per_kv)

    @cute.jit
    def sum_fragments(self, mOAccum, mLseAccum, kv_head, row, first, num_frags, group, num_groups: cutlass.Constexpr,
                      piece_idx):
        """This thread's piece of one row, summed over the fragments ``group``,
        ``group + num_groups``, ... (``FRAGS_IN_FLIGHT`` consecutive ones at a
        time) with weights ``exp(lse_k - row_max)``: returns (the weighted sum, row_max,
        the sum of the weights)."""
        running_max = -Float32.inf
        running_sum = Float32(0.0)
        acc = cute.make_rmem_tensor((VEC,), Float32)
        acc.fill(0.0)
        step = num_groups * FRAGS_IN_FLIGHT
        for k0 in cutlass.range(group * FRAGS_IN_FLIGHT, num_frags, step, unroll=1):
            # All loads first (the merge is bound by their latency); fragments past the
            # last are not read (they would double the bytes of a run's last loads)
            # and weigh 0.
            pieces = cute.make_rmem_tensor((FRAGS_IN_FLIGHT, VEC), Float32)
            lses = cute.make_rmem_tensor((FRAGS_IN_FLIGHT,), Float32)
            pieces.fill(0.0)
            for f in cutlass.range_constexpr(FRAGS_IN_FLIGHT):
                if k0 + f < num_frags:
                    k = first + k0 + f
                    lses[f] = mLseAccum[k, kv_head, row]
                    piece = cute.local_tile(mOAccum[k, kv_head, row, None], (VEC,), (piece_idx,)).load()
                    piece = piece.to(Float32)
                    for e in cutlass.range_constexpr(VEC):
                        pieces[f, e] = piece[e]
            running_max, running_sum = fold_fragments(acc, running_max, running_sum, lses, pieces, k0, num_frags)
        return acc, running_max, running_sum

    @cute.jit
    def merge_row_by_warp(self, mOAccum, mLseAccum, mO, mLse, mSink, has_sink, lane, batch, kv_head, row, first,
                          num_frags, heads_per_kv):
        """Merge one row of a sequence of at most ``WARP_ROW_FRAGMENTS`` fragments with one
        warp: lane ``l`` takes the row's 8-byte pieces ``l, l + 32, ...``, and every
        fragment's loads are issued at once (the slots past the last fragment are not
        read and weigh 0)."""
        pieces_per_lane = THREADS_PER_ROW // WARP_THREADS
        # A lane's pieces side by side: value e of piece i at i * VEC + e.
        pieces = cute.make_rmem_tensor((WARP_ROW_FRAGMENTS, pieces_per_lane * VEC), Float32)
        lses = cute.make_rmem_tensor((WARP_ROW_FRAGMENTS,), Float32)
        pieces.fill(0.0)
        for f in cutlass.range_constexpr(WARP_ROW_FRAGMENTS):
            if f < num_frags:
                k = first + f
                lses[f] = mLseAccum[k, kv_head, row]
                for i in cutlass.range_constexpr(pieces_per_lane):
                    piece = cute.local_tile(mOAccum[k, kv_head, row, None], (VEC,), (lane + WARP_THREADS * i,)).load()
                    piece = piece.to(Float32)
                    for e in cutlass.range_constexpr(VEC):
                        pieces[f, i * VEC + e] = piece[e]
        acc = cute.make_rmem_tensor((pieces_per_lane * VEC,), Float32)
        acc.fill(0.0)
        row_max, total = fold_fragments(acc, -Float32.inf, Float32(0.0), lses, pieces, 0, num_frags)
        for i in cutlass.range_constexpr(pieces_per_lane):
            self.store_row(mO, mLse, mSink, has_sink, cute.local_tile(acc, (VEC,), (i,)), row_max, total, batch,
                           kv_head, row, heads_per_kv, lane + WARP_THREADS * i)

    @cute.jit
    def merge_row_by_all_groups(self, mOAccum, mLseAccum, mO, mLse, mSink, has_sink, groups, barrier, group,
                                piece_idx, batch, kv_head, row, first, num_frags, heads_per_kv):
        """Merge one row's ``num_frags`` partials with every thread group of the CTA:
        each group sums its share of the fragments, group 0 combines the groups' sums."""
        acc, running_max, running_sum = self.sum_fragments(mOAccum, mLseAccum, kv_head, row, first, num_frags, group,
                                                           COMBINE_FRAGMENT_GROUPS, piece_idx)
        # Every thread of a group holds the same maximum and sum.
        if piece_idx == 0:
            groups.max[group] = running_max
            groups.sum[group] = running_sum
        cute.autovec_copy(acc, groups.acc[group, piece_idx, None])
        barrier.arrive_and_wait()
        if group == 0:
            row_max = -Float32.inf
            for g in cutlass.range_constexpr(COMBINE_FRAGMENT_GROUPS):
                row_max = cute.arch.fmax(row_max, groups.max[g])
            ref = finite_or_zero(row_max)
            total = Float32(0.0)
            out = cute.make_rmem_tensor((VEC,), Float32)
            out.fill(0.0)
            for g in cutlass.range_constexpr(COMBINE_FRAGMENT_GROUPS):
                weight = cute.math.exp(groups.max[g] - ref, fastmath=True)
                total = total + groups.sum[g] * weight
                part = groups.acc[g, piece_idx, None].load()
                for e in cutlass.range_constexpr(VEC):
                    out[e] = out[e] + weight * part[e]
            self.store_row(mO, mLse, mSink, has_sink, out, row_max, total, batch, kv_head, row, heads_per_kv,
                           piece_idx)
        # The shared partials are read before the next row overwrites them.
        barrier.arrive_and_wait()

    @cute.jit
    def launch_staged(self, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, mNumSplits: cute.Tensor, mO: cute.Tensor,
                      mLse: cute.Tensor, mSink: cute.Tensor, has_sink: Int32, heads_per_kv: Int32, stream):
        """The merge of sequences of many fragments with the fragments' rows staged in
        shared memory: the bytes a thread waits for are not held in its registers, so
        that all of a CTA's fragments are in flight at once and the merge costs one round
        trip to L2 (``STAGED_ROUND_FRAGMENTS`` fragments a round), however many rows an SM
        takes. Launched on ``stream`` as the programmatic dependent of the kernel before
        it (the arguments as ``launch``'s).

        Grid ``(b, h_kv, row blocks)``: CTA ``(q, h, i)`` merges rows
        ``STAGED_ROWS_PER_CTA i ..`` of KV head ``h`` of sequence ``q`` (nothing where
        that sequence is whole), thread group ``g`` row ``g`` of them, a thread one
        8-byte piece; CTA (0, 0, 0) always waits for the kernel before it. The batch is
        on x, the one dimension without a limit of 65535 (sparse batches are not capped)."""
        rows = mOAccum.shape[2]
        row_blocks = (rows + STAGED_ROWS_PER_CTA - 1) // STAGED_ROWS_PER_CTA
        self.staged_kernel(mOAccum, mLseAccum, mNumSplits, mO, mLse, mSink, has_sink, heads_per_kv).launch(
            grid=[mO.shape[0], mOAccum.shape[1], row_blocks], block=[COMBINE_THREADS, 1, 1], stream=stream,
            use_pdl=True, min_blocks_per_mp=1,
        )

    @cute.kernel
    def staged_kernel(self, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, mNumSplits: cute.Tensor, mO: cute.Tensor,
                      mLse: cute.Tensor, mSink: cute.Tensor, has_sink: Int32, heads_per_kv: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        batch, kv_head, row_block = cute.arch.block_idx()
        dv = self.head_dim_v
        row_bytes = dv * self.dtype.width // 8

        @cute.struct
        class Storage:
            landed: cute.struct.MemRange[cutlass.Int64, 1]
            rows: cute.struct.Align[
                cute.struct.MemRange[self.dtype, STAGED_ROUND_FRAGMENTS * STAGED_ROWS_PER_CTA * dv], 128]

        storage = cutlass.memory.SmemAllocator().allocate(Storage)
        landed = storage.landed.data_ptr()
        # (fragment of the round, row of the CTA, value)
        staged = storage.rows.get_tensor(cute.make_layout((STAGED_ROUND_FRAGMENTS, STAGED_ROWS_PER_CTA, dv),
                                                           stride=(STAGED_ROWS_PER_CTA * dv, dv, 1)))
        row_copy = cute.make_copy_atom(cpasync.CopyBulkG2SOp(), self.dtype, num_bits_per_copy=dv * self.dtype.width)
        if tidx == 0:
            cute.arch.mbarrier_init(landed, 1)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        rows = mOAccum.shape[2]
        first_row = row_block * STAGED_ROWS_PER_CTA
        cta_rows = cutlass.min(rows - first_row, STAGED_ROWS_PER_CTA)
        first = mNumSplits[batch]
        num_frags = mNumSplits[batch + 1] - first
        if (row_block == 0) & (kv_head == 0) & (batch == 0):
            cute.arch.griddepcontrol_wait()
        if num_frags > 1:
            # The decode kernel's partials are complete past this point.
            cute.arch.griddepcontrol_wait()
            group = tidx // THREADS_PER_ROW
            piece_idx = tidx % THREADS_PER_ROW
            row = first_row + group
            running_max = -Float32.inf
            running_sum = Float32(0.0)
            acc = cute.make_rmem_tensor((VEC,), Float32)
            acc.fill(0.0)
            phase = Int32(0)
            for k0 in cutlass.range(0, num_frags, STAGED_ROUND_FRAGMENTS, unroll=1):
                round_frags = cutlass.min(num_frags - k0, STAGED_ROUND_FRAGMENTS)
                if tidx < 32:
                    # The first warp: its first lane arms the barrier for the round's
                    # bytes, then every lane issues copies of its own, one (fragment,
                    # row) of 1 KB each (bulk copies are not elected).
                    if tidx == 0:
                        cute.arch.mbarrier_arrive_and_expect_tx(landed, round_frags * cta_rows * row_bytes)
                    cute.arch.sync_warp()
                    for c in cutlass.range(tidx, round_frags * cta_rows, 32, unroll=1):
                        f = c // cta_rows
                        r = c - f * cta_rows
                        cute.copy(row_copy, mOAccum[first + k0 + f, kv_head, first_row + r, None], staged[f, r, None],
                                  mbar_ptr=landed)
                # The log-sum-exps, read while the rows land.
                pieces = cute.make_rmem_tensor((STAGED_ROUND_FRAGMENTS, VEC), Float32)
                lses = cute.make_rmem_tensor((STAGED_ROUND_FRAGMENTS,), Float32)
                pieces.fill(0.0)
                for f in cutlass.range_constexpr(STAGED_ROUND_FRAGMENTS):
                    lses[f] = -Float32.inf
                    if (f < round_frags) & (group < cta_rows):
                        lses[f] = mLseAccum[first + k0 + f, kv_head, row]
                cute.arch.mbarrier_wait(landed, phase)
                phase = phase ^ 1
                if group < cta_rows:
                    for f in cutlass.range_constexpr(STAGED_ROUND_FRAGMENTS):
                        if f < round_frags:
                            piece = cute.local_tile(staged[f, group, None], (VEC,), (piece_idx,)).load().to(Float32)
                            for e in cutlass.range_constexpr(VEC):
                                pieces[f, e] = piece[e]
                    running_max, running_sum = fold_fragments(acc, running_max, running_sum, lses, pieces, k0,
                                                              num_frags)
                # Every thread has read the round's rows before the next round's copies.
                cute.arch.sync_threads()
            if group < cta_rows:
                self.store_row(mO, mLse, mSink, has_sink, acc, running_max, running_sum, batch, kv_head, row,
                               heads_per_kv, piece_idx)

    @cute.jit
    def store_row(self, mO, mLse, mSink, has_sink, acc, row_max, total, batch, kv_head, row, heads_per_kv,
                  piece_idx):
        """``acc / total`` (this thread's piece of the row) into ``mO``; the row's
        log-sum-exp ``row_max + log(total)`` into ``mLse``. An attention sink adds
        ``exp(sink - row_max)`` to the output's divisor only."""
        s = row // heads_per_kv
        head = kv_head * heads_per_kv + (row - s * heads_per_kv)
        # Every fragment empty for this row: it sees no key (FlashMLA: out 0, lse +inf).
        # A NaN total (the NaN partials of a sequence longer than its block table holds,
        # decode_sm90's epilogue) takes the other branch: out and lse NaN, as for a whole
        # such sequence.
        inv_total = Float32(0.0)
        lse = Float32.inf
        if total != 0.0:
            ref = finite_or_zero(row_max)
            lse = ref + cute.math.log(total, fastmath=False)
            divisor = total
            if has_sink != 0:
                # +inf sink gives 0, -inf leaves the output as it is.
                divisor = total + cute.math.exp(mSink[head] - ref, fastmath=False)
            inv_total = 1.0 / divisor
        out_piece = cute.make_rmem_tensor((VEC,), self.dtype)
        for e in cutlass.range_constexpr(VEC):
            out_piece[e] = (acc[e] * inv_total).to(self.dtype)
        cute.autovec_copy(out_piece, cute.local_tile(mO[batch, s, head, None], (VEC,), (piece_idx,)))
        if piece_idx == 0:
            mLse[batch, head, s] = lse


@dataclass(frozen=True)  # frozen: the DSL's loops read it without carrying it
class GroupPartials:
    """Shared memory of a combine CTA: each fragment group's running maximum, its sum
    of weights relative to that maximum, and its weighted sum of the row's pieces."""

    max: cute.Tensor  # (groups,)
    sum: cute.Tensor  # (groups,)
    acc: cute.Tensor  # (groups, THREADS_PER_ROW, VEC)


@cute.jit
def fold_fragments(acc: cute.Tensor, running_max: Float32, running_sum: Float32, lses: cute.Tensor,
                   pieces: cute.Tensor, first_frag, num_frags):
    """Fold fragments ``first_frag + f`` of a row (log-sum-exp ``lses[f]``, values
    ``pieces[f, j]`` for ``acc[j]``; those at or past ``num_frags`` weigh 0) into a running
    weighted sum: ``acc`` and the sum of weights are rescaled to the new maximum, then
    each fragment is added with weight ``exp(lse - ref)``. Returns the new maximum and
    sum of weights."""
    new_max = running_max
    for f in cutlass.range_constexpr(cute.size(lses)):
        if first_frag + f >= num_frags:
            lses[f] = -Float32.inf
        new_max = cute.arch.fmax(new_max, lses[f])
    ref = finite_or_zero(new_max)
    rescale = cute.math.exp(running_max - ref, fastmath=True)
    running_sum = running_sum * rescale
    for j in cutlass.range_constexpr(cute.size(acc)):
        acc[j] = acc[j] * rescale
    for f in cutlass.range_constexpr(cute.size(lses)):
        weight = cute.math.exp(lses[f] - ref, fastmath=True)
        running_sum = running_sum + weight
        for j in cutlass.range_constexpr(cute.size(acc)):
            acc[j] = acc[j] + weight * pieces[f, j]
    return new_max, running_sum


@cute.jit
def first_row(row_group, row_groups, unit, units_per_cta: cutlass.Constexpr, rows):
    """The first row that merging unit ``unit`` (a warp or a thread group) of a CTA of row
    group ``row_group`` takes; it then takes every ``row_groups * units_per_cta``-th.
    Where one pass of all the row groups' units covers the rows, they are dealt out row
    group by row group (row ``r`` to group ``r % row_groups``), so that every CTA of the
    sequence has some and none has many; otherwise each row group takes consecutive
    runs of ``units_per_cta`` rows, so that the last-launched groups, which may wait for
    a second wave, have the fewest."""
    first = row_group * units_per_cta + unit
    if rows <= row_groups * units_per_cta:
        first = unit * row_groups + row_group
    return first


@cute.jit
def finite_or_zero(x: Float32) -> Float32:
    """A maximum to subtract before ``exp``: ``x``, or 0 when no value was finite
    (``-inf - -inf`` would be NaN)."""
    ref = x
    if x == -Float32.inf:
        ref = Float32(0.0)
    return ref
