"""The public functions, with FlashMLA's names, argument order and defaults.

On a Hopper GPU (compute capability 9.0) they launch the CuTe DSL kernels on torch's
current CUDA stream, without host synchronization (they can be captured in a CUDA
graph). On CPU tensors the same calls compute through the float32 PyTorch reference,
so code written against them runs anywhere. CUTLASS is imported only when a kernel
is first compiled, and not at all when the compiled kernels come from the disk cache.

Each call on CUDA tensors first tries ``runtime``'s fast path, which leaves most
argument checks to the compiled function; anything unusual (including every bad
argument) goes through ``checks.py`` and the checked path, so errors read the same
either way.
"""

from __future__ import annotations

import functools

import torch

from . import checks, runtime, scheduler

REQUIRED_CAPABILITY = (9, 0)
"""The kernels use Hopper-only instructions (TMA, WGMMA): sm_90."""


@functools.lru_cache(maxsize=None)
def _device_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def _require_hopper(device: torch.device) -> int:
    """The CUDA device index of ``device``; RuntimeError unless it is an sm_90 GPU."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _device_capability(index)
    if capability != REQUIRED_CAPABILITY:
        raise RuntimeError(
            f"flashmla_cute's kernels need a Hopper GPU (compute capability 9.0, sm_90); "
            f"cuda:{index} is {torch.cuda.get_device_name(index)} with compute capability "
            f"{capability[0]}.{capability[1]}. Pass CPU tensors to compute with the float32 reference."
        )
    return index


_parts_cache: dict[tuple[int, int, int], int] = {}


def num_sm_parts_for(device: torch.device, num_heads_per_head_k: int, num_heads_k: int) -> int:
    """How many SM parts ``get_mla_metadata`` plans for on ``device``."""
    if device.type != "cuda":
        return scheduler.num_sm_parts(scheduler.DEFAULT_NUM_SMS, num_heads_per_head_k, num_heads_k)
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, num_heads_per_head_k, num_heads_k)
    parts = _parts_cache.get(key)
    if parts is None:
        _require_hopper(device)
        parts = scheduler.num_sm_parts(runtime.num_sms(index), num_heads_per_head_k, num_heads_k)
        _parts_cache[key] = parts
    return parts


def get_mla_metadata(
    cache_seqlens: torch.Tensor,
    num_heads_per_head_k: int,
    num_heads_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan how the decode work is split across the GPU's SMs.

    Call it once per decoding step (the plan depends on the sequence lengths and the
    head configuration, not on the layer) and pass its results to every
    ``flash_mla_with_kvcache`` call of that step with the same ``cache_seqlens``.

    Args:
        cache_seqlens: int32 ``[b]``, tokens in the KV cache of each sequence (>= 0).
        num_heads_per_head_k: query rows that share one KV head,
            ``s_q * h_q // h_kv``.
        num_heads_k: number of KV heads ``h_kv`` (1 for DeepSeek's MLA).

    Returns:
        ``(tile_scheduler_metadata, num_splits)``, int32 tensors on ``cache_seqlens``'
        device: ``[num_sm_parts, 8]`` (the work range of each SM part) and ``[b + 1]``
        (the prefix sum of how many pieces each sequence is split into). The format is
        described in ``flashmla_cute.scheduler``.

    On CUDA the plan is computed by a small kernel, with no host synchronization; the
    number of parts follows the GPU's SM count. On CPU tensors it is computed with torch
    for an H100 SXM's ``scheduler.DEFAULT_NUM_SMS`` SMs (the CPU path of
    ``flash_mla_with_kvcache`` does not use the plan's contents).

    Under ``torch.compile`` this is the custom op ``torch.ops.flashmla_cute.get_mla_metadata``.
    """
    if torch.compiler.is_compiling():
        from . import ops

        return ops.get_mla_metadata_op(cache_seqlens, num_heads_per_head_k, num_heads_k)
    try:
        return runtime.fast_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)
    except Exception:
        pass  # first call of this configuration, CPU tensors, or a bad argument
    return _checked_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)


