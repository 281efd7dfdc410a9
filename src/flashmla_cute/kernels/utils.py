"""Small device-side helpers shared by the kernels."""

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32
from cutlass.cute.nvgpu import cpasync
from cutlass.tensor_utils import LayoutEnum

from ..scheduler import PARTIAL_VALUE_BYTES

# L2 eviction-priority hints for TMA loads (CUTLASS's CacheHintSm90 values).
TMA_EVICT_FIRST = 0x12F0000000000000
TMA_EVICT_NORMAL = 0x1000000000000000


REGISTER_FILE = 65536  # 32-bit registers of an SM
WARP_THREADS = 32
WARPGROUP_THREADS = 4 * WARP_THREADS  # four warps: the unit of WGMMA and of setmaxnreg
# A 128-byte swizzle atom of a K-major 16-bit tile in shared memory (the kernels' Q and K
# tiles): ATOM_ROWS rows of ATOM_COLUMNS columns, 1 KB; a tile's 64-column chunk is a
# column of such atoms, and one TMA copy.
ATOM_COLUMNS = 64
ATOM_ROWS = 8
MMA_K = 16  # the k of a 16-bit m64nNk16 WGMMA: one k-step
CHUNK_ROWS = 64  # rows of the Q and K tiles that the kernels load by TMA: a chunk's box


def chunk_box_layout(dtype) -> cute.ComposedLayout:
    """One 64-column chunk of a ``CHUNK_ROWS``-row K-major tile in shared memory (128-byte
    swizzle): the box of one TMA copy (the A and B operand layouts of a K-major 64 x 64
    tile are the same)."""
    tile = (CHUNK_ROWS, CHUNK_ROWS, ATOM_COLUMNS)
    return cute.select(sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, tile, dtype, 1), mode=[0, 1])


def chunk_bytes(dtype) -> int:
    """Bytes of one chunk's TMA copy."""
    return cute.size_in_bytes(dtype, chunk_box_layout(dtype))


def chunk_tma_atom(src: cute.Tensor, dtype):
    """The TMA load of one chunk (``chunk_box_layout``) of ``src``, a (row, column, ...)
    view of a tensor in global memory: (atom, the TMA view of ``src``). Rows and columns
    past ``src``'s extents land as zeros."""
    return cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), src, chunk_box_layout(dtype),
                                       (CHUNK_ROWS, ATOM_COLUMNS))


def chunked_layout(rows: int, width: int, stages: int) -> cute.Layout:
    """Stages of ``rows`` x ``width`` K-major tiles in shared memory (128-byte swizzle
    atoms of 8 rows, 64 columns a chunk, chunk after chunk) as (row, column in chunk,
    chunk, stage): the TMA copies' view of them."""
    return cute.make_layout(
        ((ATOM_ROWS, rows // ATOM_ROWS), ATOM_COLUMNS, width // ATOM_COLUMNS, stages),
        stride=((ATOM_COLUMNS, ATOM_ROWS * ATOM_COLUMNS), 1, rows * ATOM_COLUMNS, rows * width),
    )


def launch_registers(threads: int) -> int:
    """Registers a thread of a ``threads``-thread CTA has at launch, one CTA an SM: its
    share of the register file in ``setmaxnreg``'s steps of 8."""
    return REGISTER_FILE // threads // 8 * 8


def registers_fit(budgets, threads: int) -> bool:
    """Whether the warpgroups' register budgets (one a warpgroup) fit the launch's
    registers: an increase beyond what the decreases freed waits forever."""
    return sum(budgets) <= len(budgets) * launch_registers(threads)


def take_registers(regs: int, threads: int):
    """Sets this warpgroup's registers a thread to ``regs``: ``setmaxnreg.inc`` above
    the launch's share, ``.dec`` below it (an increase to fewer registers than a thread
    has is an illegal instruction)."""
    launch = launch_registers(threads)
    assert regs % 8 == 0 and regs != launch, regs
    if regs > launch:
        cute.arch.setmaxregister_increase(regs)
    else:
        cute.arch.setmaxregister_decrease(regs)


def acc_as_rows_cols(acc: cute.Tensor) -> cute.Tensor:
    """View a WGMMA accumulator fragment ``((2, 2, N/8), M, N)`` as ``(rows, cols)``.

    In the m64nNk16 accumulator a thread holds, for each of its two rows (``r`` and
    ``r + 8``), pairs of adjacent columns spaced 8 apart. Mode 0 of the result
    indexes the thread's rows, mode 1 the thread's columns of that row.
    """
    shape, stride = acc.layout.shape, acc.layout.stride
    layout = cute.make_layout(
        ((shape[0][1], shape[1]), (shape[0][0], shape[0][2], shape[2])),
        stride=((stride[0][1], stride[1]), (stride[0][0], stride[0][2], stride[2])),
    )
    return cute.make_tensor(acc.iterator, layout)


@cute.jit
def quad_max(x: Float32) -> Float32:
    """Max over the 4 threads of a quad (the threads that share an accumulator row)."""
    for offset in cutlass.range_constexpr(1, 3):
        x = cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=offset))
    return x


