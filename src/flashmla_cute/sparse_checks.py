"""Argument checks for sparse (top-k) decoding over an FP8 KV cache (the V3.2 or the
MODEL1 layout, ``fp8_cache``), with or without an extra cache.

As in ``checks.py``: a bad argument raises ``TypeError`` (Python type or dtype) or
``ValueError`` (value, shape, layout, device) naming the argument and what was
expected; only tensor metadata is read (no host synchronization), and CPU and GPU calls
are refused alike, the kernel's alignment needs included (``check_sparse_kernel_layout``).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from . import fp8_cache
from .launch_args import alignment_fault
from .checks import (
    _check_contiguous,
    _check_device,
    _check_dtype,
    _check_last_dim_contiguous,
    _check_rank,
    _check_tensor,
    check_bool,
    checked_softmax_scale,
    type_name,
)

HEAD_DIM_V = fp8_cache.VALUE_DIM
"""Values are 512 wide in both layouts."""

TOPK_MULTIPLE = 64
"""topk must be a multiple of this (the kernel takes indices 64 at a time)."""

MAX_TOPK = 16384
MAX_S_Q = 4
"""Query tokens per sequence (1, or more with multi-token prediction)."""

HEAD_TILE = 64
"""Query heads per CTA of the sparse kernel (its WGMMA M); fewer heads are padded."""

MAX_HEADS = 2 * HEAD_TILE
"""Query heads sharing the one latent KV head: up to 128."""

MAX_STRIDE = 2**32 - 1
"""The largest cache page stride (in bytes) and index-tensor stride of the batch and
query-token dimensions (in elements): the kernel finds a page's and an index row's start
with 32 x 32 -> 64-bit multiplies. (A dimension of size 1 may have any stride.)"""

MAX_PAGE_BYTES = 2**31 - 1
"""The largest cache page, ``page_size`` x the layout's bytes a token (a MODEL1 page's
padding not counted): the kernel adds a token's offsets in its page to the page's start
as 32-bit integers (``SparseDecodeSm90.token_bytes``), its row's (slot x row bytes) and
its scales' (V3.2: in the row; MODEL1: after the page's rows, page_size x 576, then slot
x 8). All of them lie inside the page: in a page of at most 2**31 - 1 bytes each of them,
and any sum of them, fits in an int32; past that they can wrap."""

MAX_CACHE_TOKENS = 2**31 - 1
"""The most tokens a cache may hold (``num_blocks * page_size``): the indices that name
them are int32, and the kernel tests an index against the cache's token count in 32-bit
integers (a larger count would wrap, and valid tokens would read as invalid)."""


class SparseDecodeProblem(NamedTuple):
    """The sizes and options of one validated sparse ``flash_mla_with_kvcache`` call."""

    b: int
    s_q: int
    h_q: int
    topk: int
    num_blocks: int
    page_size: int
    head_tiles: int  # ceil(h_q / HEAD_TILE)
    softmax_scale: float
    layout: fp8_cache.Fp8Layout
    extra_topk: int = 0  # 0: no extra cache
    extra_num_blocks: int = 0
    extra_page_size: int = 0


def check_sparse_decode_args(
    q,
    k_cache,
    head_dim_v,
    softmax_scale,
    causal,
    is_fp8_kvcache,
    indices,
    attn_sink=None,
    extra_k_cache=None,
    extra_indices_in_kvcache=None,
    topk_length=None,
    extra_topk_length=None,
) -> SparseDecodeProblem:
    """Validate a sparse call (``indices`` given) and return its sizes. ``block_table``
    and ``cache_seqlens`` play no part in sparse decoding and are not looked at."""
    for name, x in (("q", q), ("k_cache", k_cache), ("indices", indices)):
        _check_tensor(name, x)
    has_extra = extra_k_cache is not None
    if (extra_indices_in_kvcache is not None) != has_extra:
        raise ValueError("extra_k_cache and extra_indices_in_kvcache must be given together (or both None)")
    if extra_topk_length is not None and not has_extra:
        raise ValueError("extra_topk_length needs extra_k_cache and extra_indices_in_kvcache")
    check_bool("is_fp8_kvcache", is_fp8_kvcache)
    if not is_fp8_kvcache:
        raise ValueError("is_fp8_kvcache must be True with indices: sparse decoding reads an FP8 KV cache")
    check_bool("causal", causal)
    if causal:
        raise ValueError("causal must be False with indices: the indices say which tokens each query sees")

    layout = fp8_cache.layout_of(k_cache)
    # q
    _check_dtype("q", q, (torch.bfloat16,))
    _check_rank("q", q, 4, f"[b, s_q, h_q, {layout.head_dim}]")
    b, s_q, h_q, d = q.shape
    if b < 1:
        raise ValueError(f"q.shape[0] (batch size b) must be >= 1, got {b}")
    if not 1 <= s_q <= MAX_S_Q:
        raise ValueError(f"q.shape[1] (s_q) must be in [1, {MAX_S_Q}], got {s_q}")
    if not 1 <= h_q <= MAX_HEADS:
        raise ValueError(f"q.shape[2] (h_q) must be in [1, {MAX_HEADS}] (heads per KV head), got {h_q}")
    if d != layout.head_dim:
        raise ValueError(
            f"q.shape[3] (d_qk) must be {layout.head_dim} for k_cache's {layout.name} layout "
            f"({layout.bytes_per_token} bytes a token), got {d}"
        )
    _check_last_dim_contiguous("q", q)

    num_blocks, page_size = _check_cache("k_cache", k_cache, layout)

    dv = head_dim_v
    if isinstance(dv, bool) or not isinstance(dv, numbers.Integral):
        raise TypeError(f"head_dim_v must be an int, got {type_name(dv)}")
    if dv != HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {HEAD_DIM_V} for sparse decoding, got {dv}")

    topk = _check_indices("indices", indices, b, s_q)
    if topk_length is not None:
        _check_vector("topk_length", topk_length, torch.int32, "b", b)
    if attn_sink is not None:
        _check_vector("attn_sink", attn_sink, torch.float32, "h_q", h_q)

    extra_topk, extra_num_blocks, extra_page_size = 0, 0, 0
    if has_extra:
        _check_tensor("extra_k_cache", extra_k_cache)
        if fp8_cache.layout_of(extra_k_cache, "extra_k_cache") is not layout:
            raise ValueError(
                f"extra_k_cache must have k_cache's {layout.name} layout ({layout.bytes_per_token} bytes a token), "
                f"got shape {tuple(extra_k_cache.shape)}"
            )
        extra_num_blocks, extra_page_size = _check_cache("extra_k_cache", extra_k_cache, layout)
        _check_tensor("extra_indices_in_kvcache", extra_indices_in_kvcache)
        extra_topk = _check_indices("extra_indices_in_kvcache", extra_indices_in_kvcache, b, s_q)
        if extra_topk_length is not None:
            _check_vector("extra_topk_length", extra_topk_length, torch.int32, "b", b)

    scale = checked_softmax_scale(softmax_scale, d)

    for name, x in (("k_cache", k_cache), ("indices", indices), ("topk_length", topk_length),
                    ("attn_sink", attn_sink), ("extra_k_cache", extra_k_cache),
                    ("extra_indices_in_kvcache", extra_indices_in_kvcache), ("extra_topk_length", extra_topk_length)):
        if x is not None:
            _check_device(name, x, q)
    check_sparse_kernel_layout(q, k_cache, extra_k_cache)

    return SparseDecodeProblem(
        b=b, s_q=s_q, h_q=h_q, topk=topk, num_blocks=num_blocks, page_size=page_size,
        head_tiles=-(-h_q // HEAD_TILE), softmax_scale=scale, layout=layout, extra_topk=extra_topk,
        extra_num_blocks=extra_num_blocks, extra_page_size=extra_page_size,
    )


def _check_cache(name: str, cache, layout: fp8_cache.Fp8Layout) -> tuple[int, int]:
    """dtype, shape and strides of a cache of ``layout`` (V3.2: each page's tokens back to
    back; MODEL1: its page view, ``fp8_cache.model1_cache_bytes``), its page size
    (``MAX_PAGE_BYTES``) and its token count (``MAX_CACHE_TOKENS``); returns
    ``(num_blocks, page_size)``."""
    fp8_cache.cache_bytes(cache, layout, name)
    num_blocks, page_size = cache.shape[:2]
    if page_size < 1:
        raise ValueError(f"{name}.shape[1] (page block size) must be >= 1, got {page_size}")
    tokens_apart = page_size > 1 and cache.stride(1) != layout.bytes_per_token
    if layout is fp8_cache.V32 and (cache.stride(3) != 1 or tokens_apart):
        raise ValueError(
            f"{name} must hold each page's tokens back to back: strides (any, {layout.bytes_per_token}, any, 1), "
            f"got {tuple(cache.stride())}"
        )
    max_page_size = MAX_PAGE_BYTES // layout.bytes_per_token
    if page_size > max_page_size:
        raise ValueError(
            f"{name}.shape[1] (page block size) must be at most {max_page_size} for the {layout.name} layout "
            f"(pages of at most {MAX_PAGE_BYTES} bytes, 2**31 - 1, at {layout.bytes_per_token} bytes a token: "
            f"the kernel's offsets in a page are 32-bit), got shape {tuple(cache.shape)}; "
            f"use smaller pages (more of them)"
        )
    if num_blocks * page_size > MAX_CACHE_TOKENS:
        raise ValueError(
            f"{name} must hold at most {MAX_CACHE_TOKENS} tokens (2**31 - 1: int32 indices name them), got "
            f"{num_blocks} pages of {page_size} = {num_blocks * page_size} (shape {tuple(cache.shape)}); "
            f"use fewer pages"
        )
    if num_blocks > 1 and cache.stride(0) > MAX_STRIDE:
        raise ValueError(f"{name}.stride(0) (page stride) must be at most {MAX_STRIDE} bytes (2**32 - 1), "
                         f"got {cache.stride(0)}")
    return num_blocks, page_size


def _check_indices(name: str, indices, b: int, s_q: int) -> int:
    """``indices`` is int32 ``[b, s_q, topk]`` with topk a multiple of 64 up to
    ``MAX_TOPK``; returns topk."""
    _check_dtype(name, indices, (torch.int32,))
    _check_rank(name, indices, 3, "[b, s_q, topk]")
    if tuple(indices.shape[:2]) != (b, s_q):
        raise ValueError(f"{name} must have shape [b, s_q, topk] = [{b}, {s_q}, topk], got {tuple(indices.shape)}")
    topk = indices.shape[2]
    if topk < TOPK_MULTIPLE or topk % TOPK_MULTIPLE != 0 or topk > MAX_TOPK:
        raise ValueError(
            f"{name}.shape[2] (topk) must be a multiple of {TOPK_MULTIPLE} in [{TOPK_MULTIPLE}, {MAX_TOPK}], got {topk}"
        )
    _check_last_dim_contiguous(name, indices)
    for dim in (0, 1):
        if indices.shape[dim] > 1 and indices.stride(dim) > MAX_STRIDE:
            raise ValueError(f"{name}.stride({dim}) must be at most {MAX_STRIDE} elements (2**32 - 1), "
                             f"got {indices.stride(dim)}")
    return topk


def _check_vector(name: str, x, dtype: torch.dtype, extent_name: str, extent: int) -> None:
    """``x`` is a contiguous ``dtype`` tensor of shape ``[extent_name] = [extent]``."""
    _check_tensor(name, x)
    _check_dtype(name, x, (dtype,))
    if tuple(x.shape) != (extent,):
        raise ValueError(f"{name} must have shape [{extent_name}] = [{extent}], got {tuple(x.shape)}")
    _check_contiguous(name, x)


def check_sparse_kernel_layout(
    q: torch.Tensor, k_cache: torch.Tensor, extra_k_cache: torch.Tensor | None = None
) -> None:
    """What the kernel's 16-byte loads and stores need beyond shapes and dtypes:
    ``launch_args.ALIGN_BYTES``-aligned data pointers and strides in whole 16-byte units
    for ``q`` and the caches (of a MODEL1 cache only the page stride counts: its token
    rows are 576 bytes in the page; the stride of a dimension of size 1 is never used).
    ``check_sparse_decode_args`` calls this on every device; it looks only at metadata."""
    for name, x in (("q", q), ("k_cache", k_cache), ("extra_k_cache", extra_k_cache)):
        if x is None:
            continue
        pages_only = name != "q" and x.shape[-1] == fp8_cache.MODEL1.bytes_per_token
        checked = range(1) if pages_only else range(x.dim() - 1)
        fault = alignment_fault(x, [dim for dim in checked if x.shape[dim] > 1],
                                "the page dimension" if pages_only else "all but the last dimension")
        if fault is not None:
            raise ValueError(f"{name} {fault}")