def _checked_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k):
    heads_per_k, heads_k = checks.check_metadata_args(cache_seqlens, num_heads_per_head_k, num_heads_k)
    num_parts = num_sm_parts_for(cache_seqlens.device, heads_per_k, heads_k)
    if cache_seqlens.device.type == "cuda":
        # The ints as the caller passed them: the fast path keys on them, types included.
        return runtime.gpu_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k, num_parts)
    return scheduler.plan_torch(cache_seqlens, num_parts)


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head latent attention decoding over a paged KV cache.

    Args:
        q: ``[b, s_q, h_q, d]``, bfloat16 or float16: the queries of ``s_q`` new tokens
            (1, or 2 with multi-token prediction) of each of ``b`` sequences.
        k_cache: ``[num_blocks, 64, h_kv, d]``, q's dtype: the paged cache, pages of 64
            tokens. Keys are whole rows; values are the first ``head_dim_v`` columns of
            the same rows (K and V share one buffer).
        block_table: int32 ``[b, max_blocks]``: token ``t`` of sequence ``i`` is in page
            ``block_table[i, t // 64]``, slot ``t % 64``. Only the first
            ``ceil(cache_seqlens[i] / 64)`` entries of a row are read.
        cache_seqlens: int32 ``[b]``: tokens in the cache of each sequence (they include
            the ``s_q`` new tokens). Cache slots at or past a sequence's length are never
            read. The values are not checked on the host (that would need a
            synchronization): on the GPU a length over ``64 * max_blocks`` makes that
            sequence's output NaN (nothing is read past the table), and page indices
            outside ``[0, num_blocks)`` read as zeros.
        head_dim_v: width of the values and of the output (512 for DeepSeek's MLA).
        tile_scheduler_metadata, num_splits: the plan from ``get_mla_metadata``, which
            must have been called on the same ``cache_seqlens`` (same values) with
            ``num_heads_per_head_k = s_q * h_q // h_kv`` and ``num_heads_k = h_kv``.
        softmax_scale: scale of the scores ``q . k``; default ``d ** -0.5``.
        causal: with ``s_q > 1``, query token ``j`` (0-based) sees only the first
            ``cache_seqlens[i] - (s_q - 1 - j)`` tokens; no effect when ``s_q == 1``.

    Query head ``h`` attends to KV head ``h // (h_q // h_kv)``.

    Returns:
        ``(out, softmax_lse)``: ``out [b, s_q, h_q, head_dim_v]`` in q's dtype and
        ``softmax_lse [b, h_q, s_q]`` float32, the natural log of the sum of the
        exponentiated scaled scores. A query row that sees no key (an empty sequence,
        or with ``causal`` a sequence shorter than ``s_q``) gets ``out = 0`` and
        ``softmax_lse = +inf``.

    On the GPU, split sequences need an fp32 workspace (partial results, about
    ``(b + num_sm_parts) * s_q * h_q * 2 KB``). The first call with a given
    ``tile_scheduler_metadata`` allocates it and keeps it on that tensor for the
    following calls with it on the same CUDA stream (the layers of one decoding step);
    it is freed with the metadata. A call on another stream allocates its own.

    Raises TypeError or ValueError for bad arguments (checked without reading tensor
    contents) and RuntimeError for CUDA tensors on a GPU that is not sm_90. On a
    Hopper GPU the kernels need ``(d, head_dim_v) = (576, 512)``; on the CPU the float32
    reference computes the result, for any head dimensions.

    Under ``torch.compile`` this is the custom op
    ``torch.ops.flashmla_cute.flash_mla_with_kvcache``.
    """
    if torch.compiler.is_compiling():
        from . import ops

        return ops.flash_mla_with_kvcache_op(
            q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
            softmax_scale, causal,
        )
    try:
        return runtime.fast_decode(
            q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
            softmax_scale, causal,
        )
    except Exception:
        pass  # first call of this configuration, CPU tensors, or a bad argument
    return _checked_decode(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal
    )


def _checked_decode(
    q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal
):
    problem = checks.check_decode_args(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        softmax_scale, causal,
    )
    if q.device.type == "cuda":
        _require_hopper(q.device)
        return runtime.gpu_decode(problem, q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                                  head_dim_v, causal)
    if q.device.type != "cpu":
        raise RuntimeError(f"q must be a CUDA (sm_90) or CPU tensor, got device {q.device}")

    from .reference import flash_mla_reference

    return flash_mla_reference(
        q, k_cache, block_table, cache_seqlens, problem.dv, softmax_scale=problem.softmax_scale, causal=problem.causal,
    )
