"""Merging the partial results of split sequences into ``out`` and ``lse``.

The decode kernel writes, for every fragment of a sequence that the scheduler split
over several SM parts, the fragment's normalized fp32 output ``O_k`` and its
log-sum-exp ``L_k`` (``-inf`` when the fragment saw no key of that row). The merged
result is ``out = sum_k exp(L_k - L) O_k`` with ``L = log(sum_k exp(L_k))``.

``merge_rows`` is that merge for a range of query rows of one sequence and KV head,
by a group of threads. Who runs it depends on how many fragments a sequence has:

- up to ``MAX_FRAGMENTS_MERGED_IN_DECODE``: the decode kernel's CTA that finishes the
  sequence's last fragment merges the 64-row tile (large batches, where nearly every
  sequence is cut at most once: the merge overlaps other CTAs' work);
- more (small batches, where one sequence is spread over many SMs): ``MlaCombine``, a
  kernel launched right after the decode kernel as its programmatic dependent, spreads
  the merge over ``COMBINE_ROWS``-row groups, so that the many fragments are read by
  many SMs at once instead of one (a lone CTA reads them at a few tens of GB/s: 35 us
  for 16 fragments of a 64-row tile).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, pipeline

from ..scheduler import BEGIN_BATCH, BEGIN_SPLIT
from .utils import accumulators

MAX_FRAGMENTS_MERGED_IN_DECODE = 2
"""Split sequences with at most this many fragments are merged inside the decode kernel."""
VEC = 4  # fp32 values per 16-byte load
COMBINE_THREADS = 128  # one row's 512 values, as 16-byte pieces
COMBINE_ROWS = 2  # query rows per combine CTA: many CTAs share a sequence's merge
COMBINE_FRAGS_IN_FLIGHT = 8  # fragments whose loads a combine thread has in flight
DECODE_MERGE_ROWS_IN_FLIGHT = 8  # rows whose loads a decode thread has in flight (2 fragments at most)


@cute.jit
def merge_rows(
    mOAccum: cute.Tensor,  # (num_acc, h_kv, rows, dv) fp32 partial outputs
    mLseAccum: cute.Tensor,  # (num_acc, h_kv, rows) fp32 partial log-sum-exps
    mO: cute.Tensor,  # (b, s_q, h_q, dv)
    mLse: cute.Tensor,  # (b, h_q, s_q) fp32
    sRowStats: cute.Tensor,  # (>= max_rows, 2) fp32 shared memory
    barrier: pipeline.NamedBarrier,  # the num_threads threads that call this
    tidx: Int32,  # 0 .. num_threads - 1
    batch: Int32,
    kv_head: Int32,
    row0: Int32,  # the rows row0 .. row0 + max_rows - 1 (those below rows_per_kv)
    first: Int32,  # the sequence's fragments are first, first + 1, ...
    num_frags: Int32,
    heads_per_kv: Int32,
    max_rows: cutlass.Constexpr,
    num_threads: cutlass.Constexpr,
    rows_in_flight: cutlass.Constexpr,
    frags_in_flight: cutlass.Constexpr,
    dtype: cutlass.Constexpr,
    head_dim_v: cutlass.Constexpr,
):
    """Merge the ``num_frags`` partial results of up to ``max_rows`` query rows from
    ``row0`` on, of ``(batch, kv_head)``, into ``mO`` and ``mLse``.

    First, each row's merged log-sum-exp, the reference and the normalization of
    the fragment weights (kept in ``sRowStats``); then the weighted sum of the
    fragments' outputs. A thread has ``rows_in_flight * frags_in_flight`` loads in
    flight: many rows for tiles of few fragments (in the decode kernel), many
    fragments for the few rows of a combine CTA.
    """
    rows_per_kv = mOAccum.shape[2]
    tile_rows = cutlass.min(rows_per_kv - row0, max_rows)

    # Row statistics, one warp per row: lanes read the fragments' log-sum-exps side by side.
    lane = tidx % 32
    for r in cutlass.range(tidx // 32, tile_rows, num_threads // 32, unroll=1):
        row = row0 + r
        lse_max = -Float32.inf
        for k in cutlass.range(lane, num_frags, 32, unroll=1):
            lse_max = cute.arch.fmax(lse_max, mLseAccum[first + k, kv_head, row])
        lse_max = cute.arch.warp_reduction(lse_max, cute.arch.fmax)
        # Every fragment empty for this row: it sees no key (FlashMLA: out 0, lse +inf).
        lse_ref = lse_max
        if lse_max == -Float32.inf:
            lse_ref = Float32(0.0)
        total = Float32(0.0)
        for k in cutlass.range(lane, num_frags, 32, unroll=1):
            total = total + cute.math.exp(mLseAccum[first + k, kv_head, row] - lse_ref, fastmath=True)
        total = cute.arch.warp_reduction(total, lambda x, y: x + y)
        inv_total = Float32(0.0)
        lse = Float32.inf
        if total > 0.0:
            inv_total = 1.0 / total
            lse = lse_ref + cute.math.log(total, fastmath=False)
        if lane == 0:
            sRowStats[r, 0] = lse_ref
            sRowStats[r, 1] = inv_total
            s = row // heads_per_kv
            mLse[batch, kv_head * heads_per_kv + (row - s * heads_per_kv), s] = lse
    barrier.arrive_and_wait()

    # Each thread accumulates one 16-byte piece of ``rows_in_flight`` rows, reading
    # ``frags_in_flight`` fragments at a time: all those loads are issued before the
    # first is used (the merge is bound by load latency, not by its few FLOPs).
    threads_per_row = head_dim_v // VEC
    rows_per_step = num_threads // threads_per_row
    piece_idx = tidx % threads_per_row
    row_in_step = tidx // threads_per_row
    rows_per_pass = rows_per_step * rows_in_flight
    for pass_start in cutlass.range(0, tile_rows, rows_per_pass, unroll=1):
        acc = cute.make_rmem_tensor((rows_in_flight, VEC), Float32)
        acc.fill(0.0)
        for k0 in cutlass.range(0, num_frags, frags_in_flight, unroll=1):
            # Rows past the range load its last row, fragments past the last load the
            # last one: both unused.
            pieces = cute.make_rmem_tensor((frags_in_flight, rows_in_flight, VEC), Float32)
            partial_lse = cute.make_rmem_tensor((frags_in_flight, rows_in_flight), Float32)
            for f in cutlass.range_constexpr(frags_in_flight):
                k = first + cutlass.min(k0 + f, num_frags - 1)
                for j in cutlass.range_constexpr(rows_in_flight):
                    row = row0 + cutlass.min(pass_start + row_in_step + j * rows_per_step, tile_rows - 1)
                    partial_lse[f, j] = mLseAccum[k, kv_head, row]
                    piece = cute.local_tile(mOAccum[k, kv_head, row, None], (VEC,), (piece_idx,)).load()
                    for e in cutlass.range_constexpr(VEC):
                        pieces[f, j, e] = piece[e]
            for f in cutlass.range_constexpr(frags_in_flight):
                for j in cutlass.range_constexpr(rows_in_flight):
                    r = cutlass.min(pass_start + row_in_step + j * rows_per_step, tile_rows - 1)
                    weight = cute.math.exp(partial_lse[f, j] - sRowStats[r, 0], fastmath=True) * sRowStats[r, 1]
                    if k0 + f >= num_frags:
                        weight = Float32(0.0)
                    for e in cutlass.range_constexpr(VEC):
                        acc[j, e] = acc[j, e] + weight * pieces[f, j, e]
        for j in cutlass.range_constexpr(rows_in_flight):
            r = pass_start + row_in_step + j * rows_per_step
            if r < tile_rows:
                row = row0 + r
                s = row // heads_per_kv
                out_row = mO[batch, s, kv_head * heads_per_kv + (row - s * heads_per_kv), None]
                out_piece = cute.make_rmem_tensor((VEC,), dtype)
                for e in cutlass.range_constexpr(VEC):
                    out_piece[e] = acc[j, e].to(dtype)
                cute.autovec_copy(out_piece, cute.local_tile(out_row, (VEC,), (piece_idx,)))
    # The caller may reuse sRowStats once every thread is past here.
    barrier.arrive_and_wait()


class MlaCombine:
    """The merge of sequences with many fragments, as a kernel of its own.

    One CTA per (SM part, KV head, group of ``COMBINE_ROWS`` query rows). The part that
    holds a split sequence's last fragment (its plan row begins inside the sequence, at
    the last fragment) merges that sequence, so every split sequence is merged once.
    Launched as the decode kernel's programmatic dependent, its CTAs start while the
    decode kernel drains and wait for it (``griddepcontrol.wait``).

    Static configuration: output dtype, ``head_dim_v`` and ``min_fragments``, the least
    fragment count of a sequence it merges (fewer are the decode kernel's).
    """

    def __init__(self, dtype, head_dim_v: int = 512, min_fragments: int = MAX_FRAGMENTS_MERGED_IN_DECODE + 1):
        if COMBINE_THREADS * VEC != head_dim_v:
            raise ValueError(f"head_dim_v must be {COMBINE_THREADS * VEC}, got {head_dim_v}")
        self.dtype = dtype
        self.head_dim_v = head_dim_v
        if min_fragments < 2:
            raise ValueError(f"min_fragments must be >= 2 (a sequence of one fragment is never merged), got {min_fragments}")
        self.min_fragments = min_fragments

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
        mOAccum, mLseAccum = accumulators(mAccum, num_acc, h_kv, rows, self.head_dim_v)
        self.launch(mOAccum, mLseAccum, mMeta, mNumSplits, mO, mLse, heads_per_kv, stream, False)

    @cute.jit
    def launch(self, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, mMeta: cute.Tensor, mNumSplits: cute.Tensor,
               mO: cute.Tensor, mLse: cute.Tensor, heads_per_kv: Int32, stream, after_decode: cutlass.Constexpr):
        """Launch on ``stream``; ``after_decode``: as the decode kernel's programmatic
        dependent, right after it."""
        rows = mOAccum.shape[2]
        grid = [mMeta.shape[0], mOAccum.shape[1], (rows + COMBINE_ROWS - 1) // COMBINE_ROWS]
        self.kernel(mOAccum, mLseAccum, mMeta, mNumSplits, mO, mLse, heads_per_kv).launch(
            grid=grid, block=[COMBINE_THREADS, 1, 1], stream=stream, use_pdl=after_decode
        )

    @cute.kernel
    def kernel(
        self,
        mOAccum: cute.Tensor,
        mLseAccum: cute.Tensor,
        mMeta: cute.Tensor,
        mNumSplits: cute.Tensor,
        mO: cute.Tensor,
        mLse: cute.Tensor,
        heads_per_kv: Int32,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        part, kv_head, row_group = cute.arch.block_idx()

        @cute.struct
        class Storage:
            row_stats: cute.struct.MemRange[Float32, 2 * COMBINE_ROWS]

        storage = cutlass.utils.SmemAllocator().allocate(Storage)
        row_stats = storage.row_stats.get_tensor(cute.make_layout((COMBINE_ROWS, 2), stride=(1, COMBINE_ROWS)))
        # Every CTA waits for the decode kernel, also those with nothing to merge: the
        # kernel then never completes before the one it depends on.
        cute.arch.griddepcontrol_wait()
        batch = mMeta[part, BEGIN_BATCH]
        fragment = mMeta[part, BEGIN_SPLIT]
        if batch < mO.shape[0]:
            first = mNumSplits[batch]
            num_frags = mNumSplits[batch + 1] - first
            if fragment == num_frags - 1 and num_frags >= self.min_fragments:
                merge_rows(mOAccum, mLseAccum, mO, mLse, row_stats,
                           pipeline.NamedBarrier(barrier_id=1, num_threads=COMBINE_THREADS), tidx, batch, kv_head,
                           row_group * COMBINE_ROWS, first, num_frags, heads_per_kv, COMBINE_ROWS, COMBINE_THREADS,
                           1, COMBINE_FRAGS_IN_FLIGHT, self.dtype, self.head_dim_v)
