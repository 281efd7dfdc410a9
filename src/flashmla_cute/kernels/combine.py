"""Merging the partial results of split sequences into ``out`` and ``lse``.

The decode kernel writes, for every fragment of a sequence that the scheduler split
over several SM parts, the fragment's normalized fp32 output ``O_k`` and its
log-sum-exp ``L_k`` (``-inf`` when the fragment saw no key of that row). The merged
result is ``out = sum_k exp(L_k - L) O_k`` with ``L = log(sum_k exp(L_k))``.

``merge_row`` is that merge for one query row, by one warp. The decode kernel calls it
in the CTA that finishes a split sequence's last fragment. ``MlaCombine`` is the same
merge as a kernel of its own (grid: batch, KV head, groups of ROWS_PER_CTA rows; one
warp per row), which skips sequences with a single fragment; it tests the merge alone.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from .utils import accumulators

ROWS_PER_CTA = 8
VEC = 4  # fp32 values per 16-byte load


class MlaCombine:
    """Static configuration: output dtype and ``head_dim_v``."""

    def __init__(self, dtype, head_dim_v: int = 512):
        if head_dim_v % (32 * VEC) != 0:
            raise ValueError(f"head_dim_v must be a multiple of {32 * VEC}, got {head_dim_v}")
        self.dtype = dtype
        self.head_dim_v = head_dim_v

    @cute.jit
    def __call__(
        self,
        mAccum: cute.Tensor,  # the decode kernel's fp32 workspace (utils.accumulators)
        mNumSplits: cute.Tensor,  # (b + 1,) int32
        mO: cute.Tensor,  # (b, s_q, h_q, dv)
        mLse: cute.Tensor,  # (b, h_q, s_q) fp32
        heads_per_kv: Int32,
        stream,
    ):
        """The combine alone, on a workspace passed in as one flat tensor (the decode
        kernel's host function calls ``launch`` directly)."""
        rows = mO.shape[1] * heads_per_kv
        h_kv = mO.shape[2] // heads_per_kv
        num_acc = mAccum.shape[0] // (h_kv * rows * (self.head_dim_v + 1))
        mOAccum, mLseAccum = accumulators(mAccum, num_acc, h_kv, rows, self.head_dim_v)
        self.launch(mOAccum, mLseAccum, mNumSplits, mO, mLse, heads_per_kv, stream)

    @cute.jit
    def launch(
        self,
        mOAccum: cute.Tensor,  # (num_acc, h_kv, rows, dv) fp32 partial outputs
        mLseAccum: cute.Tensor,  # (num_acc, h_kv, rows) fp32 partial log-sum-exps
        mNumSplits: cute.Tensor,
        mO: cute.Tensor,
        mLse: cute.Tensor,
        heads_per_kv: Int32,
        stream,
    ):
        """Launch the merge as a programmatic dependent of the kernel before it on
        ``stream`` (the decode kernel), so that its launch overlaps that kernel's tail."""
        rows = mOAccum.shape[2]
        grid = [mO.shape[0], mOAccum.shape[1], (rows + ROWS_PER_CTA - 1) // ROWS_PER_CTA]
        self.kernel(mOAccum, mLseAccum, mNumSplits, mO, mLse, heads_per_kv).launch(
            grid=grid, block=[32 * ROWS_PER_CTA, 1, 1], stream=stream, use_pdl=True
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
        # Launched as a programmatic dependent of the kernel that wrote the partials:
        # wait for all of them.
        cute.arch.griddepcontrol_wait()
        tidx, _, _ = cute.arch.thread_idx()
        batch, kv_head, row_group = cute.arch.block_idx()
        row = row_group * ROWS_PER_CTA + cute.arch.make_warp_uniform(cute.arch.warp_idx())
        first = mNumSplits[batch]
        num_frags = mNumSplits[batch + 1] - first
        if num_frags > 1 and row < mOAccum.shape[2]:
            merge_row(mOAccum, mLseAccum, mO, mLse, batch, kv_head, row, first, num_frags, tidx % 32, heads_per_kv,
                      self.dtype, self.head_dim_v)


@cute.jit
def merge_row(
    mOAccum: cute.Tensor,
    mLseAccum: cute.Tensor,
    mO: cute.Tensor,
    mLse: cute.Tensor,
    batch: Int32,
    kv_head: Int32,
    row: Int32,
    first: Int32,
    num_frags: Int32,
    lane: Int32,
    heads_per_kv: Int32,
    dtype: cutlass.Constexpr,
    head_dim_v: cutlass.Constexpr,
):
    """One warp merges the ``num_frags`` partial results ``first, first + 1, ...`` of
    query row ``row`` of ``(batch, kv_head)`` into ``mO`` and ``mLse``; ``lane`` is the
    calling thread's lane. Lane ``k`` owns 16 of the 512 output columns, in 4
    coalesced 16-byte pieces."""
    # Log-sum-exp over the fragments: lane k reads fragment k (32 at a time), so the
    # reads are one round trip rather than one per fragment.
    lse_max = -Float32.inf
    for base in cutlass.range(0, num_frags, 32, unroll=1):
        if base + lane < num_frags:
            lse_max = cute.arch.fmax(lse_max, mLseAccum[first + base + lane, kv_head, row])
    lse_max = cute.arch.warp_reduction(lse_max, cute.arch.fmax)
    # Every fragment empty for this row: it sees no key (FlashMLA: out 0, lse +inf).
    lse_ref = lse_max
    if lse_max == -Float32.inf:
        lse_ref = Float32(0.0)
    total = Float32(0.0)
    for base in cutlass.range(0, num_frags, 32, unroll=1):
        if base + lane < num_frags:
            total = total + cute.math.exp(mLseAccum[first + base + lane, kv_head, row] - lse_ref, fastmath=True)
    total = cute.arch.warp_reduction(total, lambda x, y: x + y)
    inv_total = Float32(0.0)
    lse = Float32.inf
    if total > 0.0:
        inv_total = 1.0 / total
        lse = lse_ref + cute.math.log(total, fastmath=False)

    num_vecs = head_dim_v // (32 * VEC)
    acc = cute.make_rmem_tensor((VEC, num_vecs), Float32)
    acc.fill(0.0)
    for k in cutlass.range(num_frags, unroll=2):
        weight = cute.math.exp(mLseAccum[first + k, kv_head, row] - lse_ref, fastmath=True) * inv_total
        o_row = mOAccum[first + k, kv_head, row, None]
        for v in cutlass.range_constexpr(num_vecs):
            piece = cute.local_tile(o_row, (VEC,), (v * 32 + lane,)).load()
            for e in cutlass.range_constexpr(VEC):
                acc[e, v] = acc[e, v] + weight * piece[e]

    s = row // heads_per_kv
    head = kv_head * heads_per_kv + (row - s * heads_per_kv)
    out_row = mO[batch, s, head, None]
    for v in cutlass.range_constexpr(num_vecs):
        out_piece = cute.make_rmem_tensor((VEC,), dtype)
        for e in cutlass.range_constexpr(VEC):
            out_piece[e] = acc[e, v].to(dtype)
        cute.autovec_copy(out_piece, cute.local_tile(out_row, (VEC,), (v * 32 + lane,)))
    if lane == 0:
        mLse[batch, head, s] = lse
