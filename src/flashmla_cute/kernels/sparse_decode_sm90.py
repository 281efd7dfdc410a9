"""Sparse (top-k) MLA decode over DeepSeek-V3.2's FP8 KV cache, for Hopper (sm_90a).

A first, simple design: one CTA per (batch, query token, 64-head tile) walks that query
token's ``topk`` indices 64 at a time. For each group of 64 indices:

1. gather: all 256 threads, four per token, read the token's FP8 latent bytes, its four
   scales and its bf16 rope values straight from the paged cache (16-byte loads: a token
   is 656 = 41 * 16 bytes), dequantize to bf16 and store the 64 x 576 K tile into shared
   memory in the swizzled K-major layout WGMMA reads. A token that is not valid (a
   negative index, one past the cache, or a position at or past ``topk_length``) is
   never read: its row is zeros and its score is masked to -inf. The stores are made
   visible to WGMMA (the async proxy) with a proxy fence and a CTA barrier.
2. attend: the two warpgroups each compute ``S = Q K^T`` for all 64 heads (Q, 64 x 576,
   loaded once), run the online softmax, and accumulate ``O += P V`` for their own 256
   of the 512 value columns, with P from registers and V = the tile's first 512 columns
   read as an MN-major operand (the layouts of ``decode_sm90``). Both compute S: the
   duplicate MMA is the price of needing no exchange of softmax statistics.
3. a CTA barrier before the next gather overwrites the tile.

The epilogue divides by the row sums, applies the attention sink (``out *= exp(lse) /
(exp(lse) + exp(sink))``, lse unchanged) and writes out and lse; a row that saw no valid
token gets out 0 and lse +inf. Heads past ``h_q`` (fewer than 64 or 128 heads) are zero
rows of Q that are never stored. There is no split over topk yet: one CTA does a
query token's whole topk.
"""

from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import BFloat16, Float32, Int32, Uint8
from cutlass.cute.nvgpu import OperandMajorMode, warpgroup
from cutlass.tensor_utils import LayoutEnum

from .. import fp8_cache
from . import utils

HEAD_TILE = 64  # query heads per CTA (the WGMMA's M)
TOKENS = 64  # indices per step (the WGMMA's N of S)
NUM_WARPGROUPS = 2
THREADS = 128 * NUM_WARPGROUPS
THREADS_PER_TOKEN = THREADS // TOKENS  # 4: one token's bytes are gathered by 4 threads
VECTOR_BYTES = 16
ELEMS_PER_THREAD_CHUNK = 16  # bf16 values a thread writes per 64-column chunk of a K row
D = fp8_cache.HEAD_DIM
DV = fp8_cache.LATENT_DIM
LATENT_CHUNKS = DV // 64  # 64-column chunks of the latent part (8)
Q_VECTORS_PER_ROW = D // 8  # 16-byte pieces of a bf16 row of Q (72)


