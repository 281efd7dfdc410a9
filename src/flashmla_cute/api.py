"""FlashMLA's current API: code written for it changes only its import, to
``from flashmla_cute.api import get_mla_metadata, flash_mla_with_kvcache, FlashMLASchedMeta``.

Differences from the Feb-2025 API at the package's top level (which stays as it was):

- ``get_mla_metadata(*args, **kwargs)`` ignores its arguments and returns
  ``(FlashMLASchedMeta(), None)``: an empty plan, made by the first
  ``flash_mla_with_kvcache`` call that uses it and reused by later calls, which must have
  the same configuration (shapes and options; a call with another is refused, naming
  what changed). Reuse one plan only while ``cache_seqlens`` and ``topk_length`` also keep
  their values, e.g. across the layers of one decoding step: values are not checked
  (that would need a host synchronization).
- ``flash_mla_with_kvcache`` takes the plan object and ``num_splits=None``,
  ``softmax_scale`` defaults to ``q.shape[-1] ** -0.5``, and with ``indices`` it does
  sparse (top-k) decoding over DeepSeek-V3.2's FP8 KV cache (``fp8_cache``).

Dense calls run the package's dense kernel (``flashmla_cute.flash_mla_with_kvcache``)
with a plan from ``flashmla_cute.get_mla_metadata``. Sparse calls run the sparse kernel
on a Hopper GPU and the float32 reference (``sparse_reference``) on CPU tensors, after
the same checks (``sparse_checks``).
"""

from __future__ import annotations

import dataclasses

import torch

from . import checks, interface, runtime, sparse_checks
from .launch_args import ALIGN_BYTES
from .lse_layout import in_layout
from .no_backward import without_backward
from .sparse_reference import sparse_mla_reference

__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache"]


