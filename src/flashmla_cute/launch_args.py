"""The kernels' launch arguments, in the order their compiled functions take them.

The host (``runtime``, ``sparse_runtime``, the tests' standalone merge) and the compile step (``compile``, which
passes fake tensors of the same kinds) build these tuples by field name, so the order is
written here alone; a test checks it against the kernels' ``__call__`` parameters
(``mBlockTable`` is ``block_table`` here). The CUDA stream is not one of them: the
compiled functions launch on torch's current stream. This module imports nothing heavy,
so that importing the package stays fast.
"""

from __future__ import annotations

from typing import Any, NamedTuple

ALIGN_BYTES = 16
"""The base address and the strides (but the last, 1) of every tensor argument the
kernels read or write in bulk: multiples of 16 bytes. TMA requires it of Q and the caches,
the vectorized stores of the outputs assume it (a row's start), and the compiled
functions are specialized for it (``compile``); the checks refuse other tensors."""


def alignment_fault(x, dims=None, dims_name: str = "all but the last dimension") -> str | None:
    """What in tensor ``x`` breaks ``ALIGN_BYTES``, worded to follow the tensor's name, or
    None where nothing does: the stride of a dimension in ``dims`` (by default all but the
    last; ``dims_name`` says which in the message), or the data pointer. The one rule that
    the argument checks raise on and that the merge tests before taking its kernel."""
    multiple = ALIGN_BYTES // x.element_size()
    strides = tuple(x.stride())
    if any(strides[dim] % multiple != 0 for dim in (range(x.dim() - 1) if dims is None else dims)):
        return (f"strides must be multiples of {multiple} elements ({ALIGN_BYTES} bytes) in {dims_name}, "
                f"got strides {strides}")
    if x.data_ptr() % ALIGN_BYTES != 0:
        return f"data pointer must be {ALIGN_BYTES}-byte aligned, got address {x.data_ptr():#x}"
    return None


class DecodeArgs(NamedTuple):
    """``kernels.decode_sm90.MlaDecodeSm90``'s arguments."""

    q: Any  # [b, 1, h_kv * rows, d]: each KV head's query rows in turn (runtime.query_rows)
    k: Any  # [num_blocks, 64, h_kv, d]: the paged cache
    block_table: Any  # [b, max_blocks] int32
    seqlens: Any  # [b] int32
    meta: Any  # [num_parts, 8] int32: the plan (scheduler)
    num_splits: Any  # [b + 1] int32
    o: Any  # [b, s_q, h_q, dv]
    lse: Any  # [b, h_q, s_q] float32
    accum: Any  # the split workspace (scheduler.split_workspace_elems float32)
    softmax_scale: Any  # float
    heads_per_kv: Any  # int


class SparseDecodeArgs(NamedTuple):
    """``kernels.sparse_decode_sm90.SparseDecodeSm90``'s arguments."""

    q: Any  # [b, s_q, h_q, d] bf16 (d = 576 for V3.2, 512 for MODEL1)
    k_cache: Any  # [num_blocks, page_size, 1, bytes per token] uint8: the cache's bytes (fp8_cache)
    indices: Any  # [b, s_q, topk] int32
    topk_length: Any  # [b] int32, or a one-element stand-in when has_topk_length is 0
    extra_k_cache: Any  # the extra cache as k_cache, or a stand-in when extra_topk is 0
    extra_indices: Any  # [b, s_q, extra_topk] int32, or a stand-in
    extra_topk_length: Any  # [b] int32, or a stand-in when has_extra_topk_length is 0
    sink: Any  # [h_q] float32, or a one-element stand-in when has_sink is 0
    o: Any  # [b, s_q, h_q, 512] bf16
    lse: Any  # [b, h_q, s_q] float32
    accum: Any  # the split sequences' partials (scheduler.accumulator_elems float32)
    num_splits: Any  # [b + 1] int32: sparse_plan.SparsePlan.fragment_offsets
    softmax_scale: Any  # float
    has_topk_length: Any  # int, 0 or 1
    has_sink: Any  # int, 0 or 1
    extra_topk: Any  # int, 0 without an extra cache
    has_extra_topk_length: Any  # int, 0 or 1
    whole_batches: Any  # int: sparse_plan.SparsePlan.whole_batches
    topk_splits: Any  # int: sparse_plan.SparsePlan.splits
    num_sms: Any  # int


class CombineArgs(NamedTuple):
    """``kernels.combine.MlaCombine``'s arguments when it is launched alone (tests): the
    decode kernel launches it itself."""

    accum: Any  # the split workspace, as the decode kernel wrote it
    meta: Any  # [num_parts, 8] int32: the plan
    num_splits: Any  # [b + 1] int32
    o: Any  # [b, s_q, h_q, dv]
    lse: Any  # [b, h_q, s_q] float32
    heads_per_kv: Any  # int


class MergeArgs(NamedTuple):
    """``kernels.merge_states.MlaMergeStates``'s arguments: two results over disjoint
    keys and the merged one (``merge.merge_attention_states``)."""

    out_a: Any  # [b, s_q, h_q, dv]
    lse_a: Any  # [b, h_q, s_q] float32
    out_b: Any  # [b, s_q, h_q, dv]
    lse_b: Any  # [b, h_q, s_q] float32
    out: Any  # [b, s_q, h_q, dv], written
    lse: Any  # [b, h_q, s_q] float32, written


class MetadataArgs(NamedTuple):
    """``kernels.metadata.MlaMetadata``'s arguments: the plan's inputs and outputs."""

    seqlens: Any  # [b] int32
    meta: Any  # [num_parts, 8] int32, written
    num_splits: Any  # [b + 1] int32, written
