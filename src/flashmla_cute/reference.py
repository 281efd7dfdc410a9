"""Float32 PyTorch reference for MLA decoding over a paged KV cache.

This is the plain-math statement of what the decode kernel computes; tests compare the
kernel with it, and on CPU tensors ``flash_mla_with_kvcache`` returns its result. It
runs on any device torch supports.

For sequence ``i`` with ``L = cache_seqlens[i]`` tokens, token ``t`` of the sequence lives
in page ``block_table[i, t // 64]`` at slot ``t % 64`` of ``k_cache``. Keys are the whole
``d`` columns of a cache row, values its first ``head_dim_v`` columns. For query token
``j`` (0-based, of ``s_q``) and query head ``h``, which reads KV head
``h // (h_q // h_kv)``::

    visible = L                          (not causal)
    visible = L - (s_q - 1 - j)          (causal)
    s_t     = softmax_scale * <q, k_t>   for t < visible
    lse     = log(sum_t exp(s_t))
    out     = sum_t exp(s_t - lse) * v_t

A row with no visible key gets ``out = 0`` and ``lse = +inf``. Only the first
``ceil(L / 64)`` entries of a ``block_table`` row and only slots ``t < L`` are read, so
whatever the rest of the cache and the table hold (NaN, garbage indices) cannot change
the result.
"""

from __future__ import annotations

import math

import torch

from .checks import PAGE_SIZE, _check_tensor

_CHUNK_ELEMENTS = 1 << 25
"""Soft bound on the float32 elements of one batch chunk's gathered keys (or scores)."""


def flash_mla_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head latent attention decode in float32.

    Args:
        q: ``[b, s_q, h_q, d]``, bfloat16, float16 or float32.
        k_cache: ``[num_blocks, 64, h_kv, d]``; values are its first ``head_dim_v`` columns.
        block_table: ``[b, max_blocks]`` integer page indices into ``k_cache``.
        cache_seqlens: ``[b]`` integer sequence lengths (tokens in the cache).
        head_dim_v: width of the values, ``1 <= head_dim_v <= d``.
        softmax_scale: score scale; ``d ** -0.5`` when None.
        causal: query token ``j`` sees only the first ``L - (s_q - 1 - j)`` keys.

    Returns:
        ``(out, lse)``: ``out [b, s_q, h_q, head_dim_v]`` in ``q``'s dtype and
        ``lse [b, h_q, s_q]`` float32 (natural log of the sum of the exponentiated
        scaled scores; ``+inf`` for rows that see no key, whose ``out`` is 0).

    Reads ``cache_seqlens`` and ``block_table`` on the host (this synchronizes a CUDA
    device); raises ValueError for lengths or page indices that do not fit the inputs.
    """
    for name, x in (("q", q), ("k_cache", k_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        _check_tensor(name, x)
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(
            f"q must be [b, s_q, h_q, d] and k_cache [num_blocks, 64, h_kv, d], "
            f"got q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}"
        )
    b, s_q, h_q, d = q.shape
    num_blocks, page, h_kv, d_k = k_cache.shape
    if page != PAGE_SIZE:
        raise ValueError(f"k_cache.shape[1] (page size) must be {PAGE_SIZE}, got {page}")
    if d_k != d:
        raise ValueError(f"k_cache.shape[3] must equal q.shape[3] = {d}, got {d_k}")
    if h_kv < 1 or h_q % h_kv != 0:
        raise ValueError(f"q's head count h_q = {h_q} must be a multiple of k_cache's h_kv = {h_kv}")
    if not 1 <= head_dim_v <= d:
        raise ValueError(f"head_dim_v must be in [1, {d}], got {head_dim_v}")
    if block_table.dim() != 2 or block_table.shape[0] != b or tuple(cache_seqlens.shape) != (b,):
        raise ValueError(
            f"block_table must be [b, max_blocks] and cache_seqlens [b] with b = {b}, got "
            f"block_table {tuple(block_table.shape)} and cache_seqlens {tuple(cache_seqlens.shape)}"
        )
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    causal = bool(causal) and s_q > 1
    group = h_q // h_kv
    device = q.device

    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=device)
    if b == 0:
        return out.to(q.dtype), lse

    lengths = [int(x) for x in cache_seqlens.tolist()]
    max_blocks = block_table.shape[1]
    for i, length in enumerate(lengths):
        if length < 0 or length > max_blocks * PAGE_SIZE:
            raise ValueError(
                f"cache_seqlens[{i}] = {length} does not fit a block_table row of {max_blocks} "
                f"pages of {PAGE_SIZE} tokens"
            )

    # Sequences of similar length go together so that padding to the longest is cheap.
    order = sorted((i for i in range(b) if lengths[i] > 0), key=lambda i: lengths[i])
    per_token = max(h_kv * d, s_q * h_q)
    start = 0
    while start < len(order):
        end = start + 1
        # Lengths ascend, so the chunk's padded size is set by its last sequence.
        while end < len(order) and (end + 1 - start) * lengths[order[end]] * per_token <= _CHUNK_ELEMENTS:
            end += 1
        rows = torch.tensor(order[start:end], dtype=torch.long, device=device)
        o, l = _attend_chunk(
            q[rows], k_cache, block_table[rows], [lengths[i] for i in order[start:end]],
            head_dim_v, scale, causal, group,
        )
        out[rows] = o
        lse[rows] = l
        start = end
    return out.to(q.dtype), lse


def _gather_keys(k_cache, block_table, lengths, device):
    """Keys of a chunk of sequences, padded to the longest: ``[n, L_max, h_kv, d]`` float32,
    zero past each sequence's end, and the ``[n, L_max]`` mask of real tokens."""
    n = len(lengths)
    max_len = max(lengths)
    pages = -(-max_len // PAGE_SIZE)
    lens = torch.tensor(lengths, dtype=torch.long, device=device)
    num_blocks = k_cache.shape[0]

    # Only the first ceil(L / 64) table entries of a row are page indices; the others are
    # replaced by page 0 (and their slots masked) so that they are never used to index.
    table = block_table[:, :pages].to(device=device, dtype=torch.long)
    used_pages = (torch.arange(pages, device=device)[None, :] * PAGE_SIZE) < lens[:, None]
    bad = used_pages & ((table < 0) | (table >= num_blocks))
    if bool(bad.any()):
        row, col = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"block_table holds page index {int(table[row, col])} (a used entry of a sequence "
            f"of length {lengths[row]}) outside k_cache's {num_blocks} pages"
        )
    table = torch.where(used_pages, table, torch.zeros_like(table))

    keys = k_cache[table.reshape(-1)]  # [n * pages, 64, h_kv, d]
    keys = keys.reshape(n, pages * PAGE_SIZE, *k_cache.shape[2:])[:, :max_len].float()
    token_mask = torch.arange(max_len, device=device)[None, :] < lens[:, None]
    # Slots past a sequence's end may hold anything (NaN included): zero them.
    keys = torch.where(token_mask[:, :, None, None], keys, torch.zeros((), device=device))
    return keys, token_mask


