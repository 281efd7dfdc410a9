"""Float32 PyTorch reference for sparse MLA decoding (DeepSeek-V3.2's top-k attention,
and MODEL1's with an optional extra cache).

Each query token attends to its own ``topk`` cache tokens, named by ``indices``: entry
``indices[i, j, k] = page * page_size + slot`` is token ``slot`` of page ``page`` of the
cache (the index of a token in the cache viewed as ``[num_blocks * page_size, ...]``).
With an extra cache, query token ``j`` of batch ``i`` also attends to the tokens that
``extra_indices[i, j]`` names in it, in the same softmax: its entries are the valid ones
of both caches. For batch ``i``, query token ``j`` and head ``h``, with the scaled scores
``s_k = softmax_scale * <q[i, j, h], key(entry k)>`` over those entries::

    lse = log(sum_k exp(s_k))
    out = sum_k exp(s_k - lse) * value(entry k)

An entry is valid unless it is negative (FlashMLA's ``-1``), at or past its cache's
``num_blocks * page_size`` tokens, or at a position ``k >= topk_length[i]`` (for the
extra cache ``extra_topk_length[i]``) when that is given; invalid entries are never
read, so whatever a cache holds there (NaN included) cannot change the result. The same
token may appear several times and then counts several times, as in FlashMLA.

A key is the whole row of dequantized values of a token (576 in the V3.2 layout, 512 in
MODEL1's; see ``fp8_cache``), and its value the first ``head_dim_v`` (512) of them.

With an attention sink ``attn_sink[h]`` the output is scaled by
``exp(lse) / (exp(lse) + exp(attn_sink[h]))`` (a ``+inf`` sink gives 0, ``-inf`` leaves
the output as it is); ``lse`` is not changed. A row with no valid entry (in either
cache) gets ``out = 0`` and ``lse = +inf``, sink or not. These are the conventions of
FlashMLA's sparse decoding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import fp8_cache
from .checks import _check_tensor

_CHUNK_ELEMENTS = 1 << 25
"""Soft bound on the float32 elements of one chunk's gathered keys."""


class _KeySource(NamedTuple):
    """One cache and, for every query row (``b * s_q`` of them), the tokens its entries
    name in it."""

    cache: torch.Tensor  # an FP8 cache's bytes, checked (fp8_cache.cache_bytes), or the keys
    layout: fp8_cache.Fp8Layout | None  # None: the cache holds the keys themselves
    tokens: torch.Tensor  # long [rows, topk]: token index, 0 (a harmless one) where invalid
    valid: torch.Tensor  # bool [rows, topk]


