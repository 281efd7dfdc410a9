"""The split-KV MLA decode kernel for Hopper (sm_90a).

One CTA per (64-row query tile, KV head, SM part), launched in that order: the query
tiles of a part read the same K tiles, and side by side they fetch each from L2 about
once (three times less L2 traffic at h_q 128, s_q 2). A CTA walks the contiguous range of
(batch, 64-token block) work that the scheduler gave its part (see ``scheduler.py``),
and for each batch in that range runs flash-attention's online softmax over its blocks,
then writes either the final output or, when the sequence was split across parts, a
partial (O in the output's dtype, its LSE in fp32). Split sequences are merged by the
combine kernel, launched by the same host call as this kernel's programmatic dependent,
which spreads the merge over many SMs (see ``combine.py``). This kernel is itself launched
as the programmatic dependent of whatever kernel precedes it on the stream: its CTAs set up
while that one drains and wait for it before touching global memory.

Warp roles (384 threads):

- warpgroup 0, warp 0: the producer. Issues TMA bulk-tensor loads of Q (once per
  batch, between the halves of the batch's first K tile) and of K tiles straight out
  of the paged cache (the page index read from the block table) into a 2-stage ring,
  one 64-column chunk per copy. Each stage completes on
  two mbarriers, for its "lo" chunks (the left consumer's 256 value columns) and its
  "hi" chunks (the rest), which are also released separately, so that the next block's
  first chunks load while the current pair of blocks is still being finished. In a
  stream (a long run of one sequence read by one query tile, the memory-bound case, or
  by two) a page's hi chunks are also asked of L2 when its lo half is copied, by the
  first query tile's producer (``load_k``).
- warpgroups 1 and 2: the consumers, "left" and "right". The 64x512 fp32 output O is
  split by columns: left owns ``O_L = O[:, :256]``, right ``O_R = O[:, 256:]``. Blocks
  are taken in pairs ``(K0, K1)`` and the two consumers run a variant of FlashMLA's
  "seesaw" schedule (its 2025-04 deep-dive), so that one consumer's softmax overlaps the
  other's MMAs and no MMA is duplicated:

  ====  ======================================  ======================================
  step  left                                    right
  ====  ======================================  ======================================
  1     ``S0 = Q K0^T``                         ``S1 = Q K1^T``
  2     ``m0 = next(m, rowmax S0)``,
        ``s0 = exp(m - m0)``, ``P0 = exp(S0 - m0)``
        -> m0, s0, P0 to right
  3     ``O_L = O_L s0 + P0 V0_L``              ``m1 = next(m0, rowmax S1)``, ``s1 = exp(m0 - m1)``
                                                -> m1, s1 to left
  4                                             ``O_R = O_R s0 + P0 V0_R``; meanwhile
                                                ``P1 = exp(S1 - m1)`` -> P1 to left
  5     ``O_L = O_L s1 + P1 V1_L``              ``O_R = O_R s1 + P1 V1_R``
  ====  ======================================  ======================================

  ``next`` is ``softmax.next_max``: the running maximum moves only when a block's exceeds
  it by more than a threshold, so once a sequence's first blocks are seen the factors s0
  and s1 are exactly 1 and O's rescales are skipped.
  Unlike FlashMLA's order, P0 travels unscaled (relative to m0) and the right consumer
  applies ``s1`` to O between its two MMAs, so P0 leaves the left consumer right after
  its softmax and the right consumer never waits on a second message from it. The right
  consumer sends m1 and s1 as soon as it has them and issues ``P0 V0_R``; it
  exponentiates P1 and stores it while that product runs, so that the left frees K0's
  lo half and the tensor pipe gets ``P0 V0_R`` without waiting for P1.
  A consumer multiplies by its own P from registers; the other's P comes through shared
  memory, written into the 64 rope columns (512..575) of that block's K stage, which
  nothing reads once S of the block is done. V is the first 512 columns of the same
  shared-memory K tile, read as an MN-major operand: K/V are loaded once.

Shared memory: Q 72 KB + two K stages of 72 KB + row statistics.

Where things are: ``CtaWork`` is what a CTA reads and writes; ``produce`` is the producer
warp; ``left_pair`` and ``right_pair`` are the two columns of the table above,
``finish_batch`` the epilogue, ``consume`` the loop over a part's batches and pairs that
calls them. The K ring is ``kv_stages.KvStages``,
the online-softmax steps are in ``softmax.py``, the named barriers in
``consumer_barriers.py``, the merge in ``combine.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Int64, const_expr, pipeline
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup
from cutlass.tensor_utils import LayoutEnum

from . import softmax, utils
from ..launch_args import ALIGN_BYTES
from ..scheduler import BEGIN_BATCH, BEGIN_BLOCK, BEGIN_SPLIT, BLOCK_SIZE, END_BATCH, END_BLOCK, ROWS_PER_TILE
from .consumer_barriers import ConsumerBarriers
from .kv_stages import NUM_STAGES, KvStages
from .split_o import SplitOFragments, split_o_fragments
from .combine import CTAS_PER_DECODE_CTA, MlaCombine
from .utils import WARPGROUP_THREADS, accumulators, registers_fit, take_registers

BLOCK_N = BLOCK_SIZE  # tokens per KV tile: one page
TILE_M = ROWS_PER_TILE  # query rows per CTA (the WGMMA's M)
NUM_CONSUMER_WARPGROUPS = 2
THREADS = WARPGROUP_THREADS * (1 + NUM_CONSUMER_WARPGROUPS)
PRODUCER_REGS = 40
CONSUMER_REGS = 232
assert registers_fit((PRODUCER_REGS,) + (CONSUMER_REGS,) * NUM_CONSUMER_WARPGROUPS, THREADS)

CHUNK = utils.ATOM_COLUMNS  # columns per TMA copy and per 128-byte swizzle atom
ATOM_ROWS = utils.ATOM_ROWS
STREAM_BLOCKS = 32  # K tiles: a run this long of one sequence is a stream (k_cache_policy)
# A run read by two query tiles side by side is a stream from this length (runs of ~32
# were 4% slower streamed, of 64 and more ~1% faster: benchmarks/NOTES.md, "K at the
# default L2 priority where one or two query tiles read a long run").
SHARED_STREAM_BLOCKS = 2 * STREAM_BLOCKS


def is_stream(run, num_m_tiles):
    """Whether a run of ``run`` K tiles of one sequence, read by ``num_m_tiles`` query
    tiles side by side, is a stream (``k_cache_policy``, ``load_k``'s prefetch): one tile
    on ``STREAM_BLOCKS`` or more, two on ``SHARED_STREAM_BLOCKS`` or more; never more
    tiles. Plain operators: traced inline on the kernel's values, or run on ints."""
    return ((run >= STREAM_BLOCKS) & (num_m_tiles == 1)) | ((run >= SHARED_STREAM_BLOCKS) & (num_m_tiles == 2))

# An output or partial row's start: both tensors are compiled as 16-byte aligned, with
# strides in whole 16-byte units, and a row is dv values.
ROW_ALIGN_BYTES = ALIGN_BYTES

# Row statistics in shared memory, each TILE_M floats.
STAT_M0, STAT_S0, STAT_M1, STAT_S1, STAT_SUM_L, STAT_SUM_R = range(6)
NUM_STATS = 6


@dataclass(frozen=True)  # frozen: the DSL's loops read it without carrying it
class ConsumerTensors(SplitOFragments):
    """What one consumer thread works with (``MlaDecodeSm90.consumer_tensors``): its MMA
    fragments (``split_o.SplitOFragments``: S of the current block, then P; this
    consumer's 64 x 256 half of O), and these."""

    sK: cute.Tensor  # the K stages
    stats: cute.Tensor  # (TILE_M, NUM_STATS) row statistics shared by the consumers
    row_max: cute.Tensor  # the running maximum m of each of this thread's rows
    row_sum: cute.Tensor  # this consumer's share of each row's sum
    row_limit: cute.Tensor  # each row's first key it may not see
    block_max: cute.Tensor  # right consumer: the max of S1's rows
    o_scale: cute.Tensor  # s0: O's rescale, applied once this consumer's message is out
    next_scale: cute.Tensor  # right consumer: s1, applied after P0 V0_R
    wg_tidx: object  # thread index in the warpgroup
    lane_writes_row: object  # the thread of its quad that writes row statistics


@dataclass(frozen=True)  # frozen: the DSL's loops read it without carrying it
class CtaWork:
    """What one CTA decodes and where its results go: the lengths, page table and plan
    it reads, its SM part, KV head and query tile, and the outputs it writes (the final
    output and log-sum-exp of a whole sequence, the partials of a split one)."""

    mSeqlens: cute.Tensor  # (b,) int32
    mBlockTable: cute.Tensor  # (b, max_blocks) int32
    mMeta: cute.Tensor  # (num_parts, 8) int32, see scheduler.py
    mNumSplits: cute.Tensor  # (b + 1,) int32
    mO: cute.Tensor  # (b, s_q, h_q, dv) in q's dtype
    mLse: cute.Tensor  # (b, h_q, s_q) fp32
    mOAccum: cute.Tensor  # the split workspace: utils.accumulators
    mLseAccum: cute.Tensor
    softmax_scale: object  # Float32
    heads_per_kv: object  # Int32
    part: object  # the CTA's coordinates: its row of the plan,
    kv_head: object  # its KV head
    m_tile: object  # and its tile of TILE_M query rows

    def part_range(self) -> tuple:
        """(first batch, its first block, last batch, one past its last block) of the
        part's plan row (``scheduler.py`` documents the columns)."""
        return tuple(self.mMeta[self.part, column] for column in (BEGIN_BATCH, BEGIN_BLOCK, END_BATCH, END_BLOCK))


@dataclass(frozen=True)  # frozen: the DSL's loops read it without carrying it
class Fragment:
    """One batch of a CTA's part as its consumers take it: the sequence, its length, the
    part's blocks of it, and where the result goes (``MlaDecodeSm90.fragment``)."""

    batch: object  # Int32
    seqlen: object
    first: object  # the part's first block of the sequence
    last: object  # one past its last
    whole: object  # the sequence is not split: the output is written here
    split_idx: object  # else: the accumulators' row of this fragment's partial


@dataclass(frozen=True)  # frozen: the DSL's loops read it without carrying it
class BatchQ:
    """A batch's Q tile as S waits for it: the one-stage ring Q is loaded through and
    the batch's state in it."""

    ring: KvStages
    state: pipeline.PipelineState

    def wait(self, chunks: range):
        self.ring.wait(self.state, chunks)


class MlaDecodeSm90:
    """Static configuration of one decode kernel variant.

    ``dtype`` (BFloat16 or Float16), ``head_dim`` (d, 576) and ``head_dim_v`` (dv, 512)
    and ``causal`` are compiled in; everything else (batch, heads, lengths, scale,
    number of SM parts) is a runtime value.
    """

    def __init__(self, dtype, head_dim: int = 576, head_dim_v: int = 512, causal: bool = False):
        # Whole chunks, an equal number a consumer, and at least one chunk past the value
        # columns (P is exchanged in it).
        if head_dim % CHUNK != 0 or head_dim_v % (CHUNK * NUM_CONSUMER_WARPGROUPS) != 0 or head_dim_v >= head_dim:
            raise ValueError(f"unsupported head dims d={head_dim}, dv={head_dim_v}: d and dv must be multiples of "
                             f"{CHUNK} (dv of {CHUNK * NUM_CONSUMER_WARPGROUPS}), dv < d")
        self.dtype = dtype
        self.head_dim = head_dim
        self.head_dim_v = head_dim_v
        self.causal = causal
        self.dv_per_wg = head_dim_v // NUM_CONSUMER_WARPGROUPS  # O columns per consumer
        self.k_chunks = head_dim // CHUNK  # 64-column (128-byte) swizzle atoms per row
        self.lo_chunks = self.dv_per_wg // CHUNK  # chunks of the left consumer's value columns
        self.rope_chunk = head_dim_v // CHUNK  # the first chunk past the value columns: holds P
        self.lo = range(self.lo_chunks)  # the left consumer's value columns
        self.hi = range(self.lo_chunks, self.k_chunks)  # the right consumer's, and the rope chunk
        self.all_chunks = range(self.k_chunks)
        # Barrier groups of the K ring: the two halves, which are released as wholes
        # anyway. One group per chunk (S starting on a block's first 8 KB, as FlashMLA
        # waits) measured the same within noise, and 7% slower at b32 sk16384 h128.
        self.kv_groups = ((self.lo.start, self.lo.stop), (self.hi.start, self.hi.stop))

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (b, 1, h_kv * rows, d): the query rows of each KV head in turn
        mK: cute.Tensor,  # (num_blocks, 64, h_kv, d): the paged cache
        mBlockTable: cute.Tensor,  # (b, max_blocks) int32
        mSeqlens: cute.Tensor,  # (b,) int32
        mMeta: cute.Tensor,  # (num_parts, 8) int32, see scheduler.py
        mNumSplits: cute.Tensor,  # (b + 1,) int32
        mO: cute.Tensor,  # (b, s_q, h_q, dv) in q's dtype
        mLse: cute.Tensor,  # (b, h_q, s_q) fp32
        mAccum: cute.Tensor,  # the split workspace: utils.accumulators
        softmax_scale: Float32,
        heads_per_kv: Int32,
        stream,
    ):
        dtype = self.dtype
        d, dv = self.head_dim, self.head_dim_v
        # q arrives as [b, 1, h_kv * rows, d]: with s_q == 1 that is q itself (h_q rows,
        # head h attending to KV head h // heads_per_kv), so the host makes no view.
        num_kv_heads = mK.shape[2]
        rows_per_kv = mQ.shape[2] // num_kv_heads
        row_stride = mQ.layout.stride[2]
        num_acc = mO.shape[0] + mMeta.shape[0]
        num_m_tiles = (rows_per_kv + TILE_M - 1) // TILE_M
        mOAccum, mLseAccum = accumulators(mAccum, num_acc, num_kv_heads, rows_per_kv, dv, dtype)

        # TMA views: (rows, d, h_kv, b) for Q and (token, d, h_kv, page) for K.
        q_tma_src = cute.make_tensor(
            mQ.iterator,
            cute.make_layout(
                (rows_per_kv, d, num_kv_heads, mQ.shape[0]),
                stride=(row_stride, 1, rows_per_kv * row_stride, mQ.layout.stride[0]),
            ),
        )
        k_tma_src = cute.make_tensor(mK.iterator, cute.select(mK.layout, mode=[1, 3, 2, 0]))

        tiled_mma_s = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.K, Float32, (1, 1, 1), (TILE_M, BLOCK_N)
        )
        # O += P V with this consumer's own P in registers, and with the other's from smem.
        tiled_mma_o_rs = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.MN, Float32, (1, 1, 1), (TILE_M, self.dv_per_wg),
            sm90_utils.OperandSource.RMEM,
        )
        tiled_mma_o_ss = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.MN, Float32, (1, 1, 1), (TILE_M, self.dv_per_wg)
        )

        sQ_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (TILE_M, BLOCK_N, d), dtype, 1)
        sK_layout = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (TILE_M, BLOCK_N, d), dtype, NUM_STAGES)

        # Q and K are loaded one 64-column chunk per TMA, so that S starts on a tile's
        # first chunks and K's two halves can be released and refilled separately
        # (kv_stages.py). A chunk of either is 64 rows of one 128-byte swizzle atom
        # (the A and B operand layouts of a K-major 64 x 64 tile are the same).
        assert TILE_M == BLOCK_N == utils.CHUNK_ROWS, "Q's and K's chunks are one TMA box"
        tma_q, tma_q_tensor = utils.chunk_tma_atom(q_tma_src, dtype)
        tma_k, tma_k_tensor = utils.chunk_tma_atom(k_tma_src, dtype)
        self.chunk_bytes = utils.chunk_bytes(dtype)

        @cute.struct
        class SharedStorage:
            kv_mbar: cute.struct.MemRange[Int64, KvStages.barrier_count(self.kv_groups)]
            q_mbar: cute.struct.MemRange[Int64, KvStages.barrier_count(self.kv_groups, 1)]
            stats: cute.struct.MemRange[Float32, NUM_STATS * TILE_M]
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sK_layout)], 1024]

        self.shared_storage = SharedStorage

        num_parts = mMeta.shape[0]
        self.kernel(
            tiled_mma_s,
            tiled_mma_o_rs,
            tiled_mma_o_ss,
            tma_q,
            tma_q_tensor,
            tma_k,
            tma_k_tensor,
            mBlockTable,
            mSeqlens,
            mMeta,
            mNumSplits,
            mO,
            mLse,
            mOAccum,
            mLseAccum,
            softmax_scale,
            heads_per_kv,
            sQ_layout,
            sK_layout,
        ).launch(
            # The query tiles of one part are neighbours in launch order, so they run on
            # neighbouring SMs at the same time and read the same K tiles together.
            grid=[num_m_tiles, num_kv_heads, num_parts],
            block=[THREADS, 1, 1],
            stream=stream,
            min_blocks_per_mp=1,
            # A programmatic dependent of the kernel before it (its wait: ``kernel``).
            use_pdl=True,
        )
        # The split sequences' merge.
        MlaCombine(dtype, dv).launch(mOAccum, mLseAccum, mNumSplits, mO, mLse, mLse, Int32(0), heads_per_kv,
                                     num_parts * num_m_tiles, CTAS_PER_DECODE_CTA, stream, True)

    # ---------------------------------------------------------------- device side
    @cute.kernel
    def kernel(
        self,
        tiled_mma_s: cute.TiledMma,
        tiled_mma_o_rs: cute.TiledMma,
        tiled_mma_o_ss: cute.TiledMma,
        tma_q: cute.CopyAtom,
        mQ_tma: cute.Tensor,
        tma_k: cute.CopyAtom,
        mK_tma: cute.Tensor,
        mBlockTable: cute.Tensor,
        mSeqlens: cute.Tensor,
        mMeta: cute.Tensor,
        mNumSplits: cute.Tensor,
        mO: cute.Tensor,
        mLse: cute.Tensor,
        mOAccum: cute.Tensor,
        mLseAccum: cute.Tensor,
        softmax_scale: Float32,
        heads_per_kv: Int32,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        m_tile, kv_head, part = cute.arch.block_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        warpgroup_idx = warp_idx // 4

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(self.shared_storage)

        consumer_warps = pipeline.CooperativeGroup(pipeline.Agent.Thread, 4 * NUM_CONSUMER_WARPGROUPS)
        # One pipeline per 64-column chunk of the K ring (kv_stages.py). The left
        # consumer is done with its value columns ("lo", chunks 0..3) of a block well
        # before the pair ends, so the next block's first chunks load early; the rest
        # ("hi": the right consumer's value columns and the rope chunk) later.
        kv = KvStages.create(storage.kv_mbar.data_ptr(), self.kv_groups, self.chunk_bytes, consumer_warps)
        # Q: a ring of one stage with K's chunk groups, so that S waits for each half
        # of Q with the same half of K.
        q_ring = KvStages.create(storage.q_mbar.data_ptr(), self.kv_groups, self.chunk_bytes, consumer_warps, 1)
        cute.arch.mbarrier_init_fence()
        # Nothing global before this: the kernel before this one on the stream may still
        # be writing Q, the cache, the lengths or the plan, or reading what this one
        # overwrites (the split workspace of the call before).
        cute.arch.griddepcontrol_wait()
        # The combine kernel may start now: its CTAs wait for this grid's end, on SMs
        # that CTAs of this grid with little or no work leave early. Not before the wait
        # above: the combine reads the plan's fragment counts before it waits, so this
        # grid lets it start only once the kernel that wrote the plan has completed.
        cute.arch.griddepcontrol_launch_dependents()
        cute.arch.sync_threads()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)

        # All MMAs accumulate (S is zeroed before its first k-step): the flag is set once,
        # before any of the data-dependent branches that issue MMAs.
        for tiled_mma in (tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss):
            tiled_mma.set(warpgroup.Field.ACCUMULATE, True)

        work = CtaWork(mSeqlens, mBlockTable, mMeta, mNumSplits, mO, mLse, mOAccum, mLseAccum, softmax_scale,
                       heads_per_kv, part, kv_head, m_tile)
        if warpgroup_idx == 0:
            take_registers(PRODUCER_REGS, THREADS)
            if warp_idx == 0:
                self.produce(tma_q, mQ_tma, tma_k, mK_tma, sQ, sK, kv, q_ring, work)
        else:
            take_registers(CONSUMER_REGS, THREADS)
            args = (tidx % WARPGROUP_THREADS, tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss, sQ, sK, storage, kv, q_ring,
                    work)
            if warpgroup_idx == 1:
                self.consume(0, *args)
            else:
                self.consume(1, *args)

    @cute.jit
    def blocks_of(self, work: CtaWork, batch: Int32, begin_batch: Int32, begin_block: Int32, end_batch: Int32,
                  end_block: Int32, seqlen=None):
        """(seqlen, first block, one past the last block) that this part loads for ``batch``
        (``seqlen``: the sequence's length, read here where None).

        Blocks at or past ``ceil(seqlen / 64)`` are never loaded (a sequence of length 0
        has a block slot in the plan, but nothing to read), nor past the block table's
        width: a length the table cannot hold is never read out of bounds (the epilogue
        writes NaN for such a sequence instead of a silently truncated result).
        """
        if const_expr(seqlen is None):
            seqlen = work.mSeqlens[batch]
        num_blocks = cutlass.min((seqlen + BLOCK_N - 1) // BLOCK_N, work.mBlockTable.shape[1])
        first = Int32(0)
        if batch == begin_batch:
            first = begin_block
        last = num_blocks
        if batch == end_batch:
            last = cutlass.min(end_block, num_blocks)
        return seqlen, first, last

    @cute.jit
    def produce(
        self, tma_q, mQ_tma, tma_k, mK_tma, sQ, sK, kv, q_ring, work: CtaWork,
    ):
        begin_batch, begin_block, end_batch, end_block = work.part_range()
        num_m_tiles, _, _ = cute.arch.grid_dim()
        cpasync.prefetch_descriptor(tma_q)
        cpasync.prefetch_descriptor(tma_k)
        gQ = cute.flat_divide(mQ_tma, (TILE_M, CHUNK))  # (64, 64, tiles_m, chunks, h_kv, b)
        gK = cute.flat_divide(mK_tma, (BLOCK_N, CHUNK))  # (64, 64, 1, chunks, h_kv, pages)
        # Q and the K stages as (row, column-in-chunk, chunk, stage).
        sQ_chunks = cute.make_tensor(sQ.iterator, utils.chunked_layout(TILE_M, self.head_dim, 1))
        sK_chunks = cute.make_tensor(sK.iterator, utils.chunked_layout(BLOCK_N, self.head_dim, NUM_STAGES))
        tQsQ, tQgQ = cpasync.tma_partition(
            tma_q, 0, cute.make_layout(1), cute.group_modes(sQ_chunks, 0, 2), cute.group_modes(gQ, 0, 2)
        )
        tKsK, tKgK = cpasync.tma_partition(
            tma_k, 0, cute.make_layout(1), cute.group_modes(sK_chunks, 0, 2), cute.group_modes(gK, 0, 2)
        )
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, NUM_STAGES)
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
        for batch in cutlass.range(begin_batch, end_batch + 1, unroll=1):
            q_load = (q_state, tma_q, tQgQ[None, work.m_tile, None, work.kv_head, batch], tQsQ[None, None, 0], None)
            # A CTA's first Q starts first: its buffer is free, and its address needs
            # nothing read from memory but the plan, so its lo half lands while the
            # sequence length and the block table are read (its hi half waits behind
            # K's lo half, which S needs first).
            if batch == begin_batch:
                q_ring.load(*q_load, self.lo)
            seqlen, first, last = self.blocks_of(work, batch, begin_batch, begin_block, end_batch, end_block)
            # A long run of one sequence read by one query tile (the memory-bound case)
            # or by two (a longer run) is a stream: its K tiles get their own L2
            # treatment (k_cache_policy, load_k's prefetch).
            stream = is_stream(last - first, num_m_tiles)
            cache_policy = self.k_cache_policy(stream)
            # A later Q goes between the halves of the batch's first K tile: S's first
            # k-steps need only the lo halves of Q and of that tile (the rings' groups),
            # and Q's buffer frees up only when the previous batch's last block is done,
            # which the tile's lo chunks need not wait for. (Loops of 0 or 1 trips
            # rather than branches: pipeline states are advanced in loop bodies.)
            split = cutlass.min(first + 1, last)
            for block in cutlass.range(first, split, unroll=1):
                self.load_k(tma_k, tKgK, tKsK, kv, kv_state, work, batch, block, cache_policy, stream, self.lo)
            if batch == begin_batch:
                q_ring.load(*q_load, self.hi)
            else:
                q_ring.load(*q_load, self.all_chunks)
            q_state.advance()
            for block in cutlass.range(first, split, unroll=1):
                self.load_k(tma_k, tKgK, tKsK, kv, kv_state, work, batch, block, cache_policy, stream, self.hi)
                kv_state.advance()
            for block in cutlass.range(split, last, unroll=1):
                self.load_k(tma_k, tKgK, tKsK, kv, kv_state, work, batch, block, cache_policy, stream, self.all_chunks)
                kv_state.advance()

    @cute.jit
    def k_cache_policy(self, stream) -> Int64:
        """L2 eviction priority of a run of K tiles of one sequence.

        ``EVICT_FIRST``, except for a ``stream`` (a run of ``STREAM_BLOCKS`` or more read
        by a single query tile, the memory-bound case, or of ``SHARED_STREAM_BLOCKS`` or
        more read by two): there the default priority was 2-3% faster with one query
        tile and ~1% with two when the kernels before this one left L2 full of dirty
        lines, and slower for short runs and for four query tiles sharing each K tile
        (measured, with no known cause: benchmarks/NOTES.md, "The memory-bound gap: the
        K loads' eviction hint", "K at the default L2 priority where one or two query
        tiles read a long run")."""
        policy = Int64(utils.TMA_EVICT_FIRST)
        if stream:
            policy = Int64(utils.TMA_EVICT_NORMAL)
        return policy

    @cute.jit
    def load_k(self, tma_k, tKgK, tKsK, kv, kv_state, work: CtaWork, batch, block, cache_policy, stream, chunks):
        """TMA of ``chunks`` (whole groups) of one 64-token page of K (and V, its first
        512 columns) into the next stage, each group as soon as both consumers are done
        with it.

        In a ``stream``, the page's hi chunks are asked of L2 as its lo half is copied:
        the hi half is released later (after ``P0 V0_R``), and the stream is bound by
        the bytes in flight (sk8192 h16 s1 0.7% faster; with four query tiles or short
        runs, 1-5% slower: benchmarks/NOTES.md, "a block's hi half asked of L2"). Where
        two query tiles share the stream only the first tile's producer asks: both
        CTAs read each page at about the same time, so one request brings it for both,
        and the second's would only add L2 requests, which cost clock at the power limit
        (0.4-2% faster on an H200: NOTES, "the two-tile streams' hi prefetch asked by
        one of the two tiles")."""
        page = work.mBlockTable[batch, block]
        src = tKgK[None, 0, None, work.kv_head, page]
        dst = tKsK[None, None, kv_state.index]
        if const_expr(self.lo.start in chunks):
            kv.load(kv_state, tma_k, src, dst, cache_policy, self.lo)
            if stream & (work.m_tile == 0):
                for c in cutlass.range_constexpr(self.hi.start, self.hi.stop):
                    cute.prefetch(tma_k, src[None, c])
        if const_expr(self.hi.start in chunks):
            kv.load(kv_state, tma_k, src, dst, cache_policy, self.hi)

    @staticmethod
    def kv_stage(count: Int32) -> pipeline.PipelineState:
        """Consumer state of the ``count``-th K tile this CTA receives (both consumers
        see every tile; the ring's stage and phase follow from the count)."""
        return pipeline.PipelineState(NUM_STAGES, count, count % NUM_STAGES, (count // NUM_STAGES) % 2)

    @cute.jit
    def consumer_tensors(self, wg: cutlass.Constexpr, wg_tidx: Int32, tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss,
                         sQ, sK, storage) -> "ConsumerTensors":
        """This consumer thread's MMA fragments, shared-memory views and row state."""
        dv_per_wg = self.dv_per_wg
        stage_elems = BLOCK_N * self.head_dim
        # V: this consumer's output columns of every K stage (64-column chunks
        # 4 wg .. 4 wg + 3) as an MN-major operand: N = column, K = token.
        sV_mine = cute.make_tensor(
            sK.iterator + wg * (dv_per_wg * BLOCK_N),
            cute.make_layout(
                ((CHUNK, dv_per_wg // CHUNK), (ATOM_ROWS, BLOCK_N // ATOM_ROWS), (1, NUM_STAGES)),
                stride=((1, BLOCK_N * CHUNK), (CHUNK, ATOM_ROWS * CHUNK), (0, stage_elems)),
            ),
        )
        # P of each stage's block, kept in that stage's rope chunk: a K-major
        # (query row, token) tile with the same 1 KB swizzle atoms as the K tile.
        sP = cute.make_tensor(
            sK.iterator + self.rope_chunk * (BLOCK_N * CHUNK),
            cute.make_layout(
                ((ATOM_ROWS, TILE_M // ATOM_ROWS), (BLOCK_N, 1), (1, NUM_STAGES)),
                stride=((CHUNK, ATOM_ROWS * CHUNK), (1, 0), (0, stage_elems)),
            ),
        )
        fragments = split_o_fragments(wg_tidx, tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss, sQ, sK, sV_mine, sP,
                                      (TILE_M, BLOCK_N), (TILE_M, dv_per_wg), self.dtype)
        num_rows = cute.size(fragments["s_rc"], mode=[0])
        return ConsumerTensors(
            **fragments,
            sK=sK,
            stats=storage.stats.get_tensor(cute.make_layout((TILE_M, NUM_STATS), stride=(1, TILE_M))),
            row_max=cute.make_rmem_tensor((num_rows,), Float32),
            row_sum=cute.make_rmem_tensor((num_rows,), Float32),
            row_limit=cute.make_rmem_tensor((num_rows,), Int32),
            block_max=cute.make_rmem_tensor((num_rows,), Float32),
            o_scale=cute.make_rmem_tensor((num_rows,), Float32),
            next_scale=cute.make_rmem_tensor((num_rows,), Float32),
            wg_tidx=wg_tidx,
            lane_writes_row=wg_tidx % 4 == 0,
        )

    @cute.jit
    def consume(
        self, wg: cutlass.Constexpr, wg_tidx: Int32, tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss, sQ, sK, storage,
        kv, q_ring, work: CtaWork,
    ):
        """One consumer warpgroup (``wg`` 0 the left one, 1 the right one): for each
        batch of the part's range, the pairs of blocks (``left_pair`` / ``right_pair``,
        the schedule table of the module docstring), then ``finish_batch``."""
        begin_batch, begin_block, end_batch, end_block = work.part_range()
        rows_per_kv = work.mOAccum.shape[2]
        s_q = rows_per_kv // work.heads_per_kv
        scale_log2 = work.softmax_scale * math.log2(math.e)
        t = self.consumer_tensors(wg, wg_tidx, tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss, sQ, sK, storage)
        bars = ConsumerBarriers.create(wg)
        num_rows = cute.size(t.s_rc, mode=[0])
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
        tiles_seen = Int32(0)
        # What a batch's first S and its epilogue need from the plan is read a batch
        # ahead or at the batch's start, off the path of both: each read is an L2 round
        # trip. (An empty part's range is (b, b - 1): it reads sequence b - 1, unused.)
        begin_split = work.mMeta[work.part, BEGIN_SPLIT]
        next_seqlen = work.mSeqlens[cutlass.min(begin_batch, end_batch)]

        for batch in cutlass.range(begin_batch, end_batch + 1, unroll=1):
            f = self.fragment(work, batch, next_seqlen, begin_split, begin_batch, begin_block, end_batch, end_block)
            next_seqlen = work.mSeqlens[cutlass.min(batch + 1, end_batch)]
            seqlen, first, last = f.seqlen, f.first, f.last
            # Per-row limit on visible kv positions (causal: query token s sees < seqlen - (s_q - 1 - s)).
            for i in cutlass.range_constexpr(num_rows):
                row = work.m_tile * TILE_M + t.coord_s[i, 0][0]
                limit = seqlen
                if const_expr(self.causal):
                    limit = cutlass.min(seqlen - (s_q - 1 - row // work.heads_per_kv), seqlen)
                t.row_limit[i] = limit
                t.row_max[i] = -Float32.inf
                t.row_sum[i] = 0.0
            t.acc_o.fill(0.0)
            mask_from = seqlen  # blocks reaching past this need masking for some row
            if const_expr(self.causal):
                mask_from = seqlen - (s_q - 1)

            q = BatchQ(q_ring, q_state)
            for pair in cutlass.range(first, last, 2, unroll=1):
                has_second = pair + 1 < last
                first_state = self.kv_stage(tiles_seen)
                second_state = self.kv_stage(tiles_seen + 1)
                if const_expr(wg == 0):
                    self.left_pair(t, bars, kv, q, pair, first_state, second_state, has_second, seqlen, mask_from,
                                   scale_log2)
                else:
                    self.right_pair(t, bars, kv, q, pair, first_state, second_state, has_second, seqlen, mask_from,
                                    scale_log2)
                tiles_seen = tiles_seen + cutlass.min(last - pair, 2)
            if first >= last:
                # No block, so no S waited for this batch's Q, which is loaded all the
                # same: the CTA does not end while that load may still be landing.
                q.wait(self.all_chunks)
            q_ring.release(q_state, self.all_chunks)
            q_state.advance()
            self.finish_batch(wg, t, bars, work, f)

    @cute.jit
    def fragment(self, work: CtaWork, batch: Int32, seqlen: Int32, begin_split: Int32, begin_batch: Int32,
                 begin_block: Int32, end_batch: Int32, end_block: Int32) -> Fragment:
        """``batch`` of the part as a ``Fragment`` (``seqlen`` its length, ``begin_split`` the
        part's first fragment number, from its plan row)."""
        seqlen, first, last = self.blocks_of(work, batch, begin_batch, begin_block, end_batch, end_block, seqlen)
        first_split = work.mNumSplits[batch]
        split_idx = first_split
        if batch == begin_batch:
            split_idx = split_idx + begin_split
        return Fragment(batch, seqlen, first, last, work.mNumSplits[batch + 1] - first_split == 1, split_idx)

    @cute.jit
    def left_pair(self, t, bars, kv, q, pair, first_state, second_state, has_second, seqlen, mask_from, scale_log2):
        """The left consumer's part of a pair of blocks (K0, K1): ``S0 = Q K0^T``; the
        softmax of S0 against the running maximum (m0, s0, P0 to the right consumer);
        ``O_L = O_L s0 + P0 V0_L``; then, with m1 and s1 from the right consumer,
        ``O_L = O_L s1 + P1 V1_L``."""
        num_rows = cute.size(t.s_rc, mode=[0])
        self.block_scores(pair, first_state, kv, q, t, bars, seqlen, mask_from)
        for i in cutlass.range_constexpr(num_rows):
            m0 = softmax.next_max(t.row_max[i], softmax.row_max(t.s_rc, i), scale_log2)
            m0_scaled = softmax.scaled_max(m0, scale_log2)
            s0 = softmax.rescale_factor(t.row_max[i], m0_scaled, scale_log2)
            t.row_sum[i] = t.row_sum[i] * s0 + softmax.exponentiate_row(t.s_rc, i, scale_log2, m0_scaled)
            if t.lane_writes_row:
                t.stats[t.coord_s[i, 0][0], STAT_M0] = m0
                t.stats[t.coord_s[i, 0][0], STAT_S0] = s0
            t.o_scale[i] = s0
        # P0 (relative to m0) to the rope chunk of its stage, with m0 and s0, for the
        # right consumer: it needs nothing else from this pair. O's rescale (128
        # multiplies a thread) waits until the message is out: only P0 V0_L needs it.
        self.share_p(t, first_state)
        bars.left_stats.arrive()
        for i in cutlass.range_constexpr(num_rows):
            softmax.rescale_row(t.o_rc, i, t.o_scale[i])
        kv.release(first_state, self.hi)
        self.issue_pv(t.tiled_mma_o_rs, t, t.p_operand, None, t.tOrV_rs, first_state)

        bars.right_stats.arrive_and_wait()
        warpgroup.wait_group(0)
        kv.release(first_state, self.lo)  # V0_L read: the next block's lo may load
        for i in cutlass.range_constexpr(num_rows):
            r = t.coord_s[i, 0][0]
            s1 = t.stats[r, STAT_S1]
            t.row_max[i] = t.stats[r, STAT_M1]
            t.row_sum[i] = t.row_sum[i] * s1
            softmax.rescale_row(t.o_rc, i, s1)
        if has_second:
            kv.wait(second_state, self.all_chunks)
            bars.p1_shared.arrive_and_wait()
            self.pv_then_release(t.tiled_mma_o_ss, t, t.tOrP_ss, second_state, t.tOrV_ss, kv, self.all_chunks)

    @cute.jit
    def right_pair(self, t, bars, kv, q, pair, first_state, second_state, has_second, seqlen, mask_from, scale_log2):
        """The right consumer's part of a pair of blocks (K0, K1): ``S1 = Q K1^T``; with
        m0 and s0 from the left consumer, the softmax of S1 (m1 and s1 to the left
        consumer, then P1, exponentiated and stored while ``P0 V0_R`` runs);
        ``O_R = (O_R s0 + P0 V0_R) s1 + P1 V1_R``, P0 still relative to m0."""
        num_rows = cute.size(t.s_rc, mode=[0])
        for i in cutlass.range_constexpr(num_rows):
            t.block_max[i] = -Float32.inf
        if has_second:
            self.block_scores(pair + 1, second_state, kv, q, t, bars, seqlen, mask_from)
            kv.release(second_state, self.lo)  # the left consumer still reads V1_L
            for i in cutlass.range_constexpr(num_rows):
                t.block_max[i] = softmax.row_max(t.s_rc, i)
        bars.left_stats.arrive_and_wait()
        # This consumer never reads lo of the first block: release it at once.
        kv.wait(first_state, self.lo)
        kv.release(first_state, self.lo)
        for i in cutlass.range_constexpr(num_rows):
            r = t.coord_s[i, 0][0]
            m0 = t.stats[r, STAT_M0]
            s0 = t.stats[r, STAT_S0]
            m1 = softmax.next_max(m0, t.block_max[i], scale_log2)
            s1 = softmax.rescale_factor(m0, softmax.scaled_max(m1, scale_log2), scale_log2)
            t.row_sum[i] = t.row_sum[i] * (s0 * s1)
            if t.lane_writes_row:
                t.stats[r, STAT_M1] = m1
                t.stats[r, STAT_S1] = s1
            t.row_max[i] = m1
            t.next_scale[i] = s1
            t.o_scale[i] = s0
        # m1 and s1 go first, before P1 is exponentiated: the left needs them (to free
        # K0's lo half and rescale O_L) long before it needs P1.
        bars.right_stats.arrive()
        # O's rescale by s0 waits until the message is out: only P0 V0_R needs it.
        for i in cutlass.range_constexpr(num_rows):
            softmax.rescale_row(t.o_rc, i, t.o_scale[i])
        kv.wait(first_state, self.hi)
        self.issue_pv(t.tiled_mma_o_ss, t, t.tOrP_ss, first_state, t.tOrV_ss, first_state)
        if has_second:
            # P1 while P0 V0_R runs (it reads P0 and V0_R from shared memory, not S1's
            # registers), both rows in one block so that their exponentials interleave;
            # then stored for the left consumer's P1 V1_L.
            for i in cutlass.range_constexpr(num_rows):
                m1_scaled = softmax.scaled_max(t.row_max[i], scale_log2)
                t.row_sum[i] = t.row_sum[i] + softmax.exponentiate_row(t.s_rc, i, scale_log2, m1_scaled)
            self.share_p(t, second_state)
            bars.p1_shared.arrive()
        warpgroup.wait_group(0)
        kv.release(first_state, self.hi)
        for i in cutlass.range_constexpr(num_rows):
            softmax.rescale_row(t.o_rc, i, t.next_scale[i])
        if has_second:
            self.pv_then_release(t.tiled_mma_o_rs, t, t.p_operand, None, t.tOrV_rs, kv, self.hi, second_state)

    @cute.jit
    def pv_then_release(self, tiled_mma, t, p, p_state, tOrV, kv, chunks, v_state=None):
        """``O += P V`` of one block (``issue_pv``; V of ``v_state``, by default
        ``p_state``), waited for, then ``chunks`` of V's stage released."""
        if const_expr(v_state is None):
            v_state = p_state
        self.issue_pv(tiled_mma, t, p, p_state, tOrV, v_state)
        warpgroup.wait_group(0)
        kv.release(v_state, chunks)

    @cute.jit
    def issue_pv(self, tiled_mma, t, p, p_state, tOrV, v_state):
        """Issue ``O += P V`` of one block as one commit group, not waited for (``p_state``
        None: P from registers, else from that stage's shared memory; V of ``v_state``)."""
        warpgroup.fence()
        self.pv(tiled_mma, t.acc_o, p, None if const_expr(p_state is None) else p_state.index, tOrV, v_state.index)
        warpgroup.commit_group()

    @cute.jit
    def share_p(self, t, state):
        """This consumer's P (in the input dtype, also kept in registers for its own
        P V) into the rope chunk of ``state``'s stage, for the other consumer."""
        t.p_regs.store(t.acc_s.load().to(self.dtype))
        cute.copy(t.p_store, t.p_store.retile(t.p_regs), t.tPsP[None, None, None, state.index])
        cute.arch.fence_view_async_shared()

    @cute.jit
    def finish_batch(self, wg: cutlass.Constexpr, t, bars, work: CtaWork, f: Fragment):
        """The batch's epilogue: total row sums (each consumer summed its own blocks),
        normalize, store the output, or the fragment's partial (in the output's dtype)
        for the combine kernel when the sequence was split; either row whole sectors at
        a time (``utils.store_acc_row_sectors``)."""
        mO, mLse, mOAccum, mLseAccum = work.mO, work.mLse, work.mOAccum, work.mLseAccum
        heads_per_kv, kv_head = work.heads_per_kv, work.kv_head
        batch, seqlen, whole, split_idx = f.batch, f.seqlen, f.whole, f.split_idx
        num_rows = cute.size(t.s_rc, mode=[0])
        rows_per_kv = mOAccum.shape[2]
        table_tokens = work.mBlockTable.shape[1] * BLOCK_N
        for i in cutlass.range_constexpr(num_rows):
            total = utils.quad_sum(t.row_sum[i])
            if t.lane_writes_row:
                t.stats[t.coord_s[i, 0][0], STAT_SUM_L + wg] = total
        bars.sums.arrive_and_wait()
        for i in cutlass.range_constexpr(num_rows):
            r = t.coord_s[i, 0][0]
            row = work.m_tile * TILE_M + r
            total = t.stats[r, STAT_SUM_L] + t.stats[r, STAT_SUM_R]
            inv = Float32(0.0)
            lse = -Float32.inf
            if total != 0.0:  # a NaN sum (a NaN key) gives NaN out and lse, as the reference does
                inv = cute.arch.rcp_approx(total)
                lse = t.row_max[i] * work.softmax_scale + cute.math.log(total, fastmath=False)
            if seqlen > table_tokens:  # NaN, not lse +inf below: the table holds no key of it
                inv = Float32.nan
                lse = Float32.nan
            s = row // heads_per_kv
            head = kv_head * heads_per_kv + (row - s * heads_per_kv)
            # The output's row or the fragment's partial row, through one copy of the
            # store's code (a CTA of few blocks runs its epilogue's code cold). Every
            # lane stores (its shuffles), the rows past the query's only where valid.
            dst_addr = cutlass.select_(whole, mO[batch, s, head, None].iterator.toint(),
                                       mOAccum[split_idx, kv_head, row, None].iterator.toint())
            dst_row = cute.make_tensor(
                cute.make_ptr(self.dtype, Int64(dst_addr), cute.AddressSpace.gmem, assumed_align=ROW_ALIGN_BYTES),
                cute.make_layout((mO.shape[3],)))
            utils.store_acc_row_sectors(t.o_rc, t.coord_o, i, inv, dst_row, wg * self.dv_per_wg, self.dtype,
                                        row < rows_per_kv)
            if wg == 0 and t.lane_writes_row and row < rows_per_kv:
                if whole:
                    if (total == 0.0) & (seqlen <= table_tokens):
                        lse = Float32.inf  # no visible key: FlashMLA's convention
                    mLse[batch, head, s] = lse
                else:
                    mLseAccum[split_idx, kv_head, row] = lse
        # Nobody may overwrite the sums before both consumers read them.
        bars.sums.arrive_and_wait()

    @cute.jit
    def block_scores(self, block, state, kv, q, t, bars, seqlen, mask_from):
        """``S = Q K^T`` of one block into ``t.acc_s``, with keys a row may not see at
        -inf; a block that reaches past the sequence's end then has the value columns
        of its rows past the end zeroed, for both consumers' products. Each chunk's
        k-steps are issued as soon as that chunk of K and of Q (``q``, a ``BatchQ``)
        have landed."""
        stage = state.index
        block_start = block * BLOCK_N
        t.acc_s.fill(0.0)
        warpgroup.fence()
        steps_per_chunk = CHUNK // utils.MMA_K
        for c in cutlass.range_constexpr(self.k_chunks):
            if const_expr(c in kv.group_starts()):  # Q's groups are K's
                kv.wait(state, range(c, c + 1))
                q.wait(range(c, c + 1))
            for k in cutlass.range_constexpr(c * steps_per_chunk, (c + 1) * steps_per_chunk):
                cute.gemm(t.tiled_mma_s, t.acc_s, t.tSrQ[None, None, k, 0], t.tSrK[None, None, k, stage], t.acc_s)
        warpgroup.commit_group()
        warpgroup.wait_group(0)
        if block_start + BLOCK_N > mask_from:
            softmax.mask_scores(t.s_rc, t.coord_s, block_start, t.row_limit)
            if block_start + BLOCK_N > seqlen:  # (mask_from <= seqlen)
                # Cache slots past the sequence end hold anything (NaN in the tests):
                # their scores are masked whatever they hold, but 0 * slot would poison
                # O through P V. Zeroed after S, so that S of a partial block starts on
                # its first landed chunks; no other S reads this block, and the other
                # consumer's product with it waits for this consumer's next message.
                self.zero_tail_rows(t.sK, stage, seqlen - block_start, t.wg_tidx)
                cute.arch.fence_view_async_shared()
                bars.mine.arrive_and_wait()

    @cute.jit
    def pv(self, tiled_mma, acc_o, p, p_stage, tOrV, v_stage):
        """``O += P V`` over the 64 tokens of one block (P from registers when
        ``p_stage`` is None, else from that stage's shared memory)."""
        for k in cutlass.range_constexpr(cute.size(tOrV, mode=[2])):
            if const_expr(p_stage is None):
                a = p[None, None, k]
            else:
                a = p[None, None, k, p_stage]
            cute.gemm(tiled_mma, acc_o, a, tOrV[None, None, k, v_stage], acc_o)

    @cute.jit
    def zero_tail_rows(self, sK: cute.Tensor, stage: Int32, first_invalid: Int32, wg_tidx: Int32):
        """Zero the value columns (``0 .. dv``) of token rows ``[max(first_invalid, 0), 64)``
        of one K stage, with 16-byte stores.

        With 128-byte swizzle atoms, the 64 columns of one chunk of one token are one
        128-byte line of shared memory (the swizzle only permutes the 16-byte pieces
        inside it), so a token's chunk is cleared by writing its whole line, wherever
        the swizzle put each piece. The rope chunk is left alone: its scores are masked
        to -inf after S, and nothing multiplies it with P.
        """
        elems_per_piece = 128 // self.dtype.width  # 16 bytes
        pieces_per_line = CHUNK // elems_per_piece
        value_chunks = self.head_dim_v // CHUNK
        first_row = cutlass.max(first_invalid, 0)
        # (element, piece, token, chunk, stage), unswizzled: token t's line of chunk c
        # starts at element c * 64 * 64 + t * 64 of its stage (the producer's layout).
        lines = cute.make_tensor(
            sK.iterator,
            cute.make_layout(
                (elems_per_piece, pieces_per_line, BLOCK_N, value_chunks, NUM_STAGES),
                stride=(1, elems_per_piece, CHUNK, BLOCK_N * CHUNK, BLOCK_N * self.head_dim),
            ),
        )
        zeros = cute.make_rmem_tensor((elems_per_piece,), self.dtype)
        zeros.fill(0.0)
        per_row = pieces_per_line * value_chunks
        for idx in cutlass.range(wg_tidx, (BLOCK_N - first_row) * per_row, WARPGROUP_THREADS, unroll=2):
            row = first_row + idx // per_row
            rest = idx - (row - first_row) * per_row
            chunk = rest // pieces_per_line
            cute.autovec_copy(zeros, lines[None, rest - chunk * pieces_per_line, row, chunk, stage])
