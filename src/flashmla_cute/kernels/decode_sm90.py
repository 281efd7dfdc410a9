"""The split-KV MLA decode kernel for Hopper (sm_90a).

One CTA per (SM part, KV head, 64-row query tile). A CTA walks the contiguous range of
(batch, 64-token block) work that the scheduler gave its part (see ``scheduler.py``),
and for each batch in that range runs flash-attention's online softmax over its blocks,
then writes either the final output or, when the sequence was split across parts, an
fp32 partial (O, LSE) that ``combine.py`` merges.

Warp roles (384 threads):

- warpgroup 0, warp 0: the producer. Issues TMA bulk-tensor loads of Q (once per
  batch) and of K tiles straight out of the paged cache (the page index read from the
  block table) into a 2-stage ring completing on mbarriers.
- warpgroups 1 and 2: the consumers. Consumer ``c`` computes ``S_c = Q K_c^T`` for the
  32 tokens ``[32c, 32c + 32)`` of the tile (so no MMA work is duplicated), the two
  exchange their row maxima through shared memory, each writes its half of
  ``P = exp(S - m)`` to shared memory, and then each computes ``O_c += P V_c`` for its
  256 of the 512 output columns. V is the first 512 columns of the same shared-memory
  K tile, read as an MN-major operand: K/V are loaded once.

Shared memory: Q 72 KB + two K stages of 72 KB + P 8 KB + row statistics.
"""

from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Int64, const_expr, pipeline
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warp, warpgroup
from cutlass.tensor_utils import LayoutEnum

from . import utils

BLOCK_N = 64  # tokens per KV tile (== page size)
TILE_M = 64  # query rows per CTA (the WGMMA's M)
NUM_STAGES = 2  # K/V tiles in flight
NUM_CONSUMER_WARPGROUPS = 2
THREADS = 128 * (1 + NUM_CONSUMER_WARPGROUPS)
PRODUCER_REGS = 40
CONSUMER_REGS = 232

# Named barriers (0 is __syncthreads).
BAR_CONSUMERS = 1  # both consumer warpgroups (256 threads)
BAR_WG_BASE = 2  # + consumer index: one consumer warpgroup (128 threads)


@cute.jit
def accumulators(mAccum: cute.Tensor, num_acc, h_kv, rows, dv: cutlass.Constexpr):
    """Views of the one fp32 workspace (one allocation per call instead of two) as the
    partial outputs ``(num_acc, h_kv, rows, dv)`` followed by their log-sum-exps
    ``(num_acc, h_kv, rows)``; ``num_acc = b + num_parts`` bounds the fragments."""
    o_elems = num_acc * h_kv * rows * dv
    o_accum = cute.make_tensor(
        mAccum.iterator,
        cute.make_layout((num_acc, h_kv, rows, dv), stride=(h_kv * rows * dv, rows * dv, dv, 1)),
    )
    lse_accum = cute.make_tensor(
        mAccum.iterator + o_elems,
        cute.make_layout((num_acc, h_kv, rows), stride=(h_kv * rows, rows, 1)),
    )
    return o_accum, lse_accum


