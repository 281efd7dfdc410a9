"""Sparse (top-k) MLA decode for more than 64 query heads, for Hopper (sm_90a): the two
64-head tiles of a query token run as a cluster of two CTAs that share their K tiles
(FlashMLA's "crossover"), each CTA in FlashMLA's arrangement of three warpgroups.

Both head tiles of a query token attend to the same 64 tokens a step, so each CTA of the
pair gathers and dequantizes only half of them (32) into its own K tile, and the copy
engine copies those rows (each gather warp's 8 rows, a 1 KB run of each 64-column chunk,
as soon as the warp has stored them) and their valid flags into the same places of the
peer's tile (``send_rows``, ``cp.async.bulk`` counted on the peer's ``landed``
mbarrier). Roles (384 threads):

- the **gather** warpgroup (``gather``): four threads a token fetch its FP8 bytes (the
  fetch of ``sparse_decode_sm90``) and unpack them into this CTA's tile, and one lane
  of each warp sends its warp's rows on to the peer's; the next step's loads go out as
  soon as a tile is unpacked, so they fly while the gatherer waits for the next free
  buffer.
- **consumer 0** (``consume_scores``): ``S = Q K^T`` over all 64 tokens (m64n64k16; one
  warpgroup reads Q and K once: 147 KB of shared memory a step for V3.2, where two
  warpgroups at N = 32 read 221 KB), the whole online softmax (no exchange of row
  maxima), P and O's rescale factors into shared memory, and ``O_left += P V_left``
  with P from registers.
- **consumer 1** (``consume_values``): waits for P and the factors (named barrier
  ``P_READY``), rescales ``O_right`` and multiplies P (shared memory) by ``V_right``,
  then returns the P buffer (``P_FREE``).

Q's tile comes by TMA (``start_q_load``), issued by consumer 0's first warp at the CTA's
start; only consumer 0 waits for it.

The K tiles form a two-stage ring (``pipeline.PipelineAsync``): a buffer is full when
this CTA's gatherer has committed it and the peer's bytes have landed, and free when
both consumers of both CTAs have read it (each consumer's arrive goes to both CTAs'
barriers, at CTA scope like FlashMLA's: it only has to follow the consumer's finished
reads; a cluster-scope arrive put a GPU-wide fence into every step and cost 15-19%).

The path between the SMs of a pair moves about 25 GB/s an SM, fed by threads' stores
(``st.async``, as FlashMLA's crossover) or by the copy engine alike
(``benchmarks/dsmem_store_rate.py``), so the exchange of half a tile a step takes 1.5 us
at least: it pays only because it runs while the consumers multiply. Sent by the copy
engine it takes no instruction of the gatherer's threads, and their stores need not fill
whole 32-byte sectors of the peer's tile as threads' stores into it must; so a thread
fetches its two vectors of a chunk side by side, one 16-byte load where whole-sector
stores needed two 8-byte ones. With each warp sending its own rows (no barrier of the
gather warpgroup before the copies), the h_q 128 cases past b2 are 4-5% faster than with
threads' stores (benchmarks/NOTES.md, "The pair kernel's exchange by bulk copies", "Each
gather warp sends its own rows"). With 64 heads or fewer there is nothing to share,
and the eight-warp kernel of ``sparse_decode_sm90`` is faster.

Everything else (the steps, splits, fetch, dequantization, combine) is
``sparse_decode_sm90``'s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import BFloat16, Float32, Int32, Int64, const_expr, pipeline
from cutlass.cute.nvgpu import cpasync, warpgroup

from .. import fp8_cache
from ..sparse_plan import HEAD_TILE, STEP_TOKENS
from . import dsmem, softmax, utils
from .sparse_decode_sm90 import (BOTH_HALVES, CHUNK_COLUMNS, DV, NUM_BUFFERS, THREADS_PER_TOKEN, VECTOR_BYTES,
                                 SparseDecodeSm90)

TOKENS = STEP_TOKENS
CLUSTER_SIZE = 2  # the two head tiles of a query token
WARPGROUP_THREADS = utils.WARPGROUP_THREADS
NUM_CONSUMERS = 2  # warpgroups 0 and 1; the gather warpgroup comes after them
CONSUMER_THREADS = WARPGROUP_THREADS * NUM_CONSUMERS
GATHER_THREADS = WARPGROUP_THREADS
THREADS = CONSUMER_THREADS + GATHER_THREADS
GATHER_TOKENS = TOKENS // CLUSTER_SIZE  # tokens of a step one CTA gathers
K_STEPS = TOKENS // utils.MMA_K  # k-steps of P V over a step's tokens
CHUNK_BYTES = TOKENS * CHUNK_COLUMNS * BFloat16.width // 8  # a K tile's 64-column chunk: 64 rows of 128 bytes

# Named barriers of the consumers (0 is the CTA's, which the gatherer leaves after the setup).
P_READY, P_FREE, ROW_SUMS = 1, 2, 3
WARP_TOKENS = cute.arch.WARP_SIZE // THREADS_PER_TOKEN  # 8: tokens a gather warp unpacks, one 8-row swizzle atom
WARP_CHUNK_BYTES = WARP_TOKENS * CHUNK_COLUMNS * BFloat16.width // 8  # a warp's rows of a chunk: 1 KB in one run
# send_rows copies a warp's rows of a chunk as one run: they are one swizzle atom (the
# swizzle permutes vectors within a row only).
assert WARP_TOKENS == utils.ATOM_ROWS, (WARP_TOKENS, utils.ATOM_ROWS)

# Row statistics in shared memory, each HEAD_TILE floats: consumer 0's rescale factors of
# a step; in the epilogue its row maxima and row sums.
STAT_MAX, STAT_SCALE, STAT_SUM = 0, 1, 2
NUM_STATS = 3


@dataclass(frozen=True)
class RoleRegisters:
    """Registers a thread of each role keeps (``setmaxnreg``; together at most the
    launch's, ``utils.registers_fit``): consumer 0 holds S of 64 tokens (32), P (16)
    and its half of O (128); consumer 1 its half of O; the gatherer a token's fetched
    bytes (45) and the values it stores, from more registers the more it has (fewer of
    its stores wait for the ones before to read their sources)."""

    scores: int
    values: int
    gather: int


# Per layout, as measured (benchmarks/NOTES.md, "The register budgets of the pair
# kernel's roles", "The pair kernel's consumer 0 with more registers" and "Two earlier
# probes again, on whole-sector stores"): consumer 0 below 208 costs both layouts (at
# 192, FlashMLA's budgets: 3-16% slower), consumer 1 below 160 spills. Measured when the
# gatherer's threads stored whole sectors into the peer's tile: MODEL1's h_q 128 cases
# 1-1.5% faster with 208 / 160 / 136 than with 216 / 160 / 128, V3.2's 1.2-1.4% slower.
ROLE_REGISTERS = {
    fp8_cache.V32.key: RoleRegisters(scores=208, values=160, gather=136),
    fp8_cache.MODEL1.key: RoleRegisters(scores=208, values=160, gather=136),
}


class SparsePairDecodeSm90(SparseDecodeSm90):
    """The sparse decode kernel for two head tiles a query token (h_q 65 to 128), one
    cache layout and whether there is an extra cache; the launch arguments are
    ``SparseDecodeSm90``'s."""

    SCORE_TOKENS = TOKENS
    P_TILES = 1
    THREADS = THREADS
    CLUSTER = CLUSTER_SIZE
    NUM_STATS = NUM_STATS

    def __init__(self, layout, has_extra: bool = False):
        super().__init__(layout, has_extra)
        self.registers = ROLE_REGISTERS[layout.key]
        assert utils.registers_fit(dataclasses.astuple(self.registers), THREADS), self.registers
        # Bytes a CTA receives a step: the peer's tokens' bf16 K rows and their flags.
        self.received_bytes = GATHER_TOKENS * (self.d * BFloat16.width // 8 + Int32.width // 8)

    def q_sources(self, mQ) -> tuple:
        """Q (for its shape), and the TMA load of its chunks (``start_q_load``) with
        its view of Q as (head, column, query token, batch)."""
        assert HEAD_TILE == utils.CHUNK_ROWS, "a head tile of Q is not one TMA box high"
        b, s_q, h_q = mQ.shape[0], mQ.shape[1], mQ.shape[2]
        stride = mQ.layout.stride
        view = cute.make_tensor(mQ.iterator, cute.make_layout((h_q, self.d, s_q, b),
                                                              stride=(stride[2], 1, stride[1], stride[0])))
        return (mQ, *utils.chunk_tma_atom(view, BFloat16))

    @staticmethod
    @cute.jit
    def work_of(cta, s_q, head_tiles, whole_batches, topk_splits):
        """``SparseDecodeSm90.work_of`` with the head tile varying fastest everywhere, so
        that a cluster's two CTAs are the two head tiles of one query token's share (the
        eight-warp kernel lets the share vary fastest for split sequences: its machine
        code, and time, moved with this order)."""
        head_tile = cta % head_tiles
        work = cta // head_tiles  # (batch, query token, share)
        batch = work // s_q
        s = work - batch * s_q
        split = Int32(0)
        splits = Int32(1)
        if batch >= whole_batches:
            work_per_batch = s_q * topk_splits
            rest = work - whole_batches * s_q
            later = rest // work_per_batch
            batch = whole_batches + later
            share = rest - later * work_per_batch
            s = share // topk_splits
            split = share - s * topk_splits
            splits = topk_splits
        return batch, s, head_tile, split, splits

    @cute.jit
    def shared_storage_type(self, sQ_layout, sK_layout, sP_layout):
        dtype = BFloat16

        @cute.struct
        class SharedStorage:
            q_full: cute.struct.MemRange[Int64, 1]  # Q's TMA copies have landed
            k_tile_mbar: cute.struct.MemRange[Int64, 2 * NUM_BUFFERS]  # full and empty of each K tile
            peer_landed: cute.struct.MemRange[Int64, NUM_BUFFERS]  # the peer's half of each K tile
            token_valid: cute.struct.Align[cute.struct.MemRange[Int32, TOKENS * NUM_BUFFERS], VECTOR_BYTES]
            row_stats: cute.struct.MemRange[Float32, HEAD_TILE * NUM_STATS]
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sK_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sP_layout)], 1024]

        return SharedStorage

    # ---------------------------------------------------------------- device side
    @cute.kernel
    def kernel(
        self,
        tiled_mma_s: cute.TiledMma,
        tiled_mma_o_rs: cute.TiledMma,
        tiled_mma_o_ss: cute.TiledMma,
        mQ: cute.Tensor,  # for its shape
        tma_q: cute.CopyAtom,
        mQ_tma: cute.Tensor,  # Q's TMA view (q_sources)
        mKCache: cute.Tensor,
        pages: cute.FastDivmodDivisorV2,
        mIndices: cute.Tensor,
        mTopkLength: cute.Tensor,
        mExtraKCache: cute.Tensor,
        extra_pages: cute.FastDivmodDivisorV2,
        mExtraIndices: cute.Tensor,
        mExtraTopkLength: cute.Tensor,
        mSink: cute.Tensor,
        mO: cute.Tensor,
        mLse: cute.Tensor,
        mOAccum: cute.Tensor,
        mLseAccum: cute.Tensor,
        softmax_scale: Float32,
        has_topk_length: Int32,
        has_sink: Int32,
        extra_topk: Int32,
        has_extra_topk_length: Int32,
        whole_batches: Int32,
        topk_splits: Int32,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        sP_layout: cute.ComposedLayout,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        cta, _, _ = cute.arch.block_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = warp_idx // 4
        h_q = mQ.shape[2]
        batch, s, head_tile, split, splits = self.work_of(cta, mQ.shape[1], (h_q + HEAD_TILE - 1) // HEAD_TILE,
                                                          whole_batches, topk_splits)

        # The combine kernel may start now: its CTAs wait for this grid's end.
        cute.arch.griddepcontrol_launch_dependents()

        storage = cutlass.memory.SmemAllocator().allocate(self.shared_storage)
        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        token_valid = storage.token_valid.get_tensor(cute.make_layout((TOKENS, NUM_BUFFERS)))
        # The ring of K tiles: "full" counts this CTA's gather threads, "empty" one
        # arrive of each consumer warpgroup of both CTAs (both gatherers write the tile).
        k_tiles = pipeline.PipelineAsync.create(
            num_stages=NUM_BUFFERS,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, GATHER_THREADS),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, NUM_CONSUMERS * CLUSTER_SIZE),
            barrier_storage=storage.k_tile_mbar.data_ptr(),
            defer_sync=True,
        )
        rank = Int32(cute.arch.block_idx_in_cluster())
        pair = PairState(storage.peer_landed.data_ptr(), rank,
                         dsmem.peer_shift(storage.peer_landed.data_ptr().toint(), 1 - rank))
        q_full = storage.q_full.data_ptr()
        if tidx == 0:
            for b in cutlass.range_constexpr(NUM_BUFFERS):
                cute.arch.mbarrier_init(pair.landed + b, 1)
            cute.arch.mbarrier_init(q_full, 1)
        cute.arch.mbarrier_init_fence()
        if warp_idx == 0:
            self.start_q_load(tma_q, mQ_tma, sQ, q_full, batch, s, head_tile)
        # Both CTAs' barriers are initialized before either stores into the other or
        # arrives on the other's: every thread arrives here and waits (``wait_for_peer``)
        # only where its role first needs the peer, so that the gatherer's first loads
        # fly over the barrier's round trip.
        cute.arch.cluster_arrive_relaxed()

        steps_args = (mIndices, mTopkLength, has_topk_length, mExtraIndices, mExtraTopkLength, has_extra_topk_length,
                      extra_topk, batch, s, split, splits)
        # All MMAs accumulate (S is zeroed before its first k-step): set once, before the
        # branch on the role.
        for tiled_mma in (tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss):
            tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
        work = (batch, s, head_tile * HEAD_TILE, h_q, split, splits, whole_batches, topk_splits)
        outputs = (mO, mLse, mOAccum, mLseAccum, mSink, softmax_scale, has_sink)
        mmas = (tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss)
        # Each role's code is traced under its own register budget: after a join of two
        # budgets, ptxas gives the code the smaller one.
        if wg >= NUM_CONSUMERS:
            utils.take_registers(self.registers.gather, THREADS)
            self.gather(k_tiles, pair, ((mKCache, pages), (mExtraKCache, extra_pages)), steps_args, sK, token_valid,
                        tidx - CONSUMER_THREADS)
        elif wg == 0:
            utils.take_registers(self.registers.scores, THREADS)
            self.consumer(True, q_full, sQ, sK, storage, sP_layout, k_tiles, pair, steps_args, mmas, outputs,
                          work, tidx)
        else:
            utils.take_registers(self.registers.values, THREADS)
            self.consumer(False, q_full, sQ, sK, storage, sP_layout, k_tiles, pair, steps_args, mmas,
                          outputs, work, tidx)

    @cute.jit
    def consumer(self, scores: cutlass.Constexpr, q_full, sQ, sK, storage, sP_layout, k_tiles, pair,
                 steps_args, mmas, outputs, work, tidx):
        """Consumer 0 (``scores``) or 1: the step loop of its role (consumer 0's once
        Q's copies, ``q_full``, have landed; consumer 1 never reads Q), the epilogue."""
        batch, s, head0, h_q, split, splits, whole_batches, topk_splits = work
        mO, mLse, mOAccum, mLseAccum, mSink, softmax_scale, has_sink = outputs
        wg = 0 if const_expr(scores) else 1
        wg_tidx = tidx % WARPGROUP_THREADS
        t = self.warpgroup_tensors(wg, wg_tidx, *mmas, sQ, sK, storage, sP_layout)
        _steps, _first, num_steps = self.split_steps(*steps_args)
        self.wait_for_peer()
        if const_expr(scores):
            # Also when there is no step: the CTA does not end with Q's copies in flight.
            cute.arch.mbarrier_wait(q_full, 0)
            self.consume_scores(t, k_tiles, pair, num_steps, softmax_scale, wg_tidx)
        else:
            self.consume_values(t, k_tiles, pair, num_steps, wg_tidx)
        fragment = whole_batches + (batch - whole_batches) * topk_splits + split  # when split
        self.finish_pair(t, storage, tidx, mO, mLse, mOAccum, mLseAccum, mSink, softmax_scale, has_sink, splits,
                         fragment, batch, s, head0, h_q)
        # No CTA leaves while its peer may still arrive on its barriers.
        cute.arch.cluster_arrive_relaxed()
        cute.arch.cluster_wait()

    def wait_for_peer(self):
        """Until both CTAs of the pair have initialized their barriers (the kernel's
        cluster arrive): before a role's first copy into the peer or arrive on its
        barriers."""
        cute.arch.cluster_wait()

    @cute.jit
    def start_q_load(self, tma_q, mQ_tma, sQ, q_full, batch, s, head_tile):
        """One warp (whose first thread initialized ``q_full``): start the TMA copies of
        query token (``batch``, ``s``)'s head tile ``head_tile`` of Q (64 x d) into
        ``sQ``, one a 64-column chunk, counted on the mbarrier ``q_full`` (phase 0);
        heads past h_q land as zeros (the copies' bounds). Issued at the CTA's start, as
        FlashMLA loads Q: copied by the consumers themselves (``load_q``), the copies
        were both consumers' first instructions and consumer 1 waited at a barrier for
        Q, which it never reads (benchmarks/NOTES.md, "Sparse Q through TMA")."""
        chunks = self.d // CHUNK_COLUMNS
        with cute.arch.elect_one():
            cute.arch.mbarrier_arrive_and_expect_tx(q_full, chunks * utils.chunk_bytes(BFloat16))
        # Each copy is issued by one thread of the warp (the DSL elects it): called from
        # one thread alone, the election waits for lanes that never come.
        gQ = cute.flat_divide(mQ_tma, (HEAD_TILE, CHUNK_COLUMNS))  # (64, 64, head tiles, chunks, s_q, b)
        sQ_chunks = cute.make_tensor(sQ.iterator, utils.chunked_layout(HEAD_TILE, self.d, 1))
        tQsQ, tQgQ = cpasync.tma_partition(tma_q, 0, cute.make_layout(1), cute.group_modes(sQ_chunks, 0, 2),
                                           cute.group_modes(gQ, 0, 2))
        for c in cutlass.range_constexpr(chunks):
            cute.copy(tma_q, tQgQ[None, head_tile, c, s, batch], tQsQ[None, c, 0], tma_bar_ptr=q_full)

    def score_keys(self, sK, wg):
        """K for consumer 0's scores: the whole tiles."""
        return sK

    @cute.jit
    def wait_tile(self, k_tiles, pair, state):
        """Until tile ``state.index`` is full: this CTA's gatherer has committed it, and
        the peer's half has landed."""
        k_tiles.consumer_wait(state)
        cute.arch.mbarrier_wait(pair.landed + state.index, state.phase)

    @cute.jit
    def release_tile(self, k_tiles, state, wg_tidx):
        """This warpgroup has read tile ``state.index``: one thread tells both CTAs'
        gatherers (both store into it). CTA scope, as FlashMLA's: the arrive only has to
        follow the warpgroup's finished reads."""
        if wg_tidx == 0:
            for rank in cutlass.range_constexpr(CLUSTER_SIZE):
                cute.arch.mbarrier_arrive(k_tiles.consumer_get_barrier(state), rank)

    @cute.jit
    def consume_scores(self, t, k_tiles, pair, num_steps, softmax_scale, wg_tidx):
        """Consumer 0's step loop: S over all 64 tokens, the online softmax, P and O's
        rescale factors into shared memory for consumer 1, then ``O_left += P V_left``."""
        for i in cutlass.range_constexpr(cute.size(t.row_max)):
            t.row_max[i] = -Float32.inf
            t.row_sum[i] = 0.0
        t.acc_o.fill(0.0)
        scale_log2 = softmax_scale * math.log2(math.e)
        num_rows = cute.size(t.s_rc, mode=[0])
        num_cols = cute.size(t.s_rc, mode=[1])
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, NUM_BUFFERS)
        for step in cutlass.range(num_steps, unroll=1):
            self.wait_tile(k_tiles, pair, state)
            buf = state.index
            self.issue_scores(t, buf)
            valid_columns = self.valid_columns(t, buf)
            warpgroup.wait_group(0)
            for j in cutlass.range_constexpr(num_cols):
                if (valid_columns >> j) & 1 == 0:
                    for i in cutlass.range_constexpr(num_rows):
                        t.s_rc[i, j] = -Float32.inf
            factors = cute.make_rmem_tensor((num_rows,), Float32)
            for i in cutlass.range_constexpr(num_rows):
                # The maximum moves only by more than the threshold (softmax.next_max).
                m_new = softmax.next_max(t.row_max[i], softmax.row_max(t.s_rc, i), scale_log2)
                m_scaled = softmax.scaled_max(m_new, scale_log2)
                factors[i] = softmax.rescale_factor(t.row_max[i], m_scaled, scale_log2)
                total = softmax.exponentiate_row(t.s_rc, i, scale_log2, m_scaled)
                t.row_sum[i] = t.row_sum[i] * factors[i] + total
                t.row_max[i] = m_new
                softmax.rescale_row(t.o_rc, i, factors[i])
            t.p_regs.store(t.acc_s.load().to(BFloat16))
            if step > 0:
                cute.arch.barrier(barrier_id=P_FREE, number_of_threads=CONSUMER_THREADS)  # consumer 1 read the last P
            cute.copy(t.p_store, t.p_store.retile(t.p_regs), t.tPsP[None, None, None, 0])
            if t.lane_writes_row:
                for i in cutlass.range_constexpr(num_rows):
                    t.row_stats[t.coord_s[i, 0][0], STAT_SCALE] = factors[i]
            cute.arch.fence_view_async_shared()
            warpgroup.fence()
            for k in cutlass.range_constexpr(K_STEPS):
                cute.gemm(t.tiled_mma_o_rs, t.acc_o, t.p_operand[None, None, k], t.tOrV_rs[None, None, k, buf],
                          t.acc_o)
            warpgroup.commit_group()
            # Consumer 1 is let go only once this P V is issued (FlashMLA's order), so that
            # it goes first on the tensor cores: level on the production cases, 2.6% off
            # the peak h_q 128 case (benchmarks/NOTES.md, "Two earlier probes again").
            cute.arch.barrier_arrive(barrier_id=P_READY, number_of_threads=CONSUMER_THREADS)
            warpgroup.wait_group(0)
            self.release_tile(k_tiles, state, wg_tidx)
            state.advance()

    @cute.jit
    def consume_values(self, t, k_tiles, pair, num_steps, wg_tidx):
        """Consumer 1's step loop: ``O_right`` rescaled by consumer 0's factors, then
        ``O_right += P V_right`` with P from shared memory."""
        t.acc_o.fill(0.0)
        num_rows = cute.size(t.o_rc, mode=[0])
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, NUM_BUFFERS)
        for step in cutlass.range(num_steps, unroll=1):
            self.wait_tile(k_tiles, pair, state)
            buf = state.index
            cute.arch.barrier(barrier_id=P_READY, number_of_threads=CONSUMER_THREADS)
            for i in cutlass.range_constexpr(num_rows):
                softmax.rescale_row(t.o_rc, i, t.row_stats[t.coord_o[i, 0][0], STAT_SCALE])
            warpgroup.fence()
            for k in cutlass.range_constexpr(K_STEPS):
                cute.gemm(t.tiled_mma_o_ss, t.acc_o, t.tOrP_ss[None, None, k, 0], t.tOrV_ss[None, None, k, buf],
                          t.acc_o)
            warpgroup.commit_group()
            warpgroup.wait_group(0)
            if step + 1 < num_steps:
                cute.arch.barrier_arrive(barrier_id=P_FREE, number_of_threads=CONSUMER_THREADS)
            self.release_tile(k_tiles, state, wg_tidx)
            state.advance()

    @cute.jit
    def finish_pair(self, t, storage, tidx, mO, mLse, mOAccum, mLseAccum, mSink, softmax_scale, has_sink, splits,
                    fragment, batch, s, head0, h_q):
        """The epilogue: consumer 0 publishes each row's sum and maximum; both write
        their half of O (``write_row``). The output's or the partial's rows go through
        shared memory (the K buffers: after the last step nothing reads them, and the
        peer's gatherer, whose steps are this CTA's, has nothing more to store), then out
        whole (``utils.copy_rows``): stored from the accumulators, a bf16 pair is half a
        sector in each of 8 rows per instruction."""
        num_rows = cute.size(t.o_rc, mode=[0])
        if const_expr(t.wg == 0):
            for i in cutlass.range_constexpr(num_rows):
                total = utils.quad_sum(t.row_sum[i])
                if t.lane_writes_row:
                    t.row_stats[t.coord_s[i, 0][0], STAT_SUM] = total
                    t.row_stats[t.coord_s[i, 0][0], STAT_MAX] = t.row_max[i]
        # Also: both consumers' last P V have read the K buffers.
        cute.arch.barrier(barrier_id=ROW_SUMS, number_of_threads=CONSUMER_THREADS)
        staged_out = storage.sK.get_tensor(utils.staged_rows_layout(HEAD_TILE, DV, BFloat16))
        for i in cutlass.range_constexpr(num_rows):
            r = t.coord_o[i, 0][0]
            self.write_row(t, i, t.row_stats[r, STAT_SUM], t.row_stats[r, STAT_MAX], staged_out, True, mO, mLse,
                           mOAccum, mLseAccum, mSink, softmax_scale, has_sink, splits, fragment, batch, s, head0, h_q)
        cute.arch.barrier(barrier_id=ROW_SUMS, number_of_threads=CONSUMER_THREADS)  # every row staged
        self.copy_staged_rows(staged_out, mO, mOAccum, splits, fragment, batch, s, head0, h_q, tidx, CONSUMER_THREADS)

    @cute.jit
    def gather(self, k_tiles, pair, caches, steps_args, sK, token_valid, gather_tidx):
        """The gather warpgroup's loop: this CTA's 32 tokens of each step, unpacked into
        its tile once the buffer is free and sent on to the peer's, the next step's loads
        issued right after the unpack, so that they fly while the gatherer waits for the
        next buffer; the first step's loads go out before the wait for the peer's setup."""
        steps, first, num_steps = self.split_steps(*steps_args)
        token = pair.rank * GATHER_TOKENS + gather_tidx // THREADS_PER_TOKEN
        part = gather_tidx % THREADS_PER_TOKEN
        fetched = self.token_registers()
        next_index = steps.index(first + 1, token)
        if num_steps > 0:
            self.fetch(caches, steps.from_extra(first), fetched, steps.index(first, token), part, BOTH_HALVES)
        # The first step's index and FP8 loads are out, over the cluster's setup (~0.5
        # us): at b2 the chain from them to the first tile unpacked is ~3 us of a CTA's
        # ~15 (benchmarks/NOTES.md, "The pair kernel's CTA timeline").
        self.wait_for_peer()
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, NUM_BUFFERS)
        for step in cutlass.range(num_steps, unroll=1):
            k_tiles.producer_acquire(state)
            if gather_tidx == 0:
                # Both CTAs have read the buffer's last tile: arm for the peer's half.
                cute.arch.mbarrier_arrive_and_expect_tx(pair.landed + state.index, self.received_bytes)
            self.unpack(fetched, sK, token_valid, state.index, token, part, BOTH_HALVES)
            if step + 1 < num_steps:
                index = next_index
                next_index = steps.index(first + step + 2, token)
                self.fetch(caches, steps.from_extra(first + step + 1), fetched, index, part, BOTH_HALVES)
            # The stores, before the consumers' MMAs and the copy engine read them; each
            # warp sends its own rows as soon as they are stored.
            cute.arch.fence_view_async_shared()
            cute.arch.sync_warp()
            if gather_tidx % cute.arch.WARP_SIZE == 0:
                self.send_rows(pair, sK, token_valid, state.index, gather_tidx // cute.arch.WARP_SIZE)
            k_tiles.producer_commit(state)
            state.advance()

    @cute.jit
    def send_rows(self, pair, sK, token_valid, buf, warp):
        """Lane 0 of gather warp ``warp``: its 8 rows of K tile ``buf`` (a 1 KB run of each
        64-column chunk: one 8-row swizzle atom, the swizzle permuting within a row) and
        their flags, copied by the copy engine into the same places of the peer's tile,
        counted on the peer's ``landed`` barrier. The copy engine moves them no faster
        than threads' stores would, but spares the threads' stores the whole-sector
        pattern those into the peer need (benchmarks/NOTES.md, "The pair kernel's
        exchange by bulk copies"); a warp's own copies need no barrier of the warpgroup."""
        landed = (pair.landed + buf).toint() + pair.shift
        first_token = pair.rank * GATHER_TOKENS + warp * WARP_TOKENS
        rows = sK.iterator.toint() + (buf * (TOKENS * self.d) + first_token * CHUNK_COLUMNS) * (BFloat16.width // 8)
        for chunk in cutlass.range_constexpr(self.d // CHUNK_COLUMNS):
            source = rows + chunk * CHUNK_BYTES
            dsmem.copy_bulk(source + pair.shift, source, WARP_CHUNK_BYTES, landed)
        flags = (token_valid.iterator + buf * TOKENS + first_token).toint()
        dsmem.copy_bulk(flags + pair.shift, flags, WARP_TOKENS * Int32.width // 8, landed)


@dataclass(frozen=True)  # frozen: the DSL's loops read it without carrying it
class PairState:
    """A CTA of a pair: its ``landed`` mbarriers (one per K buffer: the peer's half of
    the tile has landed), its rank in the cluster, and the shift from an address of its
    shared memory to the same place in the peer's (``dsmem.peer_shift``)."""

    landed: object
    rank: object
    shift: object