@dataclasses.dataclass
class FlashMLASchedMeta:
    """The work plan of one configuration, filled in by the first ``flash_mla_with_kvcache``
    call that is given it (FlashMLA's class of the same name and fields)."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: int | None
        extra_page_block_size: int | None
        extra_topk: int | None

    have_initialized: bool = False
    config: Config | None = None
    tile_scheduler_metadata: torch.Tensor | None = None  # dense: int32 [num_sm_parts, 8]
    num_splits: torch.Tensor | None = None  # dense: int32 [b + 1]


def get_mla_metadata(*args, **kwargs) -> tuple[FlashMLASchedMeta, None]:
    """An empty plan (the arguments, which FlashMLA's older API needed, are ignored).
    Returns ``(FlashMLASchedMeta(), None)``; only the first element is used."""
    return FlashMLASchedMeta(), None


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: FlashMLASchedMeta,
    num_splits: None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decoding, dense or sparse, with FlashMLA's current arguments.

    Dense (``indices`` None): as ``flashmla_cute.flash_mla_with_kvcache``: ``q [b, s_q,
    h_q, 576]`` bf16/fp16, ``k_cache [num_blocks, 64, h_kv, 576]``, ``block_table`` and
    ``cache_seqlens`` int32, ``head_dim_v`` 512, ``causal`` allowed.

    Sparse (``indices`` given), over an FP8 cache (float8_e4m3fn, int8 or uint8; any
    page size) in one of two layouts (``fp8_cache``), told apart by its last dimension:
    V3.2's ``k_cache [num_blocks, page_block_size, 1, 656]`` (tokens back to back within
    a page) with ``q [b, s_q, h_q, 576]``, or MODEL1's ``[num_blocks, page_block_size, 1,
    584]`` (the page view ``fp8_cache.quantize_model1_kv_cache`` returns) with ``q [b,
    s_q, h_q, 512]``; ``q`` bf16 with ``s_q`` 1 to 4 and ``h_q`` 1 to 128 (one latent KV
    head); ``is_fp8_kvcache=True``; ``causal=False``; ``indices`` int32 ``[b, s_q, topk]``
    with ``topk`` a multiple of 64 up to 16384, each entry ``page * page_block_size +
    slot`` (``-1``, any negative value or one past the cache: no token); optional
    ``topk_length`` int32 ``[b]`` (only the first ``topk_length[i]`` entries of batch
    ``i`` count) and ``attn_sink`` float32 ``[h_q]`` (out is scaled by ``exp(lse) /
    (exp(lse) + exp(attn_sink))``, lse is not). With ``extra_k_cache`` (the same layout,
    its own page size) and ``extra_indices_in_kvcache`` (int32 ``[b, s_q, extra_topk]``,
    into it; optional ``extra_topk_length`` ``[b]``), each query token attends to the
    tokens of both lists at once (one softmax). ``block_table`` and ``cache_seqlens``
    are not used and may be None.

    Returns ``(out, lse)``: ``out [b, s_q, h_q, 512]`` (bf16 for sparse calls, q's dtype
    for dense ones) and ``lse [b, h_q, s_q]`` float32, natural log; a row that sees no
    token gets ``out = 0`` and ``lse = +inf``.
    """
    plan = tile_scheduler_metadata
    if not isinstance(plan, FlashMLASchedMeta):
        raise TypeError(
            f"tile_scheduler_metadata must be the FlashMLASchedMeta from flashmla_cute.api.get_mla_metadata(), "
            f"got {checks.type_name(plan)}"
        )
    if num_splits is not None:
        raise ValueError("num_splits must be None (the plan lives in tile_scheduler_metadata)")
    if indices is None:  # the dense call's default scale is the same, q.shape[-1] ** -0.5
        return _dense(q, k_cache, block_table, cache_seqlens, head_dim_v, plan, softmax_scale, causal, is_fp8_kvcache,
                      attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length)
    if softmax_scale is None and isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[-1] > 0:
        softmax_scale = q.shape[-1] ** -0.5  # else the checks name what is wrong with q
    # Sparse calls have no custom op: under torch.compile they run eagerly, a graph break
    # (with fullgraph=True, torch's error names the disabled function).
    sparse = _untraced_sparse() if torch.compiler.is_compiling() else _sparse
    result = sparse(q, k_cache, head_dim_v, plan, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
                    extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length)
    return without_backward("flash_mla_with_kvcache", result, q, k_cache, attn_sink, extra_k_cache)


def _sparse(q, k_cache, head_dim_v, plan, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
            extra_indices_in_kvcache, topk_length, extra_topk_length):
    extras = (extra_k_cache, extra_indices_in_kvcache, extra_topk_length)
    key = _sparse_key(q, k_cache, indices, topk_length, attn_sink, *extras, head_dim_v, causal, is_fp8_kvcache)
    try:  # the fast path: a configuration seen before, on the GPU
        launch, config = _known_sparse[key]
        if plan.have_initialized and plan.config != config:
            raise ValueError  # the checks decide
        if not checks.is_valid_scale(softmax_scale):
            raise TypeError
        if any(x is not None and x.data_ptr() % ALIGN_BYTES for x in (q, k_cache, extra_k_cache)):
            raise ValueError
        from .sparse_runtime import launch_sparse

        result = launch_sparse(launch, plan, q, k_cache, indices, topk_length, attn_sink, *extras,
                               softmax_scale)
        _record_plan(plan, config)
        return result
    except Exception:
        pass  # first call of this configuration, CPU tensors, or a bad argument
    problem = sparse_checks.check_sparse_decode_args(
        q, k_cache, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
        extra_indices_in_kvcache, topk_length, extra_topk_length,
    )
    has_extra = problem.extra_topk > 0
    config = FlashMLASchedMeta.Config(
        b=problem.b, s_q=problem.s_q, h_q=problem.h_q, page_block_size=problem.page_size, h_k=1, causal=False,
        is_fp8_kvcache=True, topk=problem.topk, extra_page_block_size=problem.extra_page_size if has_extra else None,
        extra_topk=problem.extra_topk if has_extra else None,
    )
    _check_plan(plan, config)
    checks.check_host_device("q", q)
    if q.is_cuda:
        runtime.require_hopper(q.device)
        from .sparse_runtime import launch_sparse, sparse_launch

        launch = sparse_launch(problem, q.device)
        result = launch_sparse(launch, plan, q, k_cache, indices, topk_length, attn_sink, *extras,
                               problem.softmax_scale)
        runtime.remember(_known_sparse, key, (launch, config))
    else:
        with torch.no_grad():  # as the kernel's outputs: no_backward
            out, lse = sparse_mla_reference(q, k_cache, indices, topk_length, attn_sink, problem.softmax_scale,
                                            extra_k_cache=extra_k_cache, extra_indices=extra_indices_in_kvcache,
                                            extra_topk_length=extra_topk_length)
        result = out, in_layout(lse, by_query_token=True)
    _record_plan(plan, config)
    return result


_sparse_untraced = None


def _untraced_sparse():
    # Made when first traced, not at import: torch.compiler.disable imports torch._dynamo,
    # which would double the package's import time for every eager user.
    global _sparse_untraced
    if _sparse_untraced is None:
        _sparse_untraced = torch.compiler.disable(_sparse)
    return _sparse_untraced


_known_sparse: dict[tuple, tuple] = {}
"""(launch, plan configuration) of each sparse configuration a checked call has seen on
the GPU, by ``_sparse_key``."""


def _sparse_key(*args) -> tuple:
    """What the sparse checks look at, of each argument: a tensor's shape, strides, dtype
    and device; any other value with its type (``True`` and ``1`` differ)."""
    return tuple(
        (x.shape, x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor) else (x, type(x)) for x in args
    )


def _dense(q, k_cache, block_table, cache_seqlens, head_dim_v, plan, softmax_scale, causal, is_fp8_kvcache,
           attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length):
    for name, x in (("attn_sink", attn_sink), ("extra_k_cache", extra_k_cache),
                    ("extra_indices_in_kvcache", extra_indices_in_kvcache), ("topk_length", topk_length),
                    ("extra_topk_length", extra_topk_length)):
        if x is not None:
            raise ValueError(f"{name} must be None without indices (it is an argument of sparse decoding)")
    checks.check_bool("is_fp8_kvcache", is_fp8_kvcache)
    if is_fp8_kvcache:
        raise ValueError(
            "is_fp8_kvcache must be False without indices: FP8 caches are supported for sparse decoding only"
        )
    for name, x in (("q", q), ("k_cache", k_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor for dense decoding (indices None), "
                            f"got {checks.type_name(x)}")
        checks.check_strided(name, x)
    # What the plan is made from, checked before it is made (the rest: flash_mla_with_kvcache).
    b, s_q, h_q, _, _, h_kv = checks.check_query_and_cache(q, k_cache)
    config = FlashMLASchedMeta.Config(
        b=b, s_q=s_q, h_q=h_q, page_block_size=k_cache.shape[1], h_k=h_kv, causal=causal, is_fp8_kvcache=False,
        topk=None, extra_page_block_size=None, extra_topk=None,
    )
    _check_plan(plan, config)
    if plan.have_initialized:
        metadata, splits = plan.tile_scheduler_metadata, plan.num_splits
    else:
        metadata, splits = interface.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out = interface.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, splits, softmax_scale, causal
    )
    plan.tile_scheduler_metadata, plan.num_splits = metadata, splits
    _record_plan(plan, config)
    return out


def _check_plan(plan: FlashMLASchedMeta, config: FlashMLASchedMeta.Config) -> None:
    """ValueError naming every field in which ``config`` differs from the plan's."""
    if not plan.have_initialized:
        return
    if not isinstance(plan.config, FlashMLASchedMeta.Config):
        raise ValueError(
            f"tile_scheduler_metadata is marked initialized but holds no configuration (config "
            f"{checks.type_name(plan.config)}): use the FlashMLASchedMeta from get_mla_metadata(), "
            f"filled by its first call"
        )
    changed = [
        f"{field.name} {getattr(plan.config, field.name)!r} -> {getattr(config, field.name)!r}"
        for field in dataclasses.fields(config)
        if getattr(plan.config, field.name) != getattr(config, field.name)
    ]
    if changed:
        raise ValueError(
            "tile_scheduler_metadata was planned for another configuration (planned -> this call): "
            + ", ".join(changed)
            + ". Use one get_mla_metadata() per configuration and decoding step."
        )


def _record_plan(plan: FlashMLASchedMeta, config: FlashMLASchedMeta.Config) -> None:
    # Only a call that succeeded fixes the plan's configuration.
    plan.config = config
    plan.have_initialized = True
