"""The public functions, with FlashMLA's names, argument order and defaults.

On a Hopper GPU (compute capability 9.0) they launch the CuTe DSL kernels on torch's
current CUDA stream, without host synchronization (they can be captured in a CUDA
graph). On CPU tensors the same calls compute through the float32 PyTorch reference,
so code written against them runs anywhere. CUTLASS is imported only when a kernel
is first compiled, and not at all when the compiled kernels come from the disk cache.

Calls flow one way: this module -> ``checks.py`` (or the fast path) -> ``runtime.py``
(launches). The *checked* path validates every argument with ``checks.py`` (the same
checks for CPU and CUDA tensors) and, on CUDA, remembers the call's configuration in a
table here. The *fast* path serves configurations in that table: the key of a call is
everything its validity and its launch depend on besides what the compiled function
checks itself (see ``runtime``): the shapes and strides of q and k_cache, the shapes of
the plan, every tensor's dtype, the device, head_dim_v and causal, with their Python
types (and, where q reaches the kernel as a copy of its rows, q's alignment, checked on
the fast path). Anything it does not serve, and any argument the compiled function
refuses, goes through the checked path, whose checks say what is wrong in our own
words; so the fast path never changes what a call computes or which calls fail, only
what a valid call costs on the host.

While ``torch.compile`` traces, the functions dispatch to the custom ops of ``ops.py``
(looked up on ``torch.ops``, so this module does not import that one).
"""

from __future__ import annotations

import torch

from . import checks, runtime, scheduler
from .launch_args import ALIGN_BYTES
from .lse_layout import dense_by_query_token, in_layout
from .no_backward import without_backward

_parts_cache: dict[tuple[int, int, int], int] = {}


def num_sm_parts_for(device: torch.device, num_heads_per_head_k: int, num_heads_k: int) -> int:
    """How many SM parts ``get_mla_metadata`` plans for on ``device``."""
    if device.type != "cuda":
        return scheduler.num_sm_parts(scheduler.DEFAULT_NUM_SMS, num_heads_per_head_k, num_heads_k)
    index = runtime.index_of(device)
    key = (index, num_heads_per_head_k, num_heads_k)
    parts = _parts_cache.get(key)
    if parts is None:
        runtime.require_hopper(device)
        parts = scheduler.num_sm_parts(runtime.num_sms(index), num_heads_per_head_k, num_heads_k)
        _parts_cache[key] = parts
    return parts


# (cache_seqlens' device index and dtype, num_heads_per_head_k and its type, num_heads_k
# and its type) -> parts
_known_plans: dict[tuple, int] = {}


def _plan_key(cache_seqlens, num_heads_per_head_k, num_heads_k) -> tuple:
    # With the types: 16.0 and True hash like 16 and 1, and the checks refuse them. With
    # the dtype: the compiled function takes uint32 for int32, the checks do not.
    return (cache_seqlens.get_device(), cache_seqlens.dtype, num_heads_per_head_k, type(num_heads_per_head_k),
            num_heads_k, type(num_heads_k))


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
            On CPU tensors a negative length raises ValueError; on CUDA the values are
            not read (that would need a host synchronization): a negative length is
            planned as an empty sequence, and any int32 length gets a plan.
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
        checks.check_metadata_scalars(num_heads_per_head_k, num_heads_k)
        return torch.ops.flashmla_cute.get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)
    try:  # the fast path
        num_parts = _known_plans[_plan_key(cache_seqlens, num_heads_per_head_k, num_heads_k)]
        if cache_seqlens.shape[0] >= 1:
            return runtime.plan_on_gpu(cache_seqlens, num_parts)
    except Exception:
        pass  # first call of this configuration, CPU tensors, or a bad argument
    return _checked_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)


def _checked_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k):
    heads_per_k, heads_k = checks.check_metadata_args(cache_seqlens, num_heads_per_head_k, num_heads_k)
    checks.check_host_device("cache_seqlens", cache_seqlens)
    num_parts = num_sm_parts_for(cache_seqlens.device, heads_per_k, heads_k)
    if cache_seqlens.device.type == "cuda":
        result = runtime.plan_on_gpu(cache_seqlens, num_parts)
        # The ints as the caller passed them: the fast path keys on them, types included.
        key = _plan_key(cache_seqlens, num_heads_per_head_k, num_heads_k)
        runtime.remember(_known_plans, key, num_parts)
        return result
    checks.check_lengths_on_host(cache_seqlens)
    return scheduler.plan_torch(cache_seqlens, num_parts)


_known_decodes: dict[tuple, runtime.DecodeLaunch] = {}


