"""Merging the partial results of split sequences into ``out`` and ``lse``.

The decode kernel writes, for every fragment of a sequence that the scheduler split
over several SM parts, the fragment's normalized fp32 output ``O_k`` and its
log-sum-exp ``L_k`` (``-inf`` when the fragment saw no key of that row). The merged
result is ``out = sum_k exp(L_k - L) O_k`` with ``L = log(sum_k exp(L_k))``.

``merge_tile`` is that merge for one query tile (up to 64 rows) of one sequence and KV
head, by 256 threads. The decode kernel runs it in the CTA that finishes the tile's
last fragment. ``MlaCombine`` runs the same merge as a kernel of its own (one CTA per
tile; sequences with a single fragment are skipped); it tests the merge alone.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, pipeline

from .utils import accumulators

TILE_ROWS = 64  # query rows per tile (the decode kernel's TILE_M)
MERGE_THREADS = 256
VEC = 4  # fp32 values per 16-byte load
ROWS_IN_FLIGHT = 8  # rows whose loads one thread has in flight at once


@cute.jit
def merge_tile(
    mOAccum: cute.Tensor,  # (num_acc, h_kv, rows, dv) fp32 partial outputs
    mLseAccum: cute.Tensor,  # (num_acc, h_kv, rows) fp32 partial log-sum-exps
    mO: cute.Tensor,  # (b, s_q, h_q, dv)
    mLse: cute.Tensor,  # (b, h_q, s_q) fp32
    sRowStats: cute.Tensor,  # (TILE_ROWS, 2) fp32 shared memory
    barrier: pipeline.NamedBarrier,  # the MERGE_THREADS threads that call this
    tidx: Int32,  # 0 .. MERGE_THREADS - 1
    batch: Int32,
    kv_head: Int32,
    m_tile: Int32,
    first: Int32,  # the tile's fragments are first, first + 1, ...
    num_frags: Int32,
    heads_per_kv: Int32,
    dtype: cutlass.Constexpr,
    head_dim_v: cutlass.Constexpr,
):
    """Merge the ``num_frags`` partial results of query tile ``m_tile`` of ``(batch,
    kv_head)`` into ``mO`` and ``mLse``.

    First, thread ``r`` works out row ``r``'s merged log-sum-exp and keeps, in
    ``sRowStats``, the reference and the normalization of the fragment weights. Then
    each thread accumulates 4 columns (one 16-byte piece) of rows ``ROWS_IN_FLIGHT`` at
    a time, so that a thread has that many independent loads in flight per fragment:
    the merge is bound by load latency, not by the few FLOPs.
    """
    rows_per_kv = mOAccum.shape[2]
    row0 = m_tile * TILE_ROWS
    tile_rows = cutlass.min(rows_per_kv - row0, TILE_ROWS)

    if tidx < tile_rows:
        row = row0 + tidx
        lse_max = -Float32.inf
        for k in cutlass.range(num_frags, unroll=4):
            lse_max = cute.arch.fmax(lse_max, mLseAccum[first + k, kv_head, row])
        # Every fragment empty for this row: it sees no key (FlashMLA: out 0, lse +inf).
        lse_ref = lse_max
        if lse_max == -Float32.inf:
            lse_ref = Float32(0.0)
        total = Float32(0.0)
        for k in cutlass.range(num_frags, unroll=4):
            total = total + cute.math.exp(mLseAccum[first + k, kv_head, row] - lse_ref, fastmath=True)
        inv_total = Float32(0.0)
        lse = Float32.inf
        if total > 0.0:
            inv_total = 1.0 / total
            lse = lse_ref + cute.math.log(total, fastmath=False)
        sRowStats[tidx, 0] = lse_ref
        sRowStats[tidx, 1] = inv_total
        s = row // heads_per_kv
        mLse[batch, kv_head * heads_per_kv + (row - s * heads_per_kv), s] = lse
    barrier.arrive_and_wait()

    threads_per_row = head_dim_v // VEC
    rows_per_step = MERGE_THREADS // threads_per_row
    piece_idx = tidx % threads_per_row
    row_in_step = tidx // threads_per_row
    rows_per_pass = rows_per_step * ROWS_IN_FLIGHT
    for pass_start in cutlass.range(0, tile_rows, rows_per_pass, unroll=1):
        acc = cute.make_rmem_tensor((ROWS_IN_FLIGHT, VEC), Float32)
        acc.fill(0.0)
        for k in cutlass.range(num_frags, unroll=2):
            # All loads of the pass first (rows past the tile load the tile's last row,
            # unused), then the arithmetic: ROWS_IN_FLIGHT loads in flight at once.
            pieces = cute.make_rmem_tensor((ROWS_IN_FLIGHT, VEC), Float32)
            partial_lse = cute.make_rmem_tensor((ROWS_IN_FLIGHT,), Float32)
            for j in cutlass.range_constexpr(ROWS_IN_FLIGHT):
                row = row0 + cutlass.min(pass_start + row_in_step + j * rows_per_step, tile_rows - 1)
                partial_lse[j] = mLseAccum[first + k, kv_head, row]
                piece = cute.local_tile(mOAccum[first + k, kv_head, row, None], (VEC,), (piece_idx,)).load()
                for e in cutlass.range_constexpr(VEC):
                    pieces[j, e] = piece[e]
            for j in cutlass.range_constexpr(ROWS_IN_FLIGHT):
                r = cutlass.min(pass_start + row_in_step + j * rows_per_step, tile_rows - 1)
                weight = cute.math.exp(partial_lse[j] - sRowStats[r, 0], fastmath=True) * sRowStats[r, 1]
                for e in cutlass.range_constexpr(VEC):
                    acc[j, e] = acc[j, e] + weight * pieces[j, e]
        for j in cutlass.range_constexpr(ROWS_IN_FLIGHT):
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
    """The merge as a kernel of its own. Static configuration: output dtype and
    ``head_dim_v``."""

    def __init__(self, dtype, head_dim_v: int = 512):
        if MERGE_THREADS % (head_dim_v // VEC) != 0:
            raise ValueError(f"head_dim_v must divide {MERGE_THREADS * VEC}, got {head_dim_v}")
        self.dtype = dtype
        self.head_dim_v = head_dim_v

    @cute.jit
    def __call__(
        self,
        mAccum: cute.Tensor,  # partial results as utils.accumulators lays them out
        mNumSplits: cute.Tensor,  # (b + 1,) int32
        mO: cute.Tensor,  # (b, s_q, h_q, dv)
        mLse: cute.Tensor,  # (b, h_q, s_q) fp32
        heads_per_kv: Int32,
        stream,
    ):
        rows = mO.shape[1] * heads_per_kv
        h_kv = mO.shape[2] // heads_per_kv
        num_acc = mAccum.shape[0] // (h_kv * rows * (self.head_dim_v + 1))
        mOAccum, mLseAccum = accumulators(mAccum, num_acc, h_kv, rows, self.head_dim_v)
        grid = [mO.shape[0], h_kv, (rows + TILE_ROWS - 1) // TILE_ROWS]
        self.kernel(mOAccum, mLseAccum, mNumSplits, mO, mLse, heads_per_kv).launch(
            grid=grid, block=[MERGE_THREADS, 1, 1], stream=stream
        )

    @cute.kernel
    def kernel(
        self,
        mOAccum: cute.Tensor,
        mLseAccum: cute.Tensor,
        mNumSplits: cute.Tensor,
        mO: cute.Tensor,
        mLse: cute.Tensor,
        heads_per_kv: Int32,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        batch, kv_head, m_tile = cute.arch.block_idx()

        @cute.struct
        class Storage:
            row_stats: cute.struct.MemRange[Float32, 2 * TILE_ROWS]

        storage = cutlass.utils.SmemAllocator().allocate(Storage)
        row_stats = storage.row_stats.get_tensor(cute.make_layout((TILE_ROWS, 2), stride=(1, TILE_ROWS)))
        first = mNumSplits[batch]
        num_frags = mNumSplits[batch + 1] - first
        if num_frags > 1:
            merge_tile(mOAccum, mLseAccum, mO, mLse, row_stats,
                       pipeline.NamedBarrier(barrier_id=1, num_threads=MERGE_THREADS), tidx, batch, kv_head,
                       m_tile, first, num_frags, heads_per_kv, self.dtype, self.head_dim_v)