@cute.jit
def quad_sum(x: Float32) -> Float32:
    """Sum over the 4 threads of a quad."""
    for offset in cutlass.range_constexpr(1, 3):
        x = x + cute.arch.shuffle_sync_bfly(x, offset=offset)
    return x


def acc_as_operand_a(acc_layout: cute.Layout) -> cute.Layout:
    """Layout that reads a (converted) ``m64nN`` accumulator fragment ``((2, 2, N/8), 1, 1)``
    as the register A operand of ``m64k16`` MMAs, ``((2, 2, 2), 1, N/16)``: on Hopper a
    thread's accumulator columns ``[16k, 16k + 16)`` are exactly its A values of k-step k."""
    (v0, v1, v2), m, n = acc_layout.shape
    (d0, d1, d2), dm, _ = acc_layout.stride
    assert n == 1 and v2 % 2 == 0
    return cute.make_layout(((v0, v1, 2), m, v2 // 2), stride=((d0, d1, d2), dm, 2 * d2))


@cute.jit
def accumulators(mAccum: cute.Tensor, num_acc, h_kv, rows, dv: cutlass.Constexpr, partial_dtype: cutlass.Constexpr):
    """Views of the one fp32 split workspace (``scheduler.split_workspace_elems``) as
    the partial outputs ``(num_acc, h_kv, rows, dv)`` in ``partial_dtype`` (the output's
    16-bit dtype, ``scheduler.PARTIAL_VALUE_BYTES``) followed by their fp32
    log-sum-exps ``(num_acc, h_kv, rows)``; ``num_acc = b + num_parts`` bounds the
    fragments."""
    assert partial_dtype.width == PARTIAL_VALUE_BYTES * 8, "partials are stored in the output's 16-bit dtype"
    o_elems = num_acc * h_kv * rows * dv
    o_accum = cute.make_tensor(
        cute.recast_ptr(mAccum.iterator, dtype=partial_dtype),
        cute.make_layout((num_acc, h_kv, rows, dv), stride=(h_kv * rows * dv, rows * dv, dv, 1)),
    )
    # dv is even, so the partial outputs end on an fp32 element (divided, not multiplied
    # by the widths: o_elems may be near the 32-bit limit).
    lse_accum = cute.make_tensor(
        mAccum.iterator + o_elems // (Float32.width // partial_dtype.width),
        cute.make_layout((num_acc, h_kv, rows), stride=(h_kv * rows, rows, 1)),
    )
    return o_accum, lse_accum


@cute.jit
def store_acc_row(o_rc, coord_o, i: cutlass.Constexpr, scale, dst_row: cute.Tensor, col0, dtype: cutlass.Constexpr):
    """Write this thread's values of accumulator row ``i`` (``acc_as_rows_cols``), times
    ``scale``, into ``dst_row`` (one output row, contiguous) from column ``col0`` on. A
    thread's values come in pairs of adjacent columns: one 2-element store per pair."""
    for jj in cutlass.range_constexpr(cute.size(o_rc, mode=[1]) // 2):
        pair = cute.make_rmem_tensor((2,), dtype)
        pair[0] = (o_rc[i, 2 * jj] * scale).to(dtype)
        pair[1] = (o_rc[i, 2 * jj + 1] * scale).to(dtype)
        col = col0 + coord_o[i, 2 * jj][1]
        cute.autovec_copy(pair, cute.local_tile(dst_row, (2,), (col // 2,)))


@cute.jit
def store_acc_row_sectors(o_rc, coord_o, i: cutlass.Constexpr, scale, dst_row: cute.Tensor, col0,
                          dtype: cutlass.Constexpr, valid):
    """``store_acc_row`` into global memory for a 16-bit ``dtype``, each 32-byte sector
    of the row written whole by one store instruction of a quad.

    A quad's pairs of one column group (``8j .. 8j + 7``) are half a sector, so pair
    stores write every sector in two halves; the split h_q 128 cases' epilogue took
    ~2.5 us longer so than with whole-sector fp32 stores of twice the bytes (about what
    reading each half-written sector's other half from DRAM would cost;
    benchmarks/NOTES.md, "Partials in the output's dtype"). Here the quad's two
    neighbouring groups (one sector, 16 columns) are exchanged between neighbouring
    threads in one shuffle: an even thread sends its pair of the second group and an
    odd one its pair of the first, so that each holds 4 consecutive values, which it
    stores with one 8-byte store. Every lane of the warp must call it (the shuffles);
    only where ``valid`` (the same in a quad: its threads share their rows) is
    ``dst_row`` written."""
    odd = cute.arch.lane_idx() % 2
    # Quad lanes 0-3 end with the sector's values 0-3, 8-11, 4-7, 12-15: lane q's run
    # starts 6 values past its first pair's column where q is odd. Its run of sector m
    # is 16 m columns further (its pairs sit at 8 j + 2 q), so the run's index is
    # worked out once a row and the stores' addresses differ by constants.
    first_run = (col0 + coord_o[i, 0][1] + 6 * odd) // 4
    num_sectors = cute.size(o_rc, mode=[1]) // 4
    runs = cute.make_rmem_tensor((2, num_sectors), Int32)  # run m: runs[None, m], contiguous
    for m in cutlass.range_constexpr(num_sectors):
        values = cute.make_rmem_tensor((4,), dtype)
        for e in cutlass.range_constexpr(4):
            values[e] = (o_rc[i, 4 * m + e] * scale).to(dtype)
        pairs = cute.recast_tensor(values, Int32)  # this thread's pair of each group
        first, second = pairs[0], pairs[1]
        got = cute.arch.shuffle_sync_bfly(Int32(cutlass.select_(odd != 0, first, second)), offset=1)
        runs[0, m] = Int32(cutlass.select_(odd != 0, got, first))
        runs[1, m] = Int32(cutlass.select_(odd != 0, second, got))
    # One branch around all the row's stores (one per store repeated the address's
    # arithmetic in each).
    if valid:
        for m in cutlass.range_constexpr(num_sectors):
            cute.autovec_copy(cute.recast_tensor(runs[None, m], dtype),
                              cute.local_tile(dst_row, (4,), (first_run + 4 * m,)))


STAGED_ROW_PAD_BYTES = 16
"""Padding after each row of a staged tile (``staged_rows_layout``): rows 16 bytes longer
than a multiple of 128 start 4 banks apart, so the 8 rows that one warp's store of
16-bit accumulator pairs writes (4 bytes a thread, a quad of threads per row) fall in
distinct banks."""


def staged_rows_layout(rows: int, cols: int, dtype) -> cute.Layout:
    """Row-major ``(rows, cols)`` layout of ``dtype`` elements with padded rows
    (``STAGED_ROW_PAD_BYTES``), for staging accumulator rows in shared memory before
    ``copy_rows``."""
    return cute.make_layout((rows, cols), stride=(cols + STAGED_ROW_PAD_BYTES * 8 // dtype.width, 1))


def staged_rows_bytes(rows: int, cols: int, dtype) -> int:
    """Shared-memory bytes of a ``staged_rows_layout`` tile."""
    return cute.cosize(staged_rows_layout(rows, cols, dtype)) * dtype.width // 8


@cute.jit
def copy_rows(staged: cute.Tensor, dst_row, num_rows, tidx, threads: cutlass.Constexpr):
    """Copy rows ``[0, num_rows)`` of ``staged`` (shared memory, ``staged_rows_layout``)
    to ``dst_row(r)`` (row ``r``'s destination, contiguous) with 16-byte vectors,
    consecutive threads on consecutive vectors of a row: whole rows leave in full
    memory transactions, where storing from the accumulators writes a few bytes into
    each of 8 rows per instruction."""
    elems = 128 // staged.element_type.width
    per_row = cute.size(staged, mode=[1]) // elems
    for v in cutlass.range(tidx, num_rows * per_row, threads, unroll=4):
        r = v // per_row
        c = v - r * per_row
        cute.autovec_copy(cute.local_tile(staged[r, None], (elems,), (c,)), cute.local_tile(dst_row(r), (elems,), (c,)))