def _decode_key(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, head_dim_v,
                causal) -> tuple:
    # Beside the shapes: q's and k_cache's strides, which the checks hold to 16 bytes in
    # every dimension while the compiled function skips those of size 1 (and with s_q > 1
    # sees q's rows, a copy where the KV heads are several); the integer tensors' dtypes,
    # for the compiled function takes uint32 for int32.
    return (q.shape, q.stride(), q.dtype, q.get_device(), k_cache.shape, k_cache.stride(), block_table.dtype,
            cache_seqlens.dtype, tile_scheduler_metadata.dtype, tile_scheduler_metadata.shape[0], num_splits.dtype,
            num_splits.shape[0], head_dim_v, type(head_dim_v), causal, type(causal))


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
        q: ``[b, s_q, h_q, d]``, bfloat16 or float16, ``d = 576``: the queries of ``s_q``
            new tokens (1, or up to ``checks.MAX_S_Q = 4`` with multi-token prediction)
            of each of ``b`` sequences.
        k_cache: ``[num_blocks, 64, h_kv, d]``, q's dtype: the paged cache, pages of 64
            tokens. Keys are whole rows; values are the first ``head_dim_v`` columns of
            the same rows (K and V share one buffer).
        block_table: int32 ``[b, max_blocks]``: token ``t`` of sequence ``i`` is in page
            ``block_table[i, t // 64]``, slot ``t % 64``. Only the first
            ``ceil(cache_seqlens[i] / 64)`` entries of a row are read.
        cache_seqlens: int32 ``[b]``: tokens in the cache of each sequence (they include
            the ``s_q`` new tokens). Cache slots at or past a sequence's length are never
            read. On the GPU the values are not checked (that would need a host
            synchronization): a length over ``64 * max_blocks`` (up to 2**31 - 1) makes
            that sequence's output and lse NaN (nothing is read past the table), a
            negative length reads nothing (out 0, lse +inf, as an empty sequence), and
            page indices outside ``[0, num_blocks)`` read as zeros. On CPU tensors the
            reference reads them and raises ValueError for a length or a used page index
            that does not fit.
        head_dim_v: width of the values and of the output: 512.
        tile_scheduler_metadata, num_splits: the plan from ``get_mla_metadata``, which
            must have been called on the same ``cache_seqlens`` (same values) with
            ``num_heads_per_head_k = s_q * h_q // h_kv`` and ``num_heads_k = h_kv``.
            A plan for another batch size (``num_splits`` not of length ``b + 1``) is
            refused; a plan made for other lengths of the same batch size cannot be told
            apart without a host synchronization and is the caller's contract, as in
            FlashMLA (the GPU result is then wrong; the CPU reference does not use the
            plan's contents).
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

    On the GPU, split sequences need a workspace (partial results in the output's 16-bit
    dtype and their fp32 log-sum-exps, about ``(b + num_sm_parts) * s_q * h_q * 1 KB``;
    ``scheduler.split_workspace_elems``). The first call with a given
    ``tile_scheduler_metadata`` allocates it and keeps it on that tensor for the
    following calls with it on the same CUDA stream (the layers of one decoding step);
    it is freed with the metadata. A call on another stream allocates its own.

    Raises TypeError or ValueError for bad arguments (checked without reading tensor
    contents, the same checks and messages for CPU and CUDA tensors: whatever the GPU
    refuses, the CPU refuses too) and RuntimeError for CUDA tensors on a GPU that is not
    sm_90. On CPU tensors the float32 reference computes the result.

    Under ``torch.compile`` this is the custom op
    ``torch.ops.flashmla_cute.flash_mla_with_kvcache``.
    """
    if torch.compiler.is_compiling():
        checks.check_decode_scalars(head_dim_v, softmax_scale, causal)
        return torch.ops.flashmla_cute.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
            softmax_scale, causal,
        )
    try:  # the fast path
        launch = _known_decodes[_decode_key(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                                            num_splits, head_dim_v, causal)]
        if launch.gather_rows and q.data_ptr() % ALIGN_BYTES:
            raise ValueError  # the checks decide: the kernel sees q's rows, a copy where the KV heads are several
        if block_table.shape[1] > checks.MAX_TABLE_BLOCKS:
            raise ValueError  # the checks decide: the key leaves out the table's width, which grows with the lengths
        if softmax_scale is None:
            scale = launch.default_scale
        elif checks.is_valid_scale(softmax_scale):
            scale = softmax_scale
        else:
            raise TypeError  # the checks decide
        result = runtime.launch_decode(launch, q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                                       num_splits, scale)
    except Exception:  # first call of this configuration, CPU tensors, or a bad argument
        result = None
    if result is None:
        result = _checked_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                 num_splits, softmax_scale, causal)
    if q.requires_grad or k_cache.requires_grad:
        return without_backward("flash_mla_with_kvcache", result, q, k_cache)
    return result


def _checked_decode(
    q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal
):
    problem = checks.check_decode_args(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        softmax_scale, causal,
    )
    if q.device.type == "cuda":
        launch = runtime.decode_launch(problem, q.dtype, runtime.require_hopper(q.device))
        result = runtime.launch_decode(launch, q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                                       num_splits, problem.softmax_scale)
        # head_dim_v and causal as the caller passed them: the fast path keys on them, types included.
        key = _decode_key(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, head_dim_v,
                          causal)
        runtime.remember(_known_decodes, key, launch)
        return result
    checks.check_host_device("q", q)

    from .reference import flash_mla_reference

    checks.check_lengths_on_host(cache_seqlens)
    with torch.no_grad():  # as the kernel's outputs: no_backward
        out, lse = flash_mla_reference(q, k_cache, block_table, cache_seqlens, problem.dv,
                                       softmax_scale=problem.softmax_scale, causal=problem.causal)
    return out, in_layout(lse, dense_by_query_token(problem.h_kv))