class MlaDecodeSm90:
    """Static configuration of one decode kernel variant.

    ``dtype`` (BFloat16 or Float16), ``head_dim`` (d, 576) and ``head_dim_v`` (dv, 512)
    and ``causal`` are compiled in; everything else (batch, heads, lengths, scale,
    number of SM parts) is a runtime value.
    """

    def __init__(self, dtype, head_dim: int = 576, head_dim_v: int = 512, causal: bool = False):
        if head_dim % 64 != 0 or head_dim_v % (64 * NUM_CONSUMER_WARPGROUPS) != 0 or head_dim_v > head_dim:
            raise ValueError(f"unsupported head dims d={head_dim}, dv={head_dim_v}")
        self.dtype = dtype
        self.head_dim = head_dim
        self.head_dim_v = head_dim_v
        self.causal = causal
        self.n_per_wg = BLOCK_N // NUM_CONSUMER_WARPGROUPS  # S columns per consumer
        self.dv_per_wg = head_dim_v // NUM_CONSUMER_WARPGROUPS  # O columns per consumer
        self.k_chunks = head_dim // 64  # 64-column (128-byte) swizzle atoms per row

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (b, h_kv, rows, d): query rows of each KV head
        mK: cute.Tensor,  # (num_blocks, 64, h_kv, d): the paged cache
        mBlockTable: cute.Tensor,  # (b, max_blocks) int32
        mSeqlens: cute.Tensor,  # (b,) int32
        mMeta: cute.Tensor,  # (num_parts, 8) int32, see scheduler.py
        mNumSplits: cute.Tensor,  # (b + 1,) int32
        mO: cute.Tensor,  # (b, s_q, h_q, dv) in q's dtype
        mLse: cute.Tensor,  # (b, h_q, s_q) fp32
        mAccum: cute.Tensor,  # fp32 workspace for split partials, see accumulators()
        softmax_scale: Float32,
        heads_per_kv: Int32,
        stream,
    ):
        dtype = self.dtype
        d, dv = self.head_dim, self.head_dim_v
        rows_per_kv = mQ.shape[2]
        mOAccum, mLseAccum = accumulators(mAccum, mO.shape[0] + mMeta.shape[0], mK.shape[2], rows_per_kv, dv)

        # TMA views: (rows, d, h_kv, b) for Q and (token, d, h_kv, page) for K.
        q_tma_src = cute.make_tensor(mQ.iterator, cute.select(mQ.layout, mode=[2, 3, 1, 0]))
        k_tma_src = cute.make_tensor(mK.iterator, cute.select(mK.layout, mode=[1, 3, 2, 0]))

        tiled_mma_s = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.K, Float32, (1, 1, 1), (TILE_M, self.n_per_wg)
        )
        tiled_mma_o = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.MN, Float32, (1, 1, 1), (TILE_M, self.dv_per_wg)
        )

        sQ_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (TILE_M, BLOCK_N, d), dtype, 1)
        sK_layout = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (TILE_M, BLOCK_N, d), dtype, NUM_STAGES)
        sP_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (TILE_M, dv, BLOCK_N), dtype, 1)

        tma_q, tma_q_tensor = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), q_tma_src, cute.select(sQ_layout, mode=[0, 1]), (TILE_M, d)
        )
        tma_k, tma_k_tensor = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), k_tma_src, cute.select(sK_layout, mode=[0, 1]), (BLOCK_N, d)
        )
        self.q_bytes = cute.size_in_bytes(dtype, cute.select(sQ_layout, mode=[0, 1]))
        self.k_bytes = cute.size_in_bytes(dtype, cute.select(sK_layout, mode=[0, 1]))

        @cute.struct
        class SharedStorage:
            kv_mbar: cute.struct.MemRange[Int64, NUM_STAGES * 2]
            q_mbar: cute.struct.MemRange[Int64, 2]
            row_max: cute.struct.MemRange[Float32, NUM_CONSUMER_WARPGROUPS * TILE_M]
            row_sum: cute.struct.MemRange[Float32, NUM_CONSUMER_WARPGROUPS * TILE_M]
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sK_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sP_layout)], 1024]

        self.shared_storage = SharedStorage

        num_parts = mMeta.shape[0]
        num_kv_heads = mK.shape[2]
        num_m_tiles = (rows_per_kv + TILE_M - 1) // TILE_M
        self.kernel(
            tiled_mma_s,
            tiled_mma_o,
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
            sP_layout,
        ).launch(
            grid=[num_parts, num_kv_heads, num_m_tiles],
            block=[THREADS, 1, 1],
            stream=stream,
            min_blocks_per_mp=1,
        )

    # ---------------------------------------------------------------- device side
    @cute.kernel
    def kernel(
        self,
        tiled_mma_s: cute.TiledMma,
        tiled_mma_o: cute.TiledMma,
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
        sP_layout: cute.ComposedLayout,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        part, kv_head, m_tile = cute.arch.block_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        warpgroup_idx = warp_idx // 4

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(self.shared_storage)

        consumer_warps = pipeline.CooperativeGroup(pipeline.Agent.Thread, 4 * NUM_CONSUMER_WARPGROUPS)
        kv_pipe = pipeline.PipelineTmaAsync.create(
            num_stages=NUM_STAGES,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1),
            consumer_group=consumer_warps,
            tx_count=self.k_bytes,
            barrier_storage=storage.kv_mbar.data_ptr(),
            defer_sync=True,
        )
        q_pipe = pipeline.PipelineTmaAsync.create(
            num_stages=1,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1),
            consumer_group=consumer_warps,
            tx_count=self.q_bytes,
            barrier_storage=storage.q_mbar.data_ptr(),
            defer_sync=True,
        )
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()
        # The combine kernel may be scheduled as soon as CTAs of this grid retire
        # (it waits for the whole grid before reading the partial results).
        cute.arch.griddepcontrol_launch_dependents()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)

        if warpgroup_idx == 0:
            cute.arch.setmaxregister_decrease(PRODUCER_REGS)
            if warp_idx == 0:
                self.produce(
                    tma_q, mQ_tma, tma_k, mK_tma, sQ, sK, kv_pipe, q_pipe, mBlockTable, mSeqlens, mMeta,
                    part, kv_head, m_tile,
                )
        else:
            cute.arch.setmaxregister_increase(CONSUMER_REGS)
            self.consume(
                warpgroup_idx - 1, tidx % 128, tiled_mma_s, tiled_mma_o, sQ, sK, sP, storage, kv_pipe, q_pipe,
                mSeqlens, mMeta, mNumSplits, mO, mLse, mOAccum, mLseAccum, softmax_scale, heads_per_kv,
                part, kv_head, m_tile,
            )

    @cute.jit
    def blocks_of(self, mSeqlens: cute.Tensor, batch: Int32, begin_batch: Int32, begin_block: Int32,
                  end_batch: Int32, end_block: Int32):
        """(seqlen, first block, one past the last block) that this part loads for ``batch``.

        Blocks at or past ``ceil(seqlen / 64)`` are never loaded (a sequence of length 0
        has a block slot in the plan, but nothing to read).
        """
        seqlen = mSeqlens[batch]
        num_blocks = (seqlen + BLOCK_N - 1) // BLOCK_N
        first = Int32(0)
        if batch == begin_batch:
            first = begin_block
        last = num_blocks
        if batch == end_batch:
            last = cutlass.min(end_block, num_blocks)
        return seqlen, first, last

    @cute.jit
    def produce(
        self, tma_q, mQ_tma, tma_k, mK_tma, sQ, sK, kv_pipe, q_pipe, mBlockTable, mSeqlens, mMeta,
        part, kv_head, m_tile,
    ):
        begin_batch, begin_block, end_batch, end_block = (mMeta[part, i] for i in range(4))
        cpasync.prefetch_descriptor(tma_q)
        cpasync.prefetch_descriptor(tma_k)
        # (TMA, tiles_m, 1, h_kv, b) and (TMA, 1, 1, h_kv, pages)
        gQ = cute.flat_divide(mQ_tma, (TILE_M, self.head_dim))
        gK = cute.flat_divide(mK_tma, (BLOCK_N, self.head_dim))
        tQsQ, tQgQ = cpasync.tma_partition(
            tma_q, 0, cute.make_layout(1), cute.group_modes(sQ, 0, 2), cute.group_modes(gQ, 0, 2)
        )
        tKsK, tKgK = cpasync.tma_partition(
            tma_k, 0, cute.make_layout(1), cute.group_modes(sK, 0, 2), cute.group_modes(gK, 0, 2)
        )
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, NUM_STAGES)
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
        evict_first = Int64(utils.TMA_EVICT_FIRST)
        for batch in cutlass.range(begin_batch, end_batch + 1, unroll=1):
            seqlen, first, last = self.blocks_of(mSeqlens, batch, begin_batch, begin_block, end_batch, end_block)
            # Q goes after the batch's first K tile: its buffer frees up only when the
            # previous batch's last block is done, and that K load need not wait for it.
            # (Loops of 0 or 1 trips rather than branches: pipeline states are advanced
            # in loop bodies.)
            split = cutlass.min(first + 1, last)
            for block in cutlass.range(first, split, unroll=1):
                self.load_k(tma_k, tKgK, tKsK, kv_pipe, kv_state, mBlockTable, kv_head, batch, block, evict_first)
                kv_state.advance()
            q_pipe.producer_acquire(q_state)
            cute.copy(tma_q, tQgQ[None, m_tile, 0, kv_head, batch], tQsQ[None, 0],
                      tma_bar_ptr=q_pipe.producer_get_barrier(q_state))
            q_state.advance()
            for block in cutlass.range(split, last, unroll=1):
                self.load_k(tma_k, tKgK, tKsK, kv_pipe, kv_state, mBlockTable, kv_head, batch, block, evict_first)
                kv_state.advance()

    @cute.jit
    def load_k(self, tma_k, tKgK, tKsK, kv_pipe, kv_state, mBlockTable, kv_head, batch, block, evict_first):
        """TMA of one 64-token page of K (and V, its first 512 columns) into the next stage."""
        page = mBlockTable[batch, block]
        kv_pipe.producer_acquire(kv_state)
        cute.copy(tma_k, tKgK[None, 0, 0, kv_head, page], tKsK[None, kv_state.index],
                  tma_bar_ptr=kv_pipe.producer_get_barrier(kv_state), cache_policy=evict_first)

    @cute.jit
    def consume(
        self, wg: Int32, wg_tidx: Int32, tiled_mma_s, tiled_mma_o, sQ, sK, sP, storage, kv_pipe, q_pipe,
        mSeqlens, mMeta, mNumSplits, mO, mLse, mOAccum, mLseAccum, softmax_scale, heads_per_kv,
        part, kv_head, m_tile,
    ):
        begin_batch, begin_block, end_batch, end_block, begin_split = (mMeta[part, i] for i in range(5))
        dtype = self.dtype
        n_per_wg, dv_per_wg = self.n_per_wg, self.dv_per_wg
        rows_per_kv = mOAccum.shape[2]
        s_q = rows_per_kv // heads_per_kv
        scale_log2 = softmax_scale * math.log2(math.e)

        # This consumer's tokens of the K tile: rows [32 wg, 32 wg + 32) of every stage.
        # The K-major tile is (8-row groups x 64-column chunks) of 1 KB swizzle atoms,
        # so a 32-row slice starts 4 groups (2048 elements) further on.
        sK_mine = cute.make_tensor(
            sK.iterator + wg * (n_per_wg * 64),
            cute.make_layout(
                ((8, n_per_wg // 8), (64, self.k_chunks), (1, NUM_STAGES)),
                stride=((64, 512), (1, BLOCK_N * 64), (0, BLOCK_N * self.head_dim)),
            ),
        )
        # V: this consumer's 256 output columns of the same tile, as an MN-major operand
        # (N = columns, K = tokens): 64-column chunks 4 wg .. 4 wg + 3.
        sV_mine = cute.make_tensor(
            sK.iterator + wg * (dv_per_wg * BLOCK_N),
            cute.make_layout(
                ((64, dv_per_wg // 64), (8, BLOCK_N // 8), (1, NUM_STAGES)),
                stride=((1, BLOCK_N * 64), (64, 512), (0, BLOCK_N * self.head_dim)),
            ),
        )
        # This consumer's 32 columns of P.
        sP_mine = cute.local_tile(sP[None, None, 0], (TILE_M, n_per_wg), (0, wg))

        thr_mma_s = tiled_mma_s.get_slice(wg_tidx)
        thr_mma_o = tiled_mma_o.get_slice(wg_tidx)
        tSrQ = thr_mma_s.make_fragment_A(thr_mma_s.partition_A(sQ))
        tSrK = thr_mma_s.make_fragment_B(thr_mma_s.partition_B(sK_mine))
        tOrP = thr_mma_o.make_fragment_A(thr_mma_o.partition_A(sP))
        tOrV = thr_mma_o.make_fragment_B(thr_mma_o.partition_B(sV_mine))
        acc_s = thr_mma_s.make_fragment_C(thr_mma_s.partition_shape_C((TILE_M, n_per_wg)))
        acc_o = thr_mma_o.make_fragment_C(thr_mma_o.partition_shape_C((TILE_M, dv_per_wg)))
        s_rc = utils.acc_as_rows_cols(acc_s)
        o_rc = utils.acc_as_rows_cols(acc_o)
        # Coordinates (row, col) of each accumulator element.
        coord_s = utils.acc_as_rows_cols(thr_mma_s.partition_C(cute.make_identity_tensor((TILE_M, n_per_wg))))
        coord_o = utils.acc_as_rows_cols(thr_mma_o.partition_C(cute.make_identity_tensor((TILE_M, dv_per_wg))))
        num_rows = cute.size(s_rc, mode=[0])

        p_store = cute.make_tiled_copy_C(
            cute.make_copy_atom(warp.StMatrix8x8x16bOp(transpose=False, num_matrices=4), dtype), tiled_mma_s
        ).get_slice(wg_tidx)
        tPsP = p_store.partition_D(sP_mine)

        row_max_mine = storage.row_max.get_tensor(cute.make_layout((TILE_M, NUM_CONSUMER_WARPGROUPS), stride=(1, TILE_M)))
        row_sum_mine = storage.row_sum.get_tensor(cute.make_layout((TILE_M, NUM_CONSUMER_WARPGROUPS), stride=(1, TILE_M)))
        lane_writes_row = wg_tidx % 4 == 0

        consumers = pipeline.NamedBarrier(barrier_id=BAR_CONSUMERS, num_threads=256)
        my_warpgroup = pipeline.NamedBarrier(barrier_id=BAR_WG_BASE + wg, num_threads=128)

        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, NUM_STAGES)
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
        row_max = cute.make_rmem_tensor((num_rows,), Float32)
        row_sum = cute.make_rmem_tensor((num_rows,), Float32)
        row_limit = cute.make_rmem_tensor((num_rows,), Int32)

        for batch in cutlass.range(begin_batch, end_batch + 1, unroll=1):
            seqlen, first, last = self.blocks_of(mSeqlens, batch, begin_batch, begin_block, end_batch, end_block)
            # Per-row limit on visible kv positions (causal: query token s sees < seqlen - (s_q - 1 - s)).
            for i in cutlass.range_constexpr(num_rows):
                row = m_tile * TILE_M + coord_s[i, 0][0]
                limit = seqlen
                if const_expr(self.causal):
                    limit = cutlass.min(seqlen - (s_q - 1 - row // heads_per_kv), seqlen)
                row_limit[i] = limit
                row_max[i] = -Float32.inf
                row_sum[i] = 0.0
            acc_o.fill(0.0)
            # Blocks at or past this position need masking for some row.
            mask_from = seqlen
            if const_expr(self.causal):
                mask_from = seqlen - (s_q - 1)

            q_pipe.consumer_wait(q_state)
            for block in cutlass.range(first, last, unroll=1):
                kv_pipe.consumer_wait(kv_state)
                stage = kv_state.index
                block_start = block * BLOCK_N
                if block_start + BLOCK_N > seqlen:
                    # Cache slots past the sequence end hold anything (NaN in the tests):
                    # zero my rows of them so that 0 * slot cannot poison O through P V.
                    self.zero_tail_rows(sK_mine, stage, seqlen - block_start - wg * n_per_wg, wg_tidx)
                    cute.arch.fence_view_async_shared()
                    my_warpgroup.arrive_and_wait()

                # S = Q K^T over this consumer's 32 tokens.
                warpgroup.fence()
                tiled_mma_s.set(warpgroup.Field.ACCUMULATE, False)
                for k in cutlass.range_constexpr(cute.size(tSrQ, mode=[2])):
                    cute.gemm(tiled_mma_s, acc_s, tSrQ[None, None, k, 0], tSrK[None, None, k, stage], acc_s)
                    tiled_mma_s.set(warpgroup.Field.ACCUMULATE, True)
                warpgroup.commit_group()
                warpgroup.wait_group(0)

                if block_start + BLOCK_N > mask_from:
                    for i in cutlass.range_constexpr(num_rows):
                        for j in cutlass.range_constexpr(cute.size(s_rc, mode=[1])):
                            token = block_start + wg * n_per_wg + coord_s[i, j][1]
                            if token >= row_limit[i]:
                                s_rc[i, j] = -Float32.inf

                # Row maxima, exchanged between the two consumers.
                for i in cutlass.range_constexpr(num_rows):
                    m = s_rc[i, 0]
                    for j in cutlass.range_constexpr(1, cute.size(s_rc, mode=[1])):
                        m = cute.arch.fmax(m, s_rc[i, j])
                    m = utils.quad_max(m)
                    if lane_writes_row:
                        row_max_mine[coord_s[i, 0][0], wg] = m
                consumers.arrive_and_wait()

                for i in cutlass.range_constexpr(num_rows):
                    row = coord_s[i, 0][0]
                    m_new = cute.arch.fmax(row_max[i], cute.arch.fmax(row_max_mine[row, 0], row_max_mine[row, 1]))
                    m_scaled = m_new * scale_log2
                    if m_new == -Float32.inf:
                        m_scaled = Float32(0.0)
                    alpha = cute.math.exp2(row_max[i] * scale_log2 - m_scaled, fastmath=True)
                    max_grew = m_new != row_max[i]
                    row_max[i] = m_new
                    psum = Float32(0.0)
                    for j in cutlass.range_constexpr(cute.size(s_rc, mode=[1])):
                        p = cute.math.exp2(s_rc[i, j] * scale_log2 - m_scaled, fastmath=True)
                        s_rc[i, j] = p
                        psum = psum + p
                    row_sum[i] = row_sum[i] * alpha + psum
                    # After the first blocks a row's maximum rarely grows; when it does
                    # not, alpha is exactly 1 and the 128 multiplies of O can be skipped.
                    if max_grew:
                        for j in cutlass.range_constexpr(cute.size(o_rc, mode=[1])):
                            o_rc[i, j] = o_rc[i, j] * alpha

                # P (in the input dtype) to shared memory for both consumers' P V.
                p_regs = cute.make_rmem_tensor_like(acc_s, dtype)
                p_regs.store(acc_s.load().to(dtype))
                cute.copy(p_store, p_store.retile(p_regs), tPsP)
                cute.arch.fence_view_async_shared()
                consumers.arrive_and_wait()

                # O += P V over this consumer's 256 columns.
                warpgroup.fence()
                tiled_mma_o.set(warpgroup.Field.ACCUMULATE, True)
                for k in cutlass.range_constexpr(cute.size(tOrP, mode=[2])):
                    cute.gemm(tiled_mma_o, acc_o, tOrP[None, None, k, 0], tOrV[None, None, k, stage], acc_o)
                warpgroup.commit_group()
                warpgroup.wait_group(0)
                kv_pipe.consumer_release(kv_state)
                kv_state.advance()
            q_pipe.consumer_release(q_state)
            q_state.advance()

            # Epilogue: total row sums (each consumer summed its own tokens), normalize, store.
            for i in cutlass.range_constexpr(num_rows):
                total = utils.quad_sum(row_sum[i])
                if lane_writes_row:
                    row_sum_mine[coord_s[i, 0][0], wg] = total
            consumers.arrive_and_wait()
            num_frags = mNumSplits[batch + 1] - mNumSplits[batch]
            split_idx = mNumSplits[batch]
            if batch == begin_batch:
                split_idx = split_idx + begin_split
            for i in cutlass.range_constexpr(num_rows):
                r = coord_s[i, 0][0]
                row = m_tile * TILE_M + r
                total = row_sum_mine[r, 0] + row_sum_mine[r, 1]
                inv = Float32(0.0)
                lse = -Float32.inf
                if total > 0.0:
                    inv = cute.arch.rcp_approx(total)
                    lse = row_max[i] * softmax_scale + cute.math.log(total, fastmath=False)
                if row < rows_per_kv:
                    if num_frags == 1:
                        if total == 0.0:
                            lse = Float32.inf  # no visible key: FlashMLA's convention
                        s = row // heads_per_kv
                        head = kv_head * heads_per_kv + (row - s * heads_per_kv)
                        for j in cutlass.range_constexpr(cute.size(o_rc, mode=[1])):
                            mO[batch, s, head, wg * dv_per_wg + coord_o[i, j][1]] = (o_rc[i, j] * inv).to(dtype)
                        if wg == 0 and lane_writes_row:
                            mLse[batch, head, s] = lse
                    else:
                        for j in cutlass.range_constexpr(cute.size(o_rc, mode=[1])):
                            mOAccum[split_idx, kv_head, row, wg * dv_per_wg + coord_o[i, j][1]] = o_rc[i, j] * inv
                        if wg == 0 and lane_writes_row:
                            mLseAccum[split_idx, kv_head, row] = lse
            # Nobody may overwrite row_sum before both consumers read it.
            consumers.arrive_and_wait()

    @cute.jit
    def zero_tail_rows(self, sK_mine: cute.Tensor, stage: Int32, first_invalid: Int32, wg_tidx: Int32):
        """Zero rows ``[max(first_invalid, 0), 32)`` of this consumer's slice of a K stage."""
        num_elems = self.n_per_wg * self.head_dim
        for idx in cutlass.range(wg_tidx, num_elems, 128, unroll=4):
            row = idx // self.head_dim
            col = idx - row * self.head_dim
            if row >= first_invalid:
                sK_mine[row, col, stage] = self.dtype(0.0)
