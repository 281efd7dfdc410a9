"""Two attention results over disjoint keys merged into the result over both
(``merge.merge_attention_states`` on a Hopper GPU), in one kernel.

A warp merges one row (a query token's head): lane ``l`` takes the row's 16-byte pieces
``l, l + 32, ...`` of both halves, then folds them with ``combine.fold_fragments``, the
decode combine's weighted sum of fragments. At decode sizes the merge is a few hundred
kilobytes, so its time is its launches': one kernel instead of the ~20 tensor operations
of the torch path (which stays for other devices, dtypes and head dims).

The rules are the torch path's: a half whose lse is ``+inf`` (FlashMLA's mark of a row
that saw no key) or ``-inf`` weighs 0 and its output is not read; two empty halves give
``out = 0`` and ``lse = +inf``; a NaN lse or value reaches the result as NaN.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32

from ..launch_args import ALIGN_BYTES
from .combine import finite_or_zero, fold_fragments
from .utils import WARP_THREADS

PIECE_BYTES = ALIGN_BYTES  # a lane's load or store of a row at once: rows start on 16 bytes
MERGE_WARPS = 4  # rows a CTA merges, a warp each
HALVES = 2


def piece_values(dtype) -> int:
    """Values of ``dtype`` in a lane's 16-byte piece of a row."""
    return PIECE_BYTES * 8 // dtype.width


class MlaMergeStates:
    """``(out, lse)`` from ``(out_a, lse_a)`` and ``(out_b, lse_b)``: outputs
    ``[b, s_q, h_q, dv]`` in ``dtype``, lse float32 ``[b, h_q, s_q]``."""

    def __init__(self, dtype, head_dim_v: int = 512):
        row_piece = WARP_THREADS * piece_values(dtype)
        if head_dim_v % row_piece != 0:
            raise ValueError(f"head_dim_v must be a multiple of {row_piece} for {dtype}, got {head_dim_v}")
        self.dtype = dtype
        self.head_dim_v = head_dim_v

    @cute.jit
    def __call__(self, mOutA: cute.Tensor, mLseA: cute.Tensor, mOutB: cute.Tensor, mLseB: cute.Tensor,
                 mOut: cute.Tensor, mLse: cute.Tensor, stream):
        rows = mOut.shape[0] * mOut.shape[1] * mOut.shape[2]
        self.kernel(mOutA, mLseA, mOutB, mLseB, mOut, mLse).launch(
            grid=[(rows + MERGE_WARPS - 1) // MERGE_WARPS, 1, 1], block=[MERGE_WARPS * WARP_THREADS, 1, 1],
            stream=stream)

    @cute.kernel
    def kernel(self, mOutA: cute.Tensor, mLseA: cute.Tensor, mOutB: cute.Tensor, mLseB: cute.Tensor,
               mOut: cute.Tensor, mLse: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        cta, _, _ = cute.arch.block_idx()
        lane = tidx % WARP_THREADS
        s_q, h_q = mOut.shape[1], mOut.shape[2]
        # Rows in the outputs' memory order, so that a CTA's warps read neighbouring rows.
        row = cta * MERGE_WARPS + tidx // WARP_THREADS
        if row < mOut.shape[0] * s_q * h_q:
            head = row % h_q
            s = (row // h_q) % s_q
            batch = row // (h_q * s_q)
            vec = piece_values(self.dtype)
            pieces_per_lane = self.head_dim_v // (WARP_THREADS * vec)
            # A lane's pieces side by side: value e of piece i at i * vec + e.
            pieces = cute.make_rmem_tensor((HALVES, pieces_per_lane * vec), Float32)
            lses = cute.make_rmem_tensor((HALVES,), Float32)
            pieces.fill(0.0)
            for half, (mHalf, mHalfLse) in enumerate(((mOutA, mLseA), (mOutB, mLseB))):
                lse = mHalfLse[batch, head, s]
                if lse == Float32.inf:
                    lse = -Float32.inf
                lses[half] = lse
                # An empty half weighs 0 and its values stay unread (they may be NaN).
                if lse != -Float32.inf:
                    for i in cutlass.range_constexpr(pieces_per_lane):
                        piece = cute.local_tile(mHalf[batch, s, head, None], (vec,), (lane + WARP_THREADS * i,)).load()
                        piece = piece.to(Float32)
                        for e in cutlass.range_constexpr(vec):
                            pieces[half, i * vec + e] = piece[e]
            both_empty = (lses[0] == -Float32.inf) & (lses[1] == -Float32.inf)
            acc = cute.make_rmem_tensor((pieces_per_lane * vec,), Float32)
            acc.fill(0.0)
            row_max, total = fold_fragments(acc, -Float32.inf, Float32(0.0), lses, pieces, 0, HALVES)
            # Both halves empty: no key (FlashMLA's out 0, lse +inf). Otherwise a NaN lse
            # makes the total NaN, and the row with it.
            inv_total = Float32(0.0)
            merged_lse = Float32.inf
            if not both_empty:
                merged_lse = finite_or_zero(row_max) + cute.math.log(total, fastmath=False)
                inv_total = 1.0 / total
            out_piece = cute.make_rmem_tensor((vec,), self.dtype)
            out_row = mOut[batch, s, head, None]
            for i in cutlass.range_constexpr(pieces_per_lane):
                for e in cutlass.range_constexpr(vec):
                    out_piece[e] = (acc[i * vec + e] * inv_total).to(self.dtype)
                cute.autovec_copy(out_piece, cute.local_tile(out_row, (vec,), (lane + WARP_THREADS * i,)))
            if lane == 0:
                mLse[batch, head, s] = merged_lse