class SparseDecodeSm90:
    """The sparse decode kernel; every size (batch, s_q, heads, topk, page size, cache
    size) and option (scale, sink, topk_length) is a runtime value."""

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (b, s_q, h_q, 576) bf16
        mK: cute.Tensor,  # (num_blocks, page_size, 656) uint8: the V3.2 FP8 cache
        mIndices: cute.Tensor,  # (b, s_q, topk) int32
        mTopkLength: cute.Tensor,  # (b,) int32, or any one int when has_topk_length == 0
        mSink: cute.Tensor,  # (h_q,) fp32, or any one float when has_sink == 0
        mO: cute.Tensor,  # (b, s_q, h_q, 512) bf16
        mLse: cute.Tensor,  # (b, h_q, s_q) fp32
        softmax_scale: Float32,
        has_topk_length: Int32,
        has_sink: Int32,
        stream,
    ):
        dtype = BFloat16
        tiled_mma_s = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.K, Float32, (1, 1, 1), (HEAD_TILE, TOKENS)
        )
        tiled_mma_o = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.MN, Float32, (1, 1, 1),
            (HEAD_TILE, DV // NUM_WARPGROUPS), sm90_utils.OperandSource.RMEM,
        )
        sQ_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (HEAD_TILE, TOKENS, D), dtype, 1)
        sK_layout = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (HEAD_TILE, TOKENS, D), dtype, 1)

        @cute.struct
        class SharedStorage:
            token_valid: cute.struct.MemRange[Int32, TOKENS]
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sK_layout)], 1024]

        self.shared_storage = SharedStorage
        b, s_q, h_q = mQ.shape[0], mQ.shape[1], mQ.shape[2]
        self.kernel(
            tiled_mma_s, tiled_mma_o, mQ, mK, mIndices, mTopkLength, mSink, mO, mLse, softmax_scale,
            has_topk_length, has_sink, sQ_layout, sK_layout,
        ).launch(
            grid=[b, s_q, (h_q + HEAD_TILE - 1) // HEAD_TILE],  # b first: grid.x has no 65535 limit
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
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mIndices: cute.Tensor,
        mTopkLength: cute.Tensor,
        mSink: cute.Tensor,
        mO: cute.Tensor,
        mLse: cute.Tensor,
        softmax_scale: Float32,
        has_topk_length: Int32,
        has_sink: Int32,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        batch, s, head_tile = cute.arch.block_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = warp_idx // 4
        wg_tidx = tidx % 128
        h_q = mQ.shape[2]
        head0 = head_tile * HEAD_TILE

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        token_valid = storage.token_valid.get_tensor(cute.make_layout((TOKENS,)))

        self.load_q(mQ, sQ, tidx, batch, s, head0, h_q)

        tiled_mma_s.set(warpgroup.Field.ACCUMULATE, True)
        tiled_mma_o.set(warpgroup.Field.ACCUMULATE, True)
        thr_mma_s = tiled_mma_s.get_slice(wg_tidx)
        thr_mma_o = tiled_mma_o.get_slice(wg_tidx)
        # V: this warpgroup's 256 value columns of the K tile, MN-major (N = column, K = token).
        sV = cute.make_tensor(
            sK.iterator + wg * (DV // NUM_WARPGROUPS * TOKENS),
            cute.make_layout(((64, DV // NUM_WARPGROUPS // 64), (8, TOKENS // 8)), stride=((1, TOKENS * 64), (64, 512))),
        )
        tSrQ = thr_mma_s.make_fragment_A(thr_mma_s.partition_A(sQ))
        tSrK = thr_mma_s.make_fragment_B(thr_mma_s.partition_B(sK))
        tOrV = thr_mma_o.make_fragment_B(thr_mma_o.partition_B(sV))
        acc_s = thr_mma_s.make_fragment_C(thr_mma_s.partition_shape_C((HEAD_TILE, TOKENS)))
        acc_o = thr_mma_o.make_fragment_C(thr_mma_o.partition_shape_C((HEAD_TILE, DV // NUM_WARPGROUPS)))
        s_rc = utils.acc_as_rows_cols(acc_s)
        o_rc = utils.acc_as_rows_cols(acc_o)
        coord_s = utils.acc_as_rows_cols(thr_mma_s.partition_C(cute.make_identity_tensor((HEAD_TILE, TOKENS))))
        coord_o = utils.acc_as_rows_cols(
            thr_mma_o.partition_C(cute.make_identity_tensor((HEAD_TILE, DV // NUM_WARPGROUPS)))
        )
        num_rows = cute.size(s_rc, mode=[0])
        num_cols = cute.size(s_rc, mode=[1])
        p_regs = cute.make_rmem_tensor_like(acc_s, BFloat16)
        p_operand = cute.make_tensor(p_regs.iterator, utils.acc_as_operand_a(acc_s.layout))

        row_max = cute.make_rmem_tensor((num_rows,), Float32)
        row_sum = cute.make_rmem_tensor((num_rows,), Float32)
        for i in cutlass.range_constexpr(num_rows):
            row_max[i] = -Float32.inf
            row_sum[i] = 0.0
        acc_o.fill(0.0)
        scale_log2 = softmax_scale * math.log2(math.e)

        topk = mIndices.shape[2]
        limit = topk
        if has_topk_length != 0:
            limit = cutlass.max(cutlass.min(mTopkLength[batch], topk), 0)
        num_steps = (limit + TOKENS - 1) // TOKENS
        for step in cutlass.range(num_steps, unroll=1):
            cute.arch.sync_threads()  # the previous tile is read (and Q is stored)
            self.gather(mK, mIndices, sK, token_valid, tidx, batch, s, step * TOKENS, limit)
            cute.arch.fence_view_async_shared()
            cute.arch.sync_threads()

            acc_s.fill(0.0)
            warpgroup.fence()
            for k in cutlass.range_constexpr(cute.size(tSrQ, mode=[2])):
                cute.gemm(tiled_mma_s, acc_s, tSrQ[None, None, k, 0], tSrK[None, None, k, 0], acc_s)
            warpgroup.commit_group()
            warpgroup.wait_group(0)
            for j in cutlass.range_constexpr(num_cols):
                if token_valid[coord_s[0, j][1]] == 0:
                    for i in cutlass.range_constexpr(num_rows):
                        s_rc[i, j] = -Float32.inf

            for i in cutlass.range_constexpr(num_rows):
                m = s_rc[i, 0]
                for j in cutlass.range_constexpr(1, num_cols):
                    m = cute.arch.fmax(m, s_rc[i, j])
                m_new = cute.arch.fmax(row_max[i], utils.quad_max(m))
                m_scaled = m_new * scale_log2
                if m_new == -Float32.inf:
                    m_scaled = Float32(0.0)  # no valid token yet: avoid inf - inf
                rescale = cute.math.exp2(row_max[i] * scale_log2 - m_scaled, fastmath=True)
                total = Float32(0.0)
                for j in cutlass.range_constexpr(num_cols):
                    p = cute.math.exp2(s_rc[i, j] * scale_log2 - m_scaled, fastmath=True)
                    s_rc[i, j] = p
                    total = total + p
                row_sum[i] = row_sum[i] * rescale + total
                row_max[i] = m_new
                for j in cutlass.range_constexpr(cute.size(o_rc, mode=[1])):
                    o_rc[i, j] = o_rc[i, j] * rescale

            p_regs.store(acc_s.load().to(BFloat16))
            warpgroup.fence()
            for k in cutlass.range_constexpr(cute.size(tOrV, mode=[2])):
                cute.gemm(tiled_mma_o, acc_o, p_operand[None, None, k], tOrV[None, None, k], acc_o)
            warpgroup.commit_group()
            warpgroup.wait_group(0)

        # Epilogue: normalize, sink, store.
        for i in cutlass.range_constexpr(num_rows):
            r = coord_s[i, 0][0]
            head = head0 + r
            total = utils.quad_sum(row_sum[i])
            factor = Float32(0.0)
            lse = Float32.inf  # no valid token: out 0, lse +inf
            if total > 0.0:
                lse = row_max[i] * softmax_scale + cute.math.log(total, fastmath=False)
                factor = cute.arch.rcp_approx(total)
                if has_sink != 0:
                    if head < h_q:
                        # exp(lse) / (exp(lse) + exp(sink)): +inf sink gives 0, -inf leaves 1.
                        factor = factor / (1.0 + cute.math.exp(mSink[head] - lse, fastmath=False))
            if head < h_q:
                dst = mO[batch, s, head, None]
                for jj in cutlass.range_constexpr(cute.size(o_rc, mode=[1]) // 2):
                    pair = cute.make_rmem_tensor((2,), BFloat16)
                    pair[0] = (o_rc[i, 2 * jj] * factor).to(BFloat16)
                    pair[1] = (o_rc[i, 2 * jj + 1] * factor).to(BFloat16)
                    col = wg * (DV // NUM_WARPGROUPS) + coord_o[i, 2 * jj][1]
                    cute.autovec_copy(pair, cute.local_tile(dst, (2,), (col // 2,)))
                if (wg == 0) & (wg_tidx % 4 == 0):
                    mLse[batch, head, s] = lse

    @cute.jit
    def load_q(self, mQ, sQ, tidx, batch, s, head0, h_q):
        """Q's 64 head rows into shared memory, 16 bytes per copy; rows past h_q are zeros."""
        for v in cutlass.range(tidx, HEAD_TILE * Q_VECTORS_PER_ROW, THREADS, unroll=2):
            r = v // Q_VECTORS_PER_ROW
            c = v - r * Q_VECTORS_PER_ROW
            dst = cute.local_tile(sQ[r, None, 0], (8,), (c,))
            if head0 + r < h_q:
                cute.autovec_copy(cute.local_tile(mQ[batch, s, head0 + r, None], (8,), (c,)), dst)
            else:
                dst.fill(0.0)

    @cute.jit
    def gather(self, mK, mIndices, sK, token_valid, tidx, batch, s, first, limit):
        """Dequantize the tokens of indices ``[first, first + 64)`` into the K tile; four
        threads per token, each writing 16 columns of each 64-column chunk."""
        token = tidx // THREADS_PER_TOKEN
        part = tidx % THREADS_PER_TOKEN
        position = first + token
        index = mIndices[batch, s, position]
        page_size = mK.shape[1]
        valid = (index >= 0) & (index < mK.shape[0] * page_size) & (position < limit)
        if part == 0:
            token_valid[token] = Int32(valid)
        k_row = sK[token, None, 0]
        values = cute.make_rmem_tensor((ELEMS_PER_THREAD_CHUNK,), BFloat16)
        if valid:
            page = index // page_size
            row = mK[page, index - page * page_size, None]  # the token's 656 bytes
            scale_bytes = cute.make_rmem_tensor((VECTOR_BYTES,), Uint8)
            cute.autovec_copy(cute.local_tile(row, (VECTOR_BYTES,), (fp8_cache.SCALES_OFFSET // VECTOR_BYTES,)),
                              scale_bytes)
            scales = cute.recast_tensor(scale_bytes, Float32)
            for chunk in cutlass.range_constexpr(LATENT_CHUNKS):
                raw = cute.make_rmem_tensor((ELEMS_PER_THREAD_CHUNK,), Uint8)
                cute.autovec_copy(cute.local_tile(row, (ELEMS_PER_THREAD_CHUNK,), (chunk * THREADS_PER_TOKEN + part,)),
                                  raw)
                fp8 = cute.recast_tensor(raw, cutlass.Float8E4M3FN).load()
                values.store((fp8.to(Float32) * scales[chunk * 64 // fp8_cache.GROUP_SIZE]).to(BFloat16))
                cute.autovec_copy(values, cute.local_tile(k_row, (ELEMS_PER_THREAD_CHUNK,),
                                                          (chunk * THREADS_PER_TOKEN + part,)))
            # The rope part starts at byte 528 = 33 * 16: this thread's 16 values are its
            # 16-byte pieces 33 + 2 part and 33 + 2 part + 1.
            rope_bytes = cute.make_rmem_tensor((2 * ELEMS_PER_THREAD_CHUNK,), Uint8)
            for half in cutlass.range_constexpr(2):
                cute.autovec_copy(
                    cute.local_tile(row, (VECTOR_BYTES,),
                                    (fp8_cache.ROPE_OFFSET // VECTOR_BYTES + 2 * part + half,)),
                    cute.local_tile(rope_bytes, (VECTOR_BYTES,), (half,)),
                )
            values.store(cute.recast_tensor(rope_bytes, BFloat16).load())
            cute.autovec_copy(values, cute.local_tile(k_row, (ELEMS_PER_THREAD_CHUNK,),
                                                      (LATENT_CHUNKS * THREADS_PER_TOKEN + part,)))
        else:
            values.fill(0.0)
            for chunk in cutlass.range_constexpr(LATENT_CHUNKS + 1):
                cute.autovec_copy(values, cute.local_tile(k_row, (ELEMS_PER_THREAD_CHUNK,),
                                                          (chunk * THREADS_PER_TOKEN + part,)))
