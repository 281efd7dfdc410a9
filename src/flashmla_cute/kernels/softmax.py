"""Online-softmax steps on a consumer's WGMMA accumulator rows (``utils.acc_as_rows_cols``).

A row of S or O lives in the 4 threads of a quad; each function works on the calling
thread's part of row ``i`` and, where a whole-row value is needed, reduces over the quad.
Scores are scaled into the exp2 domain by ``scale_log2 = softmax_scale * log2(e)``.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32

from . import utils

RESCALE_THRESHOLD_LOG2 = 8.0
"""With ``next_max``, the running maximum moves only when a block's maximum exceeds it by
more than this (in the exp2 domain): P then stays below 2^8, exact enough in bf16 and far
from overflow, and O's rescales (a multiply of every accumulator) become rare once a
sequence's first blocks are seen, so ``rescale_row`` skips them. The log-sum-exp stays
exact: it is taken relative to the maximum actually used."""


@cute.jit
def row_max(s_rc: cute.Tensor, i: cutlass.Constexpr) -> Float32:
    """Max of row ``i`` of S (over the quad)."""
    m = s_rc[i, 0]
    for j in cutlass.range_constexpr(1, cute.size(s_rc, mode=[1])):
        m = cute.arch.fmax(m, s_rc[i, j])
    return utils.quad_max(m)


@cute.jit
def next_max(old_max: Float32, block_max: Float32, scale_log2: Float32) -> Float32:
    """The maximum that P is taken relative to after a block whose row maximum is
    ``block_max``: ``old_max`` unless the block exceeds it by more than
    ``RESCALE_THRESHOLD_LOG2``, else ``max(old_max, block_max)`` (always so for a row
    that has seen no key: ``-inf`` moves to anything)."""
    new_max = cute.arch.fmax(old_max, block_max)
    result = new_max
    if (new_max - old_max) * scale_log2 <= RESCALE_THRESHOLD_LOG2:
        result = old_max
    return result


@cute.jit
def scaled_max(m: Float32, scale_log2: Float32) -> Float32:
    """``m * scale_log2``, or 0 for a row that has seen no key yet (avoids inf - inf)."""
    scaled = m * scale_log2
    if m == -Float32.inf:
        scaled = Float32(0.0)
    return scaled


@cute.jit
def rescale_factor(old_max: Float32, new_max_scaled: Float32, scale_log2: Float32) -> Float32:
    """``exp2(old_max * scale_log2 - new_max_scaled)``: what O and the row sum are
    multiplied by when the running maximum moves to ``new_max``."""
    return cute.math.exp2(old_max * scale_log2 - new_max_scaled, fastmath=True)


@cute.jit
def exponentiate_row(s_rc: cute.Tensor, i: cutlass.Constexpr, scale_log2: Float32, m_scaled: Float32) -> Float32:
    """``S[i, :] = exp2(S[i, :] * scale_log2 - m_scaled)`` in place; returns this
    thread's part of the row sum."""
    total = Float32(0.0)
    for j in cutlass.range_constexpr(cute.size(s_rc, mode=[1])):
        p = cute.math.exp2(s_rc[i, j] * scale_log2 - m_scaled, fastmath=True)
        s_rc[i, j] = p
        total = total + p
    return total


@cute.jit
def rescale_row(o_rc: cute.Tensor, i: cutlass.Constexpr, factor: Float32):
    """``O[i, :] *= factor``. Once the running maximum settles, factors are exactly 1:
    the multiplies are skipped where the whole warp may (a warp-uniform branch: the
    barriers and MMAs that follow need the warp converged)."""
    if cute.arch.vote_any_sync(factor != 1.0):
        for j in cutlass.range_constexpr(cute.size(o_rc, mode=[1])):
            o_rc[i, j] = o_rc[i, j] * factor


@cute.jit
def mask_scores(s_rc: cute.Tensor, coord_s: cute.Tensor, block_start, row_limit: cute.Tensor):
    """Scores of keys a row may not see (at or past its ``row_limit``) to -inf."""
    for i in cutlass.range_constexpr(cute.size(s_rc, mode=[0])):
        for j in cutlass.range_constexpr(cute.size(s_rc, mode=[1])):
            if block_start + coord_s[i, j][1] >= row_limit[i]:
                s_rc[i, j] = -Float32.inf