def sparse_mla_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    indices: torch.Tensor,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    head_dim_v: int = fp8_cache.VALUE_DIM,
    *,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse multi-head latent attention decode in float32.

    Args:
        q: ``[b, s_q, h_q, d]`` (bfloat16, or any float dtype).
        k_cache: either an FP8 cache (float8_e4m3fn, int8 or uint8; see ``fp8_cache``)
            in the V3.2 layout ``[num_blocks, page_size, 1, 656]`` (``d`` 576) or
            MODEL1's ``[num_blocks, page_size, 1, 584]`` (``d`` 512), dequantized here,
            or the keys themselves ``[num_blocks, page_size, 1, d]`` in a float dtype.
            Values are the first ``head_dim_v`` columns of the keys.
        indices: integer ``[b, s_q, topk]``, token indices into the cache (see above).
        topk_length: optional integer ``[b]``: only the first ``topk_length[i]`` entries
            of batch ``i``'s index rows are used.
        attn_sink: optional float ``[h_q]``, one sink logit per query head.
        softmax_scale: score scale; ``d ** -0.5`` when None.
        head_dim_v: width of the values (512).
        extra_k_cache: optional second cache, given as ``k_cache`` is (its own number of
            pages and page size), attended to in the same softmax.
        extra_indices: integer ``[b, s_q, extra_topk]``, token indices into the extra
            cache; given exactly when ``extra_k_cache`` is.
        extra_topk_length: optional integer ``[b]``, as ``topk_length`` for
            ``extra_indices``.

    Returns:
        ``(out, lse)``: ``out [b, s_q, h_q, head_dim_v]`` bfloat16 and
        ``lse [b, h_q, s_q]`` float32 (natural log).
    """
    _check_tensor("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must be [b, s_q, h_q, d], got {tuple(q.shape)}")
    if (extra_k_cache is None) != (extra_indices is None):
        raise ValueError("extra_k_cache and extra_indices must be given together")
    if extra_topk_length is not None and extra_k_cache is None:
        raise ValueError("extra_topk_length needs extra_k_cache and extra_indices")
    b, s_q, h_q, d = q.shape
    if attn_sink is not None and tuple(attn_sink.shape) != (h_q,):
        raise ValueError(f"attn_sink must be [h_q] = [{h_q}], got {tuple(attn_sink.shape)}")
    sources = [_key_source(q, k_cache, indices, topk_length, ("k_cache", "indices", "topk_length"))]
    if extra_k_cache is not None:
        sources.append(_key_source(q, extra_k_cache, extra_indices, extra_topk_length,
                                   ("extra_k_cache", "extra_indices", "extra_topk_length")))
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    device = q.device

    rows = b * s_q
    q_rows = q.reshape(rows, h_q, d).float()
    out = torch.zeros(rows, h_q, head_dim_v, dtype=torch.float32, device=device)
    lse = torch.full((rows, h_q), -math.inf, dtype=torch.float32, device=device)
    # A cache without tokens, or without entries, has nothing to gather.
    readable = [s for s in sources if s.tokens.shape[1] > 0 and s.cache.shape[0] * s.cache.shape[1] > 0]
    if readable:
        entries = sum(s.tokens.shape[1] for s in readable)
        step = max(1, _CHUNK_ELEMENTS // (entries * max(d, h_q)))
        for start in range(0, rows, step):
            chunk = slice(start, min(start + step, rows))
            keys = torch.cat([_gather_keys(s, chunk) for s in readable], dim=1)  # [n, entries, d]
            valid = torch.cat([s.valid[chunk] for s in readable], dim=1)  # [n, entries]
            scores = torch.einsum("nhd,nkd->nhk", q_rows[chunk], keys) * scale
            scores = scores.masked_fill(~valid[:, None, :], -math.inf)
            chunk_lse = torch.logsumexp(scores, dim=-1)  # -inf for rows with no valid entry
            shift = torch.where(torch.isneginf(chunk_lse), torch.zeros_like(chunk_lse), chunk_lse)
            out[chunk] = torch.einsum("nhk,nkv->nhv", torch.exp(scores - shift[..., None]), keys[..., :head_dim_v])
            lse[chunk] = chunk_lse

    empty = torch.isneginf(lse)
    if attn_sink is not None:
        sink = attn_sink.to(device=device, dtype=torch.float32)[None, :]
        # exp(lse) / (exp(lse) + exp(sink)), without overflow; rows with no valid entry stay 0.
        keep = torch.where(empty, torch.zeros_like(lse), torch.sigmoid(lse - sink))
        out = out * keep[..., None]
    lse = torch.where(empty, torch.full_like(lse, math.inf), lse)
    out = out.reshape(b, s_q, h_q, head_dim_v).to(torch.bfloat16)
    return out, lse.reshape(b, s_q, h_q).transpose(1, 2).contiguous()


def _key_source(q, cache, indices, topk_length, names) -> _KeySource:
    """The checked cache and valid entries of one (cache, indices, topk_length); ``names``
    are the cache's, the indices' and the lengths' argument names, for the errors."""
    cache_name, indices_name, length_name = names
    b, s_q, _, d = q.shape
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{indices_name} must have an integer dtype, got {indices.dtype}")
    if topk_length is not None and tuple(topk_length.shape) != (b,):
        raise ValueError(f"{length_name} must be [b] = [{b}], got {tuple(topk_length.shape)}")
    if cache.dim() != 4 or indices.dim() != 3:
        raise ValueError(
            f"{cache_name} must be [num_blocks, page_size, 1, bytes or d] and {indices_name} [b, s_q, topk], "
            f"got {tuple(cache.shape)} and {tuple(indices.shape)}"
        )
    layout = None
    key_width = cache.shape[3]
    keys_or_bytes = cache
    if cache.dtype in fp8_cache.CACHE_DTYPES:
        layout = fp8_cache.layout_of(cache, cache_name)
        keys_or_bytes = fp8_cache.cache_bytes(cache, layout, cache_name)  # checks the strides too
        key_width = layout.head_dim
    if key_width != d or cache.shape[2] != 1 or tuple(indices.shape[:2]) != (b, s_q):
        raise ValueError(
            f"{cache_name} must hold one KV head of keys of q's width {d} and {indices_name} must be "
            f"[b={b}, s_q={s_q}, topk], got {cache_name} {tuple(cache.shape)} ({cache.dtype}) and "
            f"{indices_name} {tuple(indices.shape)}"
        )
    topk = indices.shape[2]
    num_tokens = cache.shape[0] * cache.shape[1]
    tokens = indices.to(device=q.device, dtype=torch.long)
    valid = (tokens >= 0) & (tokens < num_tokens)
    if topk_length is not None:
        position = torch.arange(topk, device=q.device)
        valid &= position[None, None, :] < topk_length.to(device=q.device, dtype=torch.long)[:, None, None]
    tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    return _KeySource(keys_or_bytes, layout, tokens.reshape(b * s_q, topk), valid.reshape(b * s_q, topk))


def _gather_keys(source: _KeySource, chunk: slice) -> torch.Tensor:
    """Keys of the entries of rows ``chunk`` as float32 ``[n, topk, d]``, 0 at invalid
    entries (whose token, 0, may hold anything)."""
    tokens = source.tokens[chunk]
    page_size = source.cache.shape[1]
    pages, slots = tokens // page_size, tokens % page_size
    if source.layout is None:
        keys = source.cache[pages, slots, 0]
    else:
        keys = fp8_cache.dequantize_token_bytes(source.cache, source.layout, pages, slots)
    return torch.where(source.valid[chunk, :, None], keys.float(), torch.zeros((), device=keys.device))
