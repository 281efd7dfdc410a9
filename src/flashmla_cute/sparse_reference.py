"""Float32 PyTorch reference for sparse MLA decoding (DeepSeek-V3.2's top-k attention).

Each query token attends to its own ``topk`` cache tokens, named by ``indices``: entry
``indices[i, j, k] = page * page_size + slot`` is token ``slot`` of page ``page`` of the
cache (the index of a token in the cache viewed as ``[num_blocks * page_size, ...]``).
For batch ``i``, query token ``j`` and head ``h``, with the scaled scores
``s_k = softmax_scale * <q[i, j, h], key(indices[i, j, k])>`` over the *valid* entries::

    lse = log(sum_k exp(s_k))
    out = sum_k exp(s_k - lse) * value(indices[i, j, k])

An entry is valid unless it is negative (FlashMLA's ``-1``), at or past the cache's
``num_blocks * page_size`` tokens, or at a position ``k >= topk_length[i]`` when
``topk_length`` is given; invalid entries are never read, so whatever the cache holds
there (NaN included) cannot change the result. The same token may appear several times
and then counts several times, as in FlashMLA.

With an attention sink ``attn_sink[h]`` the output is scaled by
``exp(lse) / (exp(lse) + exp(attn_sink[h]))`` (a ``+inf`` sink gives 0, ``-inf`` leaves
the output as it is); ``lse`` is not changed. A row with no valid entry gets ``out = 0``
and ``lse = +inf``, sink or not. These are the conventions of FlashMLA's sparse decoding.
"""

from __future__ import annotations

import math

import torch

from . import fp8_cache

_CHUNK_ELEMENTS = 1 << 25
"""Soft bound on the float32 elements of one chunk's gathered keys."""


def sparse_mla_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    indices: torch.Tensor,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    head_dim_v: int = fp8_cache.LATENT_DIM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse multi-head latent attention decode in float32.

    Args:
        q: ``[b, s_q, h_q, d]`` (bfloat16, or any float dtype).
        k_cache: either a V3.2 FP8 cache ``[num_blocks, page_size, 1, 656]``
            (float8_e4m3fn, int8 or uint8; see ``fp8_cache``), dequantized here, or
            the keys themselves ``[num_blocks, page_size, 1, d]`` in a float dtype.
            Values are the first ``head_dim_v`` columns of the keys.
        indices: integer ``[b, s_q, topk]``, token indices into the cache (see above).
        topk_length: optional integer ``[b]``: only the first ``topk_length[i]`` entries
            of batch ``i``'s index rows are used.
        attn_sink: optional float ``[h_q]``, one sink logit per query head.
        softmax_scale: score scale; ``d ** -0.5`` when None.
        head_dim_v: width of the values (512).

    Returns:
        ``(out, lse)``: ``out [b, s_q, h_q, head_dim_v]`` bfloat16 and
        ``lse [b, h_q, s_q]`` float32 (natural log).
    """
    if q.dim() != 4 or k_cache.dim() != 4 or indices.dim() != 3:
        raise ValueError(
            f"q must be [b, s_q, h_q, d], k_cache [num_blocks, page_size, 1, bytes or d] and indices "
            f"[b, s_q, topk], got {tuple(q.shape)}, {tuple(k_cache.shape)} and {tuple(indices.shape)}"
        )
    b, s_q, h_q, d = q.shape
    topk = indices.shape[2]
    quantized = k_cache.dtype in fp8_cache.CACHE_DTYPES
    if quantized:
        fp8_cache.v32_cache_bytes(k_cache)  # checks the layout
    key_width = fp8_cache.HEAD_DIM if quantized else k_cache.shape[3]
    if key_width != d or k_cache.shape[2] != 1 or tuple(indices.shape[:2]) != (b, s_q):
        raise ValueError(
            f"k_cache must hold one KV head of keys of q's width {d} and indices must be [b={b}, s_q={s_q}, topk], "
            f"got k_cache {tuple(k_cache.shape)} ({k_cache.dtype}) and indices {tuple(indices.shape)}"
        )
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    device = q.device
    num_blocks, page_size = k_cache.shape[:2]
    num_tokens = num_blocks * page_size

    idx = indices.to(device=device, dtype=torch.long)
    valid = (idx >= 0) & (idx < num_tokens)
    if topk_length is not None:
        position = torch.arange(topk, device=device)
        valid &= position[None, None, :] < topk_length.to(device=device, dtype=torch.long)[:, None, None]
    idx = torch.where(valid, idx, torch.zeros_like(idx))  # a harmless token to gather

    rows = b * s_q
    q_rows = q.reshape(rows, h_q, d).float()
    idx = idx.reshape(rows, topk)
    valid = valid.reshape(rows, topk)
    out = torch.zeros(rows, h_q, head_dim_v, dtype=torch.float32, device=device)
    lse = torch.full((rows, h_q), -math.inf, dtype=torch.float32, device=device)
    if num_tokens > 0 and topk > 0:
        step = max(1, _CHUNK_ELEMENTS // (topk * max(d, h_q)))
        for start in range(0, rows, step):
            chunk = slice(start, min(start + step, rows))
            keys = _gather_keys(k_cache, idx[chunk], quantized, page_size)  # [n, topk, d]
            keys = torch.where(valid[chunk, :, None], keys, torch.zeros((), device=device))
            scores = torch.einsum("nhd,nkd->nhk", q_rows[chunk], keys) * scale
            scores = scores.masked_fill(~valid[chunk, None, :], -math.inf)
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


def _gather_keys(k_cache, idx, quantized, page_size):
    """Keys of the tokens ``idx [n, topk]`` (all in range) as float32 ``[n, topk, d]``."""
    tokens = k_cache[idx // page_size, idx % page_size, 0]  # [n, topk, bytes or d]
    if quantized:
        n, topk, nbytes = tokens.shape
        tokens = fp8_cache.dequantize_v32_kv_cache(tokens.reshape(n * topk, 1, 1, nbytes)).reshape(n, topk, -1)
    return tokens.float()