def _attend_chunk(q, k_cache, block_table, lengths, head_dim_v, scale, causal, group):
    """Attention for ``n`` sequences of length >= 1; returns ``out [n, s_q, h_q, dv]`` and
    ``lse [n, h_q, s_q]``, both float32."""
    device = q.device
    n, s_q, h_q, d = q.shape
    h_kv = h_q // group
    keys, token_mask = _gather_keys(k_cache, block_table, lengths, device)  # [n, L, h_kv, d]
    values = keys[..., :head_dim_v]

    # Query rows that share KV head g: [n, h_kv, s_q, group, d].
    qf = q.float().reshape(n, s_q, h_kv, group, d).permute(0, 2, 1, 3, 4)
    scores = torch.einsum("nkjgd,nlkd->nkjgl", qf, keys) * scale  # [n, h_kv, s_q, group, L]

    visible = token_mask[:, None, :]  # [n, 1, L]
    if causal:
        lens = torch.tensor(lengths, dtype=torch.long, device=device)
        shift = s_q - 1 - torch.arange(s_q, device=device)  # keys hidden from token j
        limit = lens[:, None] - shift[None, :]  # [n, s_q]
        visible = torch.arange(keys.shape[1], device=device)[None, None, :] < limit[:, :, None]
    scores = scores.masked_fill(~visible[:, None, :, None, :], -math.inf)

    lse = torch.logsumexp(scores, dim=-1)  # [n, h_kv, s_q, group]; -inf for empty rows
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    out = torch.einsum("nkjgl,nlkv->nkjgv", probs, values)  # empty rows: all-zero probs

    out = out.permute(0, 2, 1, 3, 4).reshape(n, s_q, h_q, head_dim_v)
    lse = torch.where(empty, torch.full_like(lse, math.inf), lse)
    lse = lse.permute(0, 1, 3, 2).reshape(n, h_q, s_q)
    return out, lse
