"""Sparse (top-k) MLA decode over an FP8 KV cache (DeepSeek-V3.2's layout or MODEL1's,
``fp8_cache``), for Hopper (sm_90a).

One CTA per (batch, query token, 64-head tile, share of the topk) walks that query
token's indices 64 at a time (a *step*), with two K tiles in shared memory so that
gathering one step overlaps the MMAs of the one before:

1. gather, in two halves: *fetch* (all 256 threads, four per token, read the token's
   FP8 latent bytes, its scales and its bf16 rope values straight from the paged cache
   into registers: 16-byte loads, and one load of the token's scales) and *unpack*
   (dequantize to bf16 and store the 64 x d K tile into shared memory in the swizzled
   K-major layout WGMMA reads; d = 576 for V3.2, 512 for MODEL1). A token that is not
   valid (a negative index, one past the cache, or a position at or past
   ``topk_length``) is never read: its row is zeros and its score is masked to -inf.
2. attend: each warpgroup computes ``S = Q K^T`` for all 64 heads (Q, 64 x d, loaded
   once) over 32 of the step's 64 tokens; the rows' maxima go through shared memory, so
   both run the online softmax against the same maxima; each accumulates ``O += P V``
   for its own 256 of the 512 value columns: its own P (registers) times its tokens' V
   rows, then the other's P (stored with stmatrix into shared memory) times the other
   tokens' rows. V is the tile's first 512 columns (for MODEL1 the whole key), read as
   an MN-major operand (the layouts of ``decode_sm90``).

With an extra cache (FlashMLA's ``extra_k_cache``), a query token's steps are those of its
main indices, then those of its extra indices, each step's 64 tokens from one cache (both
topks are multiples of 64); a cache's steps end at its topk length.

The pipeline, per step ``i`` (tile ``i`` in buffer ``i % 2``)::

    issue S = Q K_i^T          | fetch step i + 1 (loads in flight during the MMA)
    softmax of S, P            |
    issue O += P V_i           | unpack step i + 1 into the other buffer
    wait; CTA barrier          (tile i is read, tile i + 1 is written)

Each thread also loads its token index of step ``i + 2`` during step ``i``, so that a
fetch never waits on its own index (and finds the token's bytes without a division,
``token_bytes``). For MODEL1 (``Arrangement.unpack_beside_scores``) a token's bytes come
in two halves (``chunks_of``), and the next tile's first half is unpacked beside S
instead::

    issue S = Q K_i^T          | unpack step i + 1's first half; fetch its second half
    softmax of S, P            |
    issue O += P V_i           | unpack step i + 1's second half; fetch step i + 2's first
    wait; CTA barrier

Split over topk (``sparse_plan``, from shapes alone): the first ``whole_batches``
sequences' tiles get one CTA each, launched first; the other sequences' tiles are shared
by ``topk_splits`` CTAs each, which take equal shares of the steps (of both caches) and
write bf16 partials, merged by the combine kernel (``combine.py``, launched as this
kernel's programmatic dependent). The grid is one-dimensional: CTA ``x`` finds its
sequence, tile and share in ``work_of``.

This is the kernel for one head tile a query token (h_q up to 64). With two (h_q 65 to
128), ``sparse_pair_sm90``'s subclass runs the two tiles' CTAs as a cluster that
shares its K tiles, in three warpgroups of their own roles; it keeps this class's host
function (its launch shape from the class attributes), steps, splits, fetch,
dequantization and row writer.

Where things are: ``kernel`` sets up and runs the step loop (the pipeline above);
``issue_scores``, ``online_softmax`` and ``issue_pv`` are a step's parts for one
warpgroup, ``fetch`` / ``unpack`` the gather's halves, ``finish`` the epilogue
(``write_row`` its rows).

The epilogue divides by the row sums and, for a tile that is not split, applies the
attention sink (``out *= exp(lse) / (exp(lse) + exp(sink))``, lse unchanged; the combine
kernel applies it to split ones) and writes out and lse (for MODEL1 the output's rows
through shared memory, ``Arrangement.stage_output_rows``); a row that saw no valid token
gets out 0 and lse +inf. Heads past ``h_q`` (fewer than 64 or 128 heads) are zero rows
of Q that are never stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import BFloat16, Float32, Int32, Int64, Uint8, Uint32, const_expr
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup
from cutlass.tensor_utils import LayoutEnum

from .. import fp8_cache
from ..sparse_plan import HEAD_TILE, STEP_TOKENS
from . import softmax, utils
from .combine import CTAS_PER_SPARSE_CTA, GROUP_ROW_FRAGMENTS, MlaCombine
from .split_o import SplitOFragments, split_o_fragments

TOKENS = STEP_TOKENS  # indices per step
NUM_WARPGROUPS = 2
THREADS = utils.WARPGROUP_THREADS * NUM_WARPGROUPS
THREADS_PER_TOKEN = THREADS // TOKENS  # 4: one token's bytes are gathered by 4 threads
VECTOR_BYTES = 16
VECTOR_COLUMNS = VECTOR_BYTES // (BFloat16.width // 8)  # 8: bf16 columns of a 16-byte vector of a K row
ELEMS_PER_THREAD_CHUNK = 16  # bf16 values a thread writes per 64-column chunk of a K row
# Latent chunks of a token's first half (with its scales; the second half has the rest
# and the rope values): fetched and unpacked apart from the rest, so that one half can
# be dequantized while the S MMA runs and the other while P V runs.
FIRST_HALF_CHUNKS = 4


@dataclass(frozen=True)
class Arrangement:
    """Where the two layouts' kernels are arranged differently: each choice measured on
    the H100 (benchmarks/NOTES.md, the sections named), where the same change moved the
    two step loops in opposite directions."""

    # The next tile's first half dequantized while S runs (``FIRST_HALF_CHUNKS``), else
    # all of it while P V runs. "The unpack split between the two MMAs' windows": MODEL1's
    # cases 5-11% faster with it, V3.2's 5-7% slower.
    unpack_beside_scores: bool
    # The epilogue stages the output's rows in shared memory and stores them whole
    # (``finish``). "The epilogue's stores through shared memory": MODEL1's cases 2-7%
    # faster; V3.2's production cases the same, its peak cases 1-3% slower.
    stage_output_rows: bool
    # Each query token's index row found once (``query_row``), else its 64-bit offset
    # recomputed at each step's index load; and the dequantization's scale applied to
    # bf16 pairs (one HMUL2.BF16 a pair, exact for power-of-two scales, another scale
    # rounded to bf16 first), else to float32 values before the pack. "The index row
    # found once; the scale applied in bf16 pairs": MODEL1's cases 1-4% faster with
    # both, V3.2's 1.5-2% slower with both and with the scale alone.
    index_row_once: bool
    scale_in_bf16: bool


ARRANGEMENTS = {
    fp8_cache.V32.key: Arrangement(unpack_beside_scores=False, stage_output_rows=False, index_row_once=False,
                                   scale_in_bf16=False),
    fp8_cache.MODEL1.key: Arrangement(unpack_beside_scores=True, stage_output_rows=True, index_row_once=True,
                                      scale_in_bf16=True),
}
BOTH_HALVES = (0, 1)
DV = fp8_cache.VALUE_DIM
CHUNK_COLUMNS = utils.ATOM_COLUMNS  # columns of one 128-byte swizzle atom of a K row
CHUNK_VECTORS = CHUNK_COLUMNS // VECTOR_COLUMNS  # 8: 16-byte vectors of a bf16 row's chunk
ATOM_ROWS = utils.ATOM_ROWS
NUM_BUFFERS = 2  # K tiles in shared memory: one read by the MMAs, one being written
HALF_TOKENS = TOKENS // NUM_WARPGROUPS  # a step's tokens whose scores one warpgroup computes
K_STEPS_PER_HALF = HALF_TOKENS // utils.MMA_K  # k-steps of P V over one warpgroup's tokens

# Row statistics in shared memory, each HEAD_TILE floats: each warpgroup's row maxima of
# the step's scores, then (in the epilogue) each warpgroup's row sums.
STAT_MAX, STAT_SUM = 0, NUM_WARPGROUPS
NUM_STATS = 2 * NUM_WARPGROUPS


class SparseDecodeSm90:
    """The sparse decode kernel for one cache layout (``fp8_cache.V32`` or ``MODEL1``)
    and whether there is an extra cache, both compiled in (a kernel without one has no
    branch between two caches in its gather); every size (batch, s_q, heads, topks, page
    sizes, cache sizes) and option (scale, sink, topk lengths) is a runtime value."""

    # The launch's shape, which ``sparse_pair_sm90`` changes: the tokens of a step whose
    # scores one warpgroup computes, the P tiles in shared memory, threads, cluster.
    SCORE_TOKENS = HALF_TOKENS
    P_TILES = NUM_WARPGROUPS
    THREADS = THREADS
    CLUSTER = 1
    NUM_STATS = NUM_STATS  # row statistics in shared memory, each HEAD_TILE floats

    def __init__(self, layout: fp8_cache.Fp8Layout, has_extra: bool = False):
        self.layout = layout
        self.has_extra = has_extra
        self.d = layout.head_dim  # key width: Q, K and S's reduction
        self.latent_chunks = layout.latent_dim // CHUNK_COLUMNS  # FP8 chunks of a K row (8 or 7)
        self.arrangement = ARRANGEMENTS[layout.key]

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (b, s_q, h_q, d) bf16
        mKCache: cute.Tensor,  # (num_blocks, page_size, 1, bytes per token) uint8: the cache's bytes
        mIndices: cute.Tensor,  # (b, s_q, topk) int32
        mTopkLength: cute.Tensor,  # (b,) int32, or any one int when has_topk_length == 0
        mExtraKCache: cute.Tensor,  # the extra cache as mKCache (without one, any such tensor: never read)
        mExtraIndices: cute.Tensor,  # (b, s_q, extra_topk) int32
        mExtraTopkLength: cute.Tensor,  # (b,) int32, or any one int when has_extra_topk_length == 0
        mSink: cute.Tensor,  # (h_q,) fp32, or any one float when has_sink == 0
        mO: cute.Tensor,  # (b, s_q, h_q, 512) bf16
        mLse: cute.Tensor,  # (b, h_q, s_q) fp32
        mAccum: cute.Tensor,  # partials of the split sequences' fragments (utils.accumulators)
        mNumSplits: cute.Tensor,  # (b + 1,) int32: sparse_plan.SparsePlan.fragment_offsets
        softmax_scale: Float32,
        has_topk_length: Int32,
        has_sink: Int32,
        extra_topk: Int32,  # 0 without an extra cache
        has_extra_topk_length: Int32,
        whole_batches: Int32,  # sequences whose tiles are not split (sparse_plan.SparsePlan)
        topk_splits: Int32,  # CTAs that share a tile of each other sequence
        num_sms: Int32,
        stream,
    ):
        dtype = BFloat16
        # S of a warpgroup's tokens of the step; O += P V with P from registers and with
        # P from shared memory.
        tiled_mma_s = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.K, Float32, (1, 1, 1), (HEAD_TILE, self.SCORE_TOKENS)
        )
        tiled_mma_o_rs = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.MN, Float32, (1, 1, 1),
            (HEAD_TILE, DV // NUM_WARPGROUPS), sm90_utils.OperandSource.RMEM,
        )
        tiled_mma_o_ss = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.MN, Float32, (1, 1, 1),
            (HEAD_TILE, DV // NUM_WARPGROUPS),
        )
        sQ_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (HEAD_TILE, TOKENS, self.d), dtype, 1)
        sK_layout = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (HEAD_TILE, TOKENS, self.d), dtype, NUM_BUFFERS)
        # P tiles (64 heads x a warpgroup's tokens), K-major.
        sP_layout = sm90_utils.make_smem_layout_a(
            LayoutEnum.ROW_MAJOR, (HEAD_TILE, DV // NUM_WARPGROUPS, self.SCORE_TOKENS), dtype, self.P_TILES
        )

        k_buffer_bytes = cute.cosize(sK_layout) * dtype.width // 8
        assert utils.staged_rows_bytes(HEAD_TILE, DV, dtype) <= k_buffer_bytes, "the output rows cannot be staged"

        self.shared_storage = self.shared_storage_type(sQ_layout, sK_layout, sP_layout)
        b, s_q, h_q = mQ.shape[0], mQ.shape[1], mQ.shape[2]
        head_tiles = (h_q + HEAD_TILE - 1) // HEAD_TILE
        # The partials of fragment k of split sequence i at index mNumSplits[i] + k, as
        # one KV head of s_q * h_q rows (row s * h_q + h), the layout the combine kernel reads.
        num_fragments = whole_batches + (b - whole_batches) * topk_splits
        mOAccum, mLseAccum = utils.accumulators(mAccum, num_fragments, 1, s_q * h_q, DV, BFloat16)
        num_ctas = num_fragments * s_q * head_tiles
        # Each cache's page size as a divisor made here, on the host: the kernel divides
        # a cache position by it with a multiply and shifts (``token_bytes``).
        pages = cute.FastDivmodDivisorV2(mKCache.shape[1])
        extra_pages = cute.FastDivmodDivisorV2(mExtraKCache.shape[1])
        self.kernel(
            tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss, *self.q_sources(mQ), mKCache, pages, mIndices, mTopkLength,
            mExtraKCache, extra_pages, mExtraIndices, mExtraTopkLength, mSink, mO, mLse, mOAccum, mLseAccum,
            softmax_scale, has_topk_length, has_sink, extra_topk, has_extra_topk_length, whole_batches, topk_splits,
            sQ_layout, sK_layout, sP_layout,
        ).launch(
            grid=[num_ctas, 1, 1],  # grid.x has no 65535 limit
            block=[self.THREADS, 1, 1],
            cluster=[self.CLUSTER, 1, 1],
            stream=stream,
            min_blocks_per_mp=1,
        )
        # Split query tokens: their fragments merged (and the sink applied) by a combine
        # kernel launched as this kernel's programmatic dependent: with the fragments'
        # rows staged in shared memory where every row has more fragments than a thread
        # group merges (combine.py; the b = 2 cases: 0.6-0.9 us faster than the thread
        # groups side by side, benchmarks/NOTES.md, "The many-fragment merge staged in
        # shared memory").
        # (The merge object is made in each branch: a Python object cannot be carried
        # through a branch on a run-time value.)
        merge_args = (mOAccum, mLseAccum, mNumSplits, mO, mLse, mSink, has_sink, h_q)
        if topk_splits > GROUP_ROW_FRAGMENTS:
            MlaCombine(BFloat16, DV).launch_staged(*merge_args, stream)
        else:
            MlaCombine(BFloat16, DV).launch(*merge_args, cutlass.min(num_ctas, num_sms), CTAS_PER_SPARSE_CTA, stream,
                                            True)

    def q_sources(self, mQ) -> tuple:
        """The kernel's arguments that Q is loaded from: Q itself (``load_q``; the pair
        kernel adds a TMA view of it)."""
        return (mQ,)

    @cute.jit
    def shared_storage_type(self, sQ_layout, sK_layout, sP_layout):
        """The shared memory's layout (a ``cute.struct``)."""
        dtype = BFloat16

        @cute.struct
        class SharedStorage:
            token_valid: cute.struct.MemRange[Int32, TOKENS * NUM_BUFFERS]
            row_stats: cute.struct.MemRange[Float32, HEAD_TILE * NUM_STATS]
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            # The K buffers; where stage_output_rows, also the epilogue's staged output rows.
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
        mQ: cute.Tensor,
        mKCache: cute.Tensor,
        pages: cute.FastDivmodDivisorV2,  # the page size of mKCache
        mIndices: cute.Tensor,
        mTopkLength: cute.Tensor,
        mExtraKCache: cute.Tensor,
        extra_pages: cute.FastDivmodDivisorV2,  # the page size of mExtraKCache
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
        wg_tidx = tidx % utils.WARPGROUP_THREADS
        h_q = mQ.shape[2]
        batch, s, head_tile, split, splits = self.work_of(cta, mQ.shape[1], (h_q + HEAD_TILE - 1) // HEAD_TILE,
                                                          whole_batches, topk_splits)
        head0 = head_tile * HEAD_TILE

        # The combine kernel may start now: its CTAs wait for this grid's end.
        cute.arch.griddepcontrol_launch_dependents()

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)

        self.load_q(mQ, sQ, tidx, batch, s, head0, h_q)
        for tiled_mma in (tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss):
            tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
        t = self.warpgroup_tensors(wg, wg_tidx, tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss, sQ, sK, storage,
                                   sP_layout)
        for i in cutlass.range_constexpr(cute.size(t.row_max)):
            t.row_max[i] = -Float32.inf
            t.row_sum[i] = 0.0
        t.acc_o.fill(0.0)
        scale_log2 = softmax_scale * math.log2(math.e)

        steps, first, num_steps = self.split_steps(mIndices, mTopkLength, has_topk_length, mExtraIndices,
                                                   mExtraTopkLength, has_extra_topk_length, extra_topk, batch, s,
                                                   split, splits)
        token = tidx // THREADS_PER_TOKEN
        part = tidx % THREADS_PER_TOKEN
        fetched = self.token_registers()
        caches = ((mKCache, pages), (mExtraKCache, extra_pages))
        # Step 0 fetched and unpacked before the loop; the index of step 1 in flight
        # (`next_index`), and, unpacking beside S, step 1's first half fetched and the
        # index of step 2 in flight.
        index = steps.index(first, token)
        next_index = steps.index(first + 1, token)
        self.fetch(caches, steps.from_extra(first), fetched, index, part, BOTH_HALVES)
        self.unpack(fetched, sK, t.token_valid, 0, token, part, BOTH_HALVES)
        if const_expr(self.arrangement.unpack_beside_scores):
            index = next_index
            next_index = steps.index(first + 2, token)
            if num_steps > 1:
                self.fetch(caches, steps.from_extra(first + 1), fetched, index, part, (0,))
        cute.arch.cp_async_wait_group(0)  # this thread's part of Q has landed
        cute.arch.fence_view_async_shared()
        cute.arch.sync_threads()  # Q and tile 0 are stored
        for step in cutlass.range(num_steps, unroll=1):
            buf = step % NUM_BUFFERS
            has_next = step + 1 < num_steps
            # Which tokens are valid: read before S is issued, since the compiler puts
            # loads issued after it among its k-steps, where they wait behind the
            # MMAs' shared-memory reads and hold back the last k-step. Not so beside
            # an unpack under S (MODEL1): there that wait keeps the unpack's stores off
            # most of S's reads, and reading the flags first measured 2-6% slower.
            if const_expr(not self.arrangement.unpack_beside_scores):
                valid_columns = self.valid_columns(t, buf)
            self.issue_scores(t, buf)
            if const_expr(self.arrangement.unpack_beside_scores):
                valid_columns = self.valid_columns(t, buf)
            if has_next:
                if const_expr(self.arrangement.unpack_beside_scores):
                    # The next tile's first half (fetched during the step before) is
                    # dequantized while the tensor cores compute S; its second half's
                    # loads go out.
                    self.unpack(fetched, sK, t.token_valid, 1 - buf, token, part, (0,))
                    self.fetch(caches, steps.from_extra(first + step + 1), fetched, index, part, (1,))
                else:
                    # The next tile's loads fly while the tensor cores compute S.
                    index = next_index
                    next_index = steps.index(first + step + 2, token)
                    self.fetch(caches, steps.from_extra(first + step + 1), fetched, index, part, BOTH_HALVES)
            warpgroup.wait_group(0)
            self.online_softmax(t, valid_columns, scale_log2)
            self.issue_pv(t, buf)
            if has_next:
                # Dequantizing (the rest of) the next tile while the tensor cores do P V.
                if const_expr(self.arrangement.unpack_beside_scores):
                    self.unpack(fetched, sK, t.token_valid, 1 - buf, token, part, (1,))
                    cute.arch.fence_view_async_shared()
                    if step + 2 < num_steps:
                        # The first half of the tile after it goes out.
                        index = next_index
                        next_index = steps.index(first + step + 3, token)
                        self.fetch(caches, steps.from_extra(first + step + 2), fetched, index, part, (0,))
                else:
                    self.unpack(fetched, sK, t.token_valid, 1 - buf, token, part, BOTH_HALVES)
                    cute.arch.fence_view_async_shared()
            warpgroup.wait_group(0)
            cute.arch.sync_threads()  # tile `buf` and the P are read; the other tile is written
        fragment = whole_batches + (batch - whole_batches) * topk_splits + split  # when split
        self.finish(t, storage, tidx, mO, mLse, mOAccum, mLseAccum, mSink, softmax_scale, has_sink, splits, fragment,
                    batch, s, head0, h_q)

    @cute.jit
    def split_steps(self, mIndices, mTopkLength, has_topk_length, mExtraIndices, mExtraTopkLength,
                    has_extra_topk_length, extra_topk, batch, s, split, splits):
        """(where the query token's steps take their indices, this split's first step, its
        number of steps): an equal share of both topks' steps (the plan's unit), cut at
        the steps that hold indices below the topk lengths."""
        steps = StepSources.create(self.has_extra, self.arrangement.index_row_once, mIndices, mTopkLength,
                                   has_topk_length, mExtraIndices, mExtraTopkLength, has_extra_topk_length, extra_topk,
                                   batch, s)
        steps_per_split = ((mIndices.shape[2] + extra_topk) // TOKENS + splits - 1) // splits
        first = split * steps_per_split
        return steps, first, cutlass.max(cutlass.min(steps_per_split, steps.count - first), 0)

    @staticmethod
    @cute.jit
    def work_of(cta, s_q, head_tiles, whole_batches, topk_splits):
        """(batch, query token, head tile, share of the topk, shares) of CTA ``cta``: the
        whole sequences' tiles first, one CTA each, then ``topk_splits`` CTAs for each
        tile of every other sequence."""
        tiles = s_q * head_tiles
        whole_ctas = whole_batches * tiles
        batch = cta // tiles
        tile = cta - batch * tiles
        split = Int32(0)
        splits = Int32(1)
        if cta >= whole_ctas:
            ctas_per_batch = tiles * topk_splits
            rest = cta - whole_ctas
            later = rest // ctas_per_batch
            batch = whole_batches + later
            share = rest - later * ctas_per_batch
            tile = share // topk_splits
            split = share - tile * topk_splits
            splits = topk_splits
        s = tile // head_tiles
        return batch, s, tile - s * head_tiles, split, splits

    @cute.jit
    def warpgroup_tensors(self, wg, wg_tidx, tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss, sQ, sK, storage,
                          sP_layout) -> "WarpgroupTensors":
        """This thread's MMA fragments (S over ``score_keys``, O of this warpgroup's 256
        value columns), shared-memory views and row state. (The caller sets the MMAs'
        accumulate flag: in ``sparse_pair_sm90`` before its branch on the role, where a
        value set inside one role's branch could not be used by the other's code.)"""
        sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
        fragments = split_o_fragments(wg_tidx, tiled_mma_s, tiled_mma_o_rs, tiled_mma_o_ss, sQ,
                                      self.score_keys(sK, wg), self.value_columns(sK, wg), sP,
                                      (HEAD_TILE, self.SCORE_TOKENS), (HEAD_TILE, DV // NUM_WARPGROUPS), BFloat16)
        num_rows = cute.size(fragments["s_rc"], mode=[0])
        return WarpgroupTensors(
            **fragments,
            row_stats=storage.row_stats.get_tensor(cute.make_layout((HEAD_TILE, self.NUM_STATS),
                                                                    stride=(1, HEAD_TILE))),
            token_valid=storage.token_valid.get_tensor(cute.make_layout((TOKENS, NUM_BUFFERS))),
            row_max=cute.make_rmem_tensor((num_rows,), Float32),
            row_sum=cute.make_rmem_tensor((num_rows,), Float32),
            wg=wg,
            lane_writes_row=wg_tidx % 4 == 0,
        )

    def score_keys(self, sK, wg):
        """K for warpgroup ``wg``'s scores: its tokens (32 wg .. 32 wg + 31) of each
        tile, four of the tile's eight 8-token swizzle atoms, (token, column, buffer)."""
        return cute.make_tensor(
            sK.iterator + wg * (HALF_TOKENS * CHUNK_COLUMNS),
            cute.make_layout(
                ((ATOM_ROWS, HALF_TOKENS // ATOM_ROWS), (CHUNK_COLUMNS, self.d // CHUNK_COLUMNS), (1, NUM_BUFFERS)),
                stride=((CHUNK_COLUMNS, ATOM_ROWS * CHUNK_COLUMNS), (1, TOKENS * CHUNK_COLUMNS), (0, TOKENS * self.d)),
            ),
        )

    def value_columns(self, sK, wg):
        """V for warpgroup ``wg``: its 256 value columns of the K tiles, MN-major (N =
        column, K = token), (column, token, buffer)."""
        return cute.make_tensor(
            sK.iterator + wg * (DV // NUM_WARPGROUPS * TOKENS),
            cute.make_layout(
                ((CHUNK_COLUMNS, DV // NUM_WARPGROUPS // CHUNK_COLUMNS), (ATOM_ROWS, TOKENS // ATOM_ROWS),
                 (1, NUM_BUFFERS)),
                stride=((1, TOKENS * CHUNK_COLUMNS), (CHUNK_COLUMNS, ATOM_ROWS * CHUNK_COLUMNS), (0, TOKENS * self.d)),
            ),
        )

    @cute.jit
    def issue_scores(self, t, buf):
        """Issue ``S = Q K^T`` over this warpgroup's 32 tokens of tile ``buf`` (committed,
        not waited for)."""
        t.acc_s.fill(0.0)
        warpgroup.fence()
        for k in cutlass.range_constexpr(cute.size(t.tSrQ, mode=[2])):
            cute.gemm(t.tiled_mma_s, t.acc_s, t.tSrQ[None, None, k, 0], t.tSrK[None, None, k, buf], t.acc_s)
        warpgroup.commit_group()

    @cute.jit
    def valid_columns(self, t, buf) -> Int32:
        """Which of this thread's score columns are valid tokens, one bit each (read from
        shared memory around the S MMA's issue rather than after its wait)."""
        bits = Int32(0)
        # This warpgroup's tokens start at wg * SCORE_TOKENS unless it scores them all.
        first_token = t.wg * (TOKENS - self.SCORE_TOKENS)
        for j in cutlass.range_constexpr(cute.size(t.s_rc, mode=[1])):
            bits = bits | (t.token_valid[first_token + t.coord_s[0, j][1], buf] << j)
        return bits

    @cute.jit
    def online_softmax(self, t, valid_columns, scale_log2):
        """Scores of invalid tokens to -inf; the rows' maxima over both warpgroups' tokens
        (through shared memory); P, this warpgroup's share of the row sums, and O
        rescaled to the new maxima (the same in both warpgroups; ``softmax.next_max``)."""
        num_rows = cute.size(t.s_rc, mode=[0])
        num_cols = cute.size(t.s_rc, mode=[1])
        for j in cutlass.range_constexpr(num_cols):
            if (valid_columns >> j) & 1 == 0:
                for i in cutlass.range_constexpr(num_rows):
                    t.s_rc[i, j] = -Float32.inf
        for i in cutlass.range_constexpr(num_rows):
            m = softmax.row_max(t.s_rc, i)
            if t.lane_writes_row:
                t.row_stats[t.coord_s[i, 0][0], STAT_MAX + t.wg] = m
        cute.arch.sync_threads()
        for i in cutlass.range_constexpr(num_rows):
            r = t.coord_s[i, 0][0]
            step_max = cute.arch.fmax(t.row_stats[r, STAT_MAX], t.row_stats[r, STAT_MAX + 1])
            # The maximum moves only by more than the threshold, so that after the first
            # steps O's rescale is nearly always by exactly 1 and skipped.
            m_new = softmax.next_max(t.row_max[i], step_max, scale_log2)
            m_scaled = softmax.scaled_max(m_new, scale_log2)
            rescale = softmax.rescale_factor(t.row_max[i], m_scaled, scale_log2)
            total = softmax.exponentiate_row(t.s_rc, i, scale_log2, m_scaled)
            t.row_sum[i] = t.row_sum[i] * rescale + total  # this warpgroup's tokens only
            t.row_max[i] = m_new
            softmax.rescale_row(t.o_rc, i, rescale)

    @cute.jit
    def issue_pv(self, t, buf):
        """Issue ``O += P V`` over this warpgroup's tokens (its P from registers), then,
        once the other's P is in shared memory, over the other's tokens."""
        other = 1 - t.wg
        t.p_regs.store(t.acc_s.load().to(BFloat16))
        cute.copy(t.p_store, t.p_store.retile(t.p_regs), t.tPsP[None, None, None, t.wg])
        cute.arch.fence_view_async_shared()
        warpgroup.fence()
        for k in cutlass.range_constexpr(K_STEPS_PER_HALF):
            cute.gemm(t.tiled_mma_o_rs, t.acc_o, t.p_operand[None, None, k],
                      t.tOrV_rs[None, None, t.wg * K_STEPS_PER_HALF + k, buf], t.acc_o)
        warpgroup.commit_group()
        cute.arch.sync_threads()  # both warpgroups' P are stored
        for k in cutlass.range_constexpr(K_STEPS_PER_HALF):
            cute.gemm(t.tiled_mma_o_ss, t.acc_o, t.tOrP_ss[None, None, k, other],
                      t.tOrV_ss[None, None, other * K_STEPS_PER_HALF + k, buf], t.acc_o)
        warpgroup.commit_group()

    @cute.jit
    def finish(self, t, storage, tidx, mO, mLse, mOAccum, mLseAccum, mSink, softmax_scale, has_sink, splits, fragment,
               batch, s, head0, h_q):
        """The epilogue: the row sums of both warpgroups; the output (with the sink) or,
        when the query token's topk is split, this fragment's partial in bf16 (lse -inf
        when it saw no valid token).

        Where ``Arrangement.stage_output_rows``, the output's or the partial's rows go
        through shared memory (``utils.copy_rows``): from the accumulators a bf16 pair
        is 4 bytes, so a store instruction writes half a sector in each of 8 rows."""
        num_rows = cute.size(t.s_rc, mode=[0])
        for i in cutlass.range_constexpr(num_rows):
            total = utils.quad_sum(t.row_sum[i])
            if t.lane_writes_row:
                t.row_stats[t.coord_s[i, 0][0], STAT_SUM + t.wg] = total
        cute.arch.sync_threads()
        # The K buffers are free after the last step: the output's rows are staged there.
        staged_out = storage.sK.get_tensor(utils.staged_rows_layout(HEAD_TILE, DV, BFloat16))
        for i in cutlass.range_constexpr(num_rows):
            r = t.coord_s[i, 0][0]
            total = t.row_stats[r, STAT_SUM] + t.row_stats[r, STAT_SUM + 1]
            self.write_row(t, i, total, t.row_max[i], staged_out, self.arrangement.stage_output_rows, mO, mLse,
                           mOAccum, mLseAccum, mSink, softmax_scale, has_sink, splits, fragment, batch, s, head0, h_q)
        if const_expr(self.arrangement.stage_output_rows):
            cute.arch.sync_threads()
            self.copy_staged_rows(staged_out, mO, mOAccum, splits, fragment, batch, s, head0, h_q, tidx, THREADS)

    @cute.jit
    def copy_staged_rows(self, staged_out, mO, mOAccum, splits, fragment, batch, s, head0, h_q, tidx,
                         threads: cutlass.Constexpr):
        """The rows that ``write_row`` staged, out whole (``utils.copy_rows``): into the
        output, or this fragment's partial rows where the query token is split."""
        num_rows = cutlass.min(h_q - head0, HEAD_TILE)
        if splits == 1:
            utils.copy_rows(staged_out, lambda r: mO[batch, s, head0 + r, None], num_rows, tidx, threads)
        else:
            utils.copy_rows(staged_out, lambda r: mOAccum[fragment, 0, s * h_q + head0 + r, None], num_rows, tidx,
                            threads)

    @cute.jit
    def write_row(self, t, i, total, row_max, staged_out, staged: bool, mO, mLse, mOAccum, mLseAccum, mSink,
                  softmax_scale, has_sink, splits, fragment, batch, s, head0, h_q):
        """This thread's part of row ``i`` of its warpgroup's O, divided by the row's
        ``total`` (of P), into the output (with the sink) or this fragment's bf16
        partial, either into ``staged_out`` where ``staged``; warpgroup 0 writes the
        row's lse."""
        r = t.coord_o[i, 0][0]
        head = head0 + r
        col0 = t.wg * (DV // NUM_WARPGROUPS)
        writes_lse = (t.wg == 0) & t.lane_writes_row
        inv = Float32(0.0)
        lse = -Float32.inf
        if total != 0.0:  # a NaN sum (a NaN key) gives NaN out and lse, as the reference does
            lse = row_max * softmax_scale + cute.math.log(total, fastmath=False)
            inv = cute.arch.rcp_approx(total)
        if head < h_q:
            if splits == 1:
                factor = inv
                if (total != 0.0) & (has_sink != 0):
                    # exp(lse) / (exp(lse) + exp(sink)): +inf sink gives 0, -inf leaves 1.
                    factor = inv / (1.0 + cute.math.exp(mSink[head] - lse, fastmath=False))
                if total == 0.0:
                    lse = Float32.inf  # no valid token: out 0, lse +inf
                out_row = mO[batch, s, head, None]
                if const_expr(staged):
                    out_row = staged_out[r, None]
                utils.store_acc_row(t.o_rc, t.coord_o, i, factor, out_row, col0, BFloat16)
                if writes_lse:
                    mLse[batch, head, s] = lse
            else:
                row = s * h_q + head
                partial_row = mOAccum[fragment, 0, row, None]
                if const_expr(staged):
                    partial_row = staged_out[r, None]
                utils.store_acc_row(t.o_rc, t.coord_o, i, inv, partial_row, col0, BFloat16)
                if writes_lse:
                    mLseAccum[fragment, 0, row] = lse

    @cute.jit
    def load_q(self, mQ, sQ, tidx, batch, s, head0, h_q):
        """Start copying Q's 64 head rows into shared memory with ``cp.async``, 16 bytes a
        copy, all of a thread's copies in flight at once (the wait before the first step
        ends them); rows past h_q are zeros. The indices' load and the first K fetch go
        out meanwhile, so a CTA's start waits for one of these latencies, not for them
        in a row.

        A thread copies the same 16-byte vector of every 64-column chunk of its rows
        (``tidx // 8`` and every ``THREADS // 8``-th row after it), so that its copies
        differ by constant offsets: the addresses are worked out once, where a vector
        index dealt out over whole rows cost about 50 instructions a copy and, at a
        CTA's start, as many instruction-cache misses (benchmarks/NOTES.md, "The b2
        cases: a CTA's start"). The pair kernel loads Q by TMA instead (1-2.6% faster
        there); in this kernel TMA measured 1-2% slower on the peak h_q 64 case
        (benchmarks/NOTES.md, "Sparse Q through TMA")."""
        rows_per_pass = THREADS // CHUNK_VECTORS
        assert HEAD_TILE % rows_per_pass == 0 and self.d % CHUNK_COLUMNS == 0, "Q's tile is not whole chunks"
        copy_atom = cute.make_copy_atom(cpasync.CopyG2SOp(), mQ.element_type, num_bits_per_copy=128)
        vector = tidx % CHUNK_VECTORS
        for p in cutlass.range_constexpr(HEAD_TILE // rows_per_pass):
            r = tidx // CHUNK_VECTORS + p * rows_per_pass
            dst_row = sQ[r, None, 0]
            if head0 + r < h_q:
                src_row = mQ[batch, s, head0 + r, None]
                for chunk in cutlass.range_constexpr(self.d // CHUNK_COLUMNS):
                    c = chunk * CHUNK_VECTORS + vector
                    cute.copy(copy_atom, cute.local_tile(src_row, (VECTOR_COLUMNS,), (c,)),
                              cute.local_tile(dst_row, (VECTOR_COLUMNS,), (c,)))
            else:
                for chunk in cutlass.range_constexpr(self.d // CHUNK_COLUMNS):
                    cute.local_tile(dst_row, (VECTOR_COLUMNS,), (chunk * CHUNK_VECTORS + vector,)).fill(0.0)
        cute.arch.cp_async_commit_group()

    def piece_vectors(self, part) -> tuple:
        """The two 8-column vectors (of a 64-column chunk's 8) of a token's K row that the
        token's thread ``part`` fetches, dequantizes and stores: side by side, one 16-byte
        load of FP8 columns. (The pair kernel once took ``part`` and ``part + 4``, two
        8-byte loads, so that its threads' stores into the peer's tile filled whole
        32-byte sectors; since the copy engine sends the rows, it takes these too:
        benchmarks/NOTES.md, "The pair kernel's exchange by bulk copies".)"""
        return (2 * part, 2 * part + 1)

    def token_registers(self) -> "TokenRegisters":
        return TokenRegisters(
            latent=cute.make_rmem_tensor((ELEMS_PER_THREAD_CHUNK, self.latent_chunks), Uint8),
            scales=cute.make_rmem_tensor((self.layout.scale_bytes,), Uint8),
            rope=cute.make_rmem_tensor((2 * VECTOR_BYTES,), Uint8),
            valid=cute.make_rmem_tensor((1,), Int32),
        )

    @cute.jit
    def fetch(self, caches, from_extra, fetched, index, part, halves: tuple):
        """The ``halves`` (``chunks_of``) of quarter ``part`` of the token at cache
        position ``index`` of the main cache or (``from_extra``) the extra one into
        registers: no access at all for an invalid index."""
        main, extra = caches
        if const_expr(not self.has_extra):
            self.fetch_from(*main, fetched, index, part, halves)
        elif from_extra:
            self.fetch_from(*extra, fetched, index, part, halves)
        else:
            self.fetch_from(*main, fetched, index, part, halves)

    @cute.jit
    def fetch_from(self, mCache, pages, fetched, index, part, halves: tuple):
        valid = (index >= 0) & (index < mCache.shape[0] * mCache.shape[1])
        fetched.valid[0] = Int32(valid)
        if valid:
            row, scales = self.token_bytes(mCache, pages, index)
            if const_expr(0 in halves):
                cute.autovec_copy(scales, fetched.scales)
            # The latent loads: a miss brings 256 bytes of the row into L2 for the
            # token's next chunks, and L1 keeps each line for the load right after
            # that reads its other half (FlashMLA's hints). "The gather's loads and
            # L2": 0.6-1% off the h_q 128 cases, under 0.6% either way elsewhere.
            latent_load = cute.make_copy_atom(
                cute.nvgpu.CopyG2ROp(), Uint8, num_bits_per_copy=8 * ELEMS_PER_THREAD_CHUNK,
                l2_prefetch_size=cute.nvgpu.L2PrefetchSize.SIZE_256B,
                l1c_evict_priority=cute.nvgpu.CacheEvictionPriority.EVICT_LAST,
            )
            for chunk in cutlass.range_constexpr(*self.chunks_of(halves)):
                cute.copy(latent_load,
                          cute.local_tile(row, (ELEMS_PER_THREAD_CHUNK,), (chunk * THREADS_PER_TOKEN + part,)),
                          fetched.latent[None, chunk])
            if const_expr(1 in halves):
                # The rope part starts on a 16-byte boundary: its 16-byte pieces are its
                # 8-column vectors, of which this thread takes its two.
                vectors = self.piece_vectors(part)
                for piece in cutlass.range_constexpr(2):
                    cute.autovec_copy(
                        cute.local_tile(row, (VECTOR_BYTES,),
                                        (self.layout.rope_offset // VECTOR_BYTES + vectors[piece],)),
                        cute.local_tile(fetched.rope, (VECTOR_BYTES,), (piece,)),
                    )

    @cute.jit
    def token_bytes(self, mCache, pages, index):
        """The bytes of the token at cache position ``index`` (valid) of ``mCache``
        (``(num_blocks, page_size, 1, bytes per token)`` uint8, ``fp8_cache.page_parts``
        says where a token's bytes lie): its row (latent and rope values; V3.2's scales
        too) and its scales. Every step runs this for each token of the next tile, at 255
        registers, between a loaded index and the loads that need it: ``pages`` divides
        by the page size with a multiply and shifts (not a division's dependent chain),
        a page's start is one 32 x 32 -> 64-bit multiply (page strides are below 2**32
        bytes, the checks), and the row and the scales come from that one start (V3.2's
        scales are an immediate offset of the row's loads) by 32-bit offsets (a page's
        bytes fit in an int32, the checks' ``MAX_PAGE_BYTES``). Together 5-7% off V3.2's
        time and 1-2.5% off MODEL1's (benchmarks/NOTES.md)."""
        page, slot = divmod(index, pages)
        # A multiple of 16 bytes, or page 0 of a cache of one page (whose page stride
        # may be anything and is multiplied by 0).
        page_offset = cute.assume(Int64(cute.arch.mul_wide(Uint32(page), Uint32(mCache.stride[0]))),
                                  divby=VECTOR_BYTES)
        page_start = mCache.iterator + page_offset
        row = cute.make_tensor(page_start + slot * self.layout.row_bytes, cute.make_layout(self.layout.row_bytes))
        scales_offset = self.layout.scales_offset(mCache.shape[1])
        if const_expr(not self.layout.scales_in_rows):
            scales_offset = cute.assume(scales_offset, divby=VECTOR_BYTES)  # page_size rows of 576 bytes
        scales = cute.make_tensor(page_start + scales_offset + slot * self.layout.scale_stride,
                                  cute.make_layout(self.layout.scale_bytes))
        return row, scales

    def chunks_of(self, halves: tuple) -> tuple[int, int]:
        """(first, one past the last) latent chunk of a token's ``halves``: half 0 the
        first ``FIRST_HALF_CHUNKS`` (with the scales), half 1 the rest (with the rope
        values); the two are fetched and unpacked at different points of a step where
        ``Arrangement.unpack_beside_scores``."""
        return (0 if 0 in halves else FIRST_HALF_CHUNKS, self.latent_chunks if 1 in halves else FIRST_HALF_CHUNKS)

    @cute.jit
    def chunk_scales(self, fetched) -> cute.Tensor:
        """The float32 scale of each latent chunk of the fetched token (fetched with its
        first half): V3.2's float32 scales (one per two chunks), or MODEL1's ue8m0 bytes
        made the powers of two ``2 ** (byte - 127)`` (the byte is the float's exponent
        field)."""
        scales = cute.make_rmem_tensor((self.latent_chunks,), Float32)
        if const_expr(self.layout.ue8m0_scales):
            bits = cute.make_rmem_tensor((self.latent_chunks,), Int32)
            for chunk in cutlass.range_constexpr(self.latent_chunks):
                bits[chunk] = (Int32(fetched.scales[chunk]) & 0xFF) << 23  # the byte, not sign-extended
            scales.store(cute.recast_tensor(bits, Float32).load())
        else:
            stored = cute.recast_tensor(fetched.scales, Float32)
            for chunk in cutlass.range_constexpr(self.latent_chunks):
                scales[chunk] = stored[chunk * CHUNK_COLUMNS // self.layout.group_size]
        return scales

    @cute.jit
    def unpack(self, fetched, sK, token_valid, buf, token, part, halves: tuple):
        """Dequantize what ``fetch`` read of ``halves`` into quarter ``part`` (16 columns
        of each of their 64-column chunks) of row ``token`` of K tile ``buf`` (zeros for
        an invalid token), and the token's valid flag; the second half also stores the
        rope values."""
        valid = fetched.valid[0] != 0
        if const_expr(0 in halves):
            if part == 0:
                token_valid[token, buf] = fetched.valid[0]
        k_row = sK[token, None, buf]
        values = cute.make_rmem_tensor((ELEMS_PER_THREAD_CHUNK,), BFloat16)
        first, end = self.chunks_of(halves)
        with_rope = 1 in halves
        if valid:
            scales = self.chunk_scales(fetched)
            for chunk in cutlass.range_constexpr(first, end):
                fp8 = cute.recast_tensor(fetched.latent[None, chunk], cutlass.Float8E4M3FN).load()
                if const_expr(self.arrangement.scale_in_bf16):
                    values.store(fp8.to(Float32).to(BFloat16) * BFloat16(scales[chunk]))
                else:
                    values.store((fp8.to(Float32) * scales[chunk]).to(BFloat16))
                self.store_piece(values, k_row, chunk, part)
            if const_expr(with_rope):
                values.store(cute.recast_tensor(fetched.rope, BFloat16).load())
                self.store_piece(values, k_row, self.latent_chunks, part)
        else:
            values.fill(0.0)
            # With the second half, the rope columns (chunk latent_chunks) too.
            for chunk in cutlass.range_constexpr(first, end + int(with_rope)):
                self.store_piece(values, k_row, chunk, part)

    @cute.jit
    def store_piece(self, values, k_row, chunk, part):
        """16 bf16 ``values`` into thread ``part``'s two vectors (``piece_vectors``) of
        64-column chunk ``chunk`` of ``k_row``."""
        cute.autovec_copy(values,
                          cute.local_tile(k_row, (ELEMS_PER_THREAD_CHUNK,), (chunk * THREADS_PER_TOKEN + part,)))


@cute.jit
def query_row(mIndices, batch, s):
    """``(topk,)``: the index row of query token ``s`` of sequence ``batch``, its start
    found with 32 x 32 -> 64-bit multiplies (strides below 2**32 elements, the checks)."""
    offset = (cute.arch.mul_wide(Uint32(batch), Uint32(mIndices.stride[0]))
              + cute.arch.mul_wide(Uint32(s), Uint32(mIndices.stride[1])))
    return cute.make_tensor(mIndices.iterator + Int64(offset), cute.make_layout(mIndices.shape[2]))


@dataclass(frozen=True)  # frozen: the DSL's loops read it without carrying it
class StepSources:
    """Where a query token's steps take their indices: its ``main_steps`` steps of main
    indices (up to its topk length), then (``has_extra``) its extra indices' steps;
    ``count`` in all."""

    has_extra: bool  # compiled in
    index_row_once: bool  # compiled in (``Arrangement``): the index tensors are the query token's rows
    mIndices: cute.Tensor
    mExtraIndices: cute.Tensor
    batch: object
    s: object
    main_limit: object  # main indices at or past this position count as invalid
    extra_limit: object
    main_steps: object
    count: object

    @staticmethod
    @cute.jit
    def create(has_extra, index_row_once, mIndices, mTopkLength, has_topk_length, mExtraIndices, mExtraTopkLength,
               has_extra_topk_length, extra_topk, batch, s) -> "StepSources":
        main_limit = mIndices.shape[2]
        if has_topk_length != 0:
            main_limit = cutlass.max(cutlass.min(mTopkLength[batch], main_limit), 0)
        extra_limit = Int32(0)
        if const_expr(has_extra):
            extra_limit = extra_topk
            if has_extra_topk_length != 0:
                extra_limit = cutlass.max(cutlass.min(mExtraTopkLength[batch], extra_limit), 0)
        main_steps = (main_limit + TOKENS - 1) // TOKENS
        if const_expr(index_row_once):
            mIndices, mExtraIndices = query_row(mIndices, batch, s), query_row(mExtraIndices, batch, s)
        return StepSources(has_extra, index_row_once, mIndices, mExtraIndices, batch, s, main_limit, extra_limit,
                           main_steps, main_steps + (extra_limit + TOKENS - 1) // TOKENS)

    @cute.jit
    def from_extra(self, step):
        return step >= self.main_steps

    @cute.jit
    def index(self, step, token) -> Int32:
        """The cache position of the step's ``token``-th index, or -1 past its cache's
        topk length (where the index tensor may end) or past the last step."""
        index = Int32(-1)
        # An extra step's main position is at or past main_steps * TOKENS >= main_limit,
        # so the main test alone tells a main index.
        position = step * TOKENS + token
        if position < self.main_limit:
            index = self.entry(self.mIndices, position)
        if const_expr(self.has_extra):
            extra_position = position - self.main_steps * TOKENS  # negative on main steps
            if (extra_position >= 0) & (extra_position < self.extra_limit):
                index = self.entry(self.mExtraIndices, extra_position)
        return index

    @cute.jit
    def entry(self, indices, position) -> Int32:
        """Entry ``position`` of this query token's row of ``indices``."""
        if const_expr(self.index_row_once):
            return indices[position]
        return indices[self.batch, self.s, position]


@dataclass(frozen=True)  # frozen: the DSL's loops read it without carrying it
class WarpgroupTensors(SplitOFragments):
    """What one thread of a warpgroup works with (``SparseDecodeSm90.warpgroup_tensors``):
    its MMA fragments (``split_o.SplitOFragments``: S of this warpgroup's 32 tokens of the
    step, then P; its 64 x 256 half of O), and these."""

    row_stats: cute.Tensor  # (HEAD_TILE, NUM_STATS) shared by the warpgroups
    token_valid: cute.Tensor  # (TOKENS, NUM_BUFFERS): which tokens of a tile are valid
    row_max: cute.Tensor  # the running maximum of each of this thread's rows
    row_sum: cute.Tensor  # this warpgroup's share of each row's sum
    wg: object  # 0 or 1
    lane_writes_row: object  # the thread of its quad that writes row statistics


@dataclass(frozen=True)  # frozen: the DSL's loops read it without carrying it
class TokenRegisters:
    """One thread's share of a token between ``fetch`` and ``unpack``: 16 latent FP8
    bytes of each 64-column chunk, the token's scales, 16 rope values, and whether the
    token is valid (``SparseDecodeSm90.token_registers``)."""

    latent: cute.Tensor  # (16, latent chunks) uint8
    scales: cute.Tensor  # (scale bytes,) uint8: 4 float32 (V3.2) or 7 ue8m0 and a pad (MODEL1)
    rope: cute.Tensor  # (32,) uint8: 16 bf16
    valid: cute.Tensor  # (1,) int32: set by every fetch; the fetch before an unpack is always of its token
