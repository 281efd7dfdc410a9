"""Per-thread MMA fragments of a CTA whose two consumer warpgroups share one 64-row query
tile and split the output O by columns (FlashMLA's arrangement; the dense and the sparse
decode kernels both use it): each warpgroup computes scores ``S = Q K^T`` over some tokens,
multiplies its own P (registers) by its V columns, and the other warpgroup's P, passed
through shared memory, by the same columns."""

from __future__ import annotations

from dataclasses import dataclass

import cutlass.cute as cute
from cutlass.cute.nvgpu import warp

from . import utils


@dataclass(frozen=True)  # frozen: the DSL's loops read it without carrying it
class SplitOFragments:
    """A thread's fragments (``split_o_fragments``); the kernels' per-thread records
    extend it with their own state."""

    tiled_mma_s: cute.TiledMma  # S = Q K^T
    tiled_mma_o_rs: cute.TiledMma  # O += P V, P from registers (this warpgroup's)
    tiled_mma_o_ss: cute.TiledMma  # O += P V, P from shared memory (the other's)
    tSrQ: cute.Tensor
    tSrK: cute.Tensor
    tOrV_rs: cute.Tensor
    tOrV_ss: cute.Tensor
    tOrP_ss: cute.Tensor
    acc_s: cute.Tensor  # S, then P
    acc_o: cute.Tensor  # this warpgroup's half of O
    s_rc: cute.Tensor  # acc_s as (row, column) of this thread
    o_rc: cute.Tensor
    coord_s: cute.Tensor  # (row, column) in the tile of each of those
    coord_o: cute.Tensor
    p_regs: cute.Tensor  # P in the input dtype
    p_operand: cute.Tensor  # p_regs as the A operand of P V
    p_store: object  # stmatrix copy of P into shared memory
    tPsP: cute.Tensor


def split_o_fragments(wg_tidx, tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss, sQ, sK, sV, sP, s_tile: tuple,
                      o_tile: tuple, dtype) -> dict:
    """The fields of ``SplitOFragments`` for thread ``wg_tidx`` of its warpgroup: ``sK``
    the B operand of S, ``sV`` this warpgroup's V columns (MN-major), ``sP`` where P
    is exchanged, ``s_tile`` and ``o_tile`` the (rows, columns) of S and of this
    warpgroup's O."""
    thr_mma_s = tiled_mma_s.get_slice(wg_tidx)
    thr_mma_rs = tiled_mma_o_rs.get_slice(wg_tidx)
    thr_mma_ss = tiled_mma_o_ss.get_slice(wg_tidx)
    acc_s = thr_mma_s.make_fragment_C(thr_mma_s.partition_shape_C(s_tile))
    acc_o = thr_mma_rs.make_fragment_C(thr_mma_rs.partition_shape_C(o_tile))
    p_regs = cute.make_rmem_tensor_like(acc_s, dtype)
    p_store = cute.make_tiled_copy_C(
        cute.make_copy_atom(warp.StMatrix8x8x16bOp(transpose=False, num_matrices=4), dtype), tiled_mma_s
    ).get_slice(wg_tidx)
    return dict(
        tiled_mma_s=tiled_mma_s,
        tiled_mma_o_rs=tiled_mma_o_rs,
        tiled_mma_o_ss=tiled_mma_o_ss,
        tSrQ=thr_mma_s.make_fragment_A(thr_mma_s.partition_A(sQ)),
        tSrK=thr_mma_s.make_fragment_B(thr_mma_s.partition_B(sK)),
        tOrV_rs=thr_mma_rs.make_fragment_B(thr_mma_rs.partition_B(sV)),
        tOrV_ss=thr_mma_ss.make_fragment_B(thr_mma_ss.partition_B(sV)),
        tOrP_ss=thr_mma_ss.make_fragment_A(thr_mma_ss.partition_A(sP)),
        acc_s=acc_s,
        acc_o=acc_o,
        s_rc=utils.acc_as_rows_cols(acc_s),
        o_rc=utils.acc_as_rows_cols(acc_o),
        coord_s=utils.acc_as_rows_cols(thr_mma_s.partition_C(cute.make_identity_tensor(s_tile))),
        coord_o=utils.acc_as_rows_cols(thr_mma_rs.partition_C(cute.make_identity_tensor(o_tile))),
        p_regs=p_regs,
        p_operand=cute.make_tensor(p_regs.iterator, utils.acc_as_operand_a(acc_s.layout)),
        p_store=p_store,
        tPsP=p_store.partition_D(sP),
    )
