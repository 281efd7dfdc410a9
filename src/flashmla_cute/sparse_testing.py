"""Random inputs for sparse (top-k) decoding over an FP8 cache (the V3.2 or the MODEL1
layout, see ``fp8_cache``), optionally with an extra cache, shared by the tests, the
example and the benchmarks. Importing it needs only torch.

The inputs follow FlashMLA's test setup: sequences of random lengths around
``seqlen`` stored in randomly ordered pages of ``page_size`` tokens; each query token's
``topk`` indices are distinct random positions of its sequence (``-1`` once the sequence
has fewer tokens), translated through the page table into cache indices; every cache
token that no index uses holds NaN bytes, so a kernel that reads one shows it. An extra
cache is made the same way, with its own lengths, pages, page size and indices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from . import fp8_cache

NAN_BYTE = 0xFF
"""A byte that is NaN as float8_e4m3fn and, repeated, NaN as float32 and bfloat16 (as a
MODEL1 ue8m0 scale it is NaN too)."""


@dataclasses.dataclass
class SparseDecodeInputs:
    q: torch.Tensor  # [b, s_q, h_q, layout.head_dim] bfloat16 (576 for V3.2, 512 for MODEL1)
    k_cache: torch.Tensor  # [num_blocks, page_size, 1, layout.bytes_per_token] float8_e4m3fn
    indices: torch.Tensor  # [b, s_q, topk] int32
    topk_length: torch.Tensor | None  # [b] int32
    attn_sink: torch.Tensor | None  # [h_q] float32
    softmax_scale: float
    cache_seqlens: torch.Tensor  # [b] int32: tokens of each sequence (the indices' range)
    extra_k_cache: torch.Tensor | None = None  # as k_cache, with its own num_blocks and page size
    extra_indices: torch.Tensor | None = None  # [b, s_q, extra_topk] int32, into extra_k_cache
    extra_topk_length: torch.Tensor | None = None  # [b] int32


class _PagedTokens(NamedTuple):
    """One cache and the indices into it of every query token."""

    k_cache: torch.Tensor
    indices: torch.Tensor  # [b, s_q, topk] int64
    topk_length: torch.Tensor | None  # [b] int64
    seqlens: torch.Tensor  # [b] int64


def make_sparse_decode_inputs(
    b: int,
    s_q: int,
    h_q: int,
    seqlen: int,
    topk: int,
    page_size: int,
    seed: int = 0,
    *,
    layout: fp8_cache.Fp8Layout = fp8_cache.V32,
    varlen: bool = True,
    with_sink: bool = False,
    with_topk_length: bool = False,
    all_invalid: bool = False,
    zero_lengths: bool = False,
    extra_topk: int | None = None,
    extra_seqlen: int | None = None,
    extra_page_size: int | None = None,
    with_extra_topk_length: bool = False,
    device: torch.device | str = "cpu",
) -> SparseDecodeInputs:
    """Random sparse-decode inputs (see the module docstring) in ``layout``.

    ``with_sink``: sinks drawn from N(0, 1), about a third of them ``+inf`` and a third
    ``-inf``. ``all_invalid``: every index is ``-1`` (in both caches). ``zero_lengths``:
    about half the sequences are empty (all their indices ``-1``), drawn for each cache
    on its own. ``with_topk_length``: random ``topk_length`` in ``[0, topk]``.

    ``extra_topk``: also make an extra cache, of sequences around ``extra_seqlen``
    (default ``2 * extra_topk``) tokens in pages of ``extra_page_size`` (default
    ``page_size``), with ``extra_topk`` indices per query token;
    ``with_extra_topk_length``: random ``extra_topk_length`` in ``[0, extra_topk]``.
    """
    if extra_topk is None and (extra_seqlen is not None or extra_page_size is not None or with_extra_topk_length):
        raise ValueError("extra_seqlen, extra_page_size and with_extra_topk_length need extra_topk")
    gen = torch.Generator().manual_seed(seed)
    # The caches are the big tensors: drawn and quantized where they will be used.
    cache_gen = torch.Generator(device=device).manual_seed(seed)
    options = dict(layout=layout, varlen=varlen, all_invalid=all_invalid, zero_lengths=zero_lengths, gen=gen,
                   cache_gen=cache_gen, device=device)
    main = _make_paged_tokens(b, s_q, seqlen, topk, page_size, with_topk_length=with_topk_length, **options)
    extra = None
    if extra_topk is not None:
        extra = _make_paged_tokens(
            b, s_q, 2 * extra_topk if extra_seqlen is None else extra_seqlen, extra_topk,
            page_size if extra_page_size is None else extra_page_size, with_topk_length=with_extra_topk_length,
            **options,
        )

    d = layout.head_dim
    q = torch.randn(b, s_q, h_q, d, generator=gen).clamp(-1, 1).to(torch.bfloat16)
    attn_sink = None
    if with_sink:
        attn_sink = torch.randn(h_q, generator=gen)
        draw = torch.rand(h_q, generator=gen)
        attn_sink[draw < 1 / 3] = math.inf
        attn_sink[draw > 2 / 3] = -math.inf

    def to_device(x, dtype=None):
        return None if x is None else x.to(device=device, dtype=dtype or x.dtype)

    return SparseDecodeInputs(
        q=to_device(q),
        k_cache=main.k_cache,
        indices=to_device(main.indices, torch.int32),
        topk_length=to_device(main.topk_length, torch.int32),
        attn_sink=to_device(attn_sink, torch.float32),
        softmax_scale=d ** -0.55,  # not the default, so that a kernel ignoring it shows
        cache_seqlens=to_device(main.seqlens, torch.int32),
        extra_k_cache=None if extra is None else extra.k_cache,
        extra_indices=None if extra is None else to_device(extra.indices, torch.int32),
        extra_topk_length=None if extra is None else to_device(extra.topk_length, torch.int32),
    )


def _make_paged_tokens(b, s_q, seqlen, topk, page_size, *, layout, varlen, with_topk_length, all_invalid,
                       zero_lengths, gen, cache_gen, device) -> _PagedTokens:
    """One cache of ``b`` sequences and ``topk`` indices into it per query token, drawn
    from ``gen`` (lengths, pages, indices; CPU) and ``cache_gen`` (the values)."""
    if varlen:
        lengths = (torch.randn(b, generator=gen) * seqlen / 2 + seqlen).round().clamp(min=s_q, max=2 * seqlen)
    else:
        lengths = torch.full((b,), float(seqlen))
    lengths = lengths.to(torch.int64)
    if zero_lengths:
        lengths[torch.rand(b, generator=gen) < 0.5] = 0
    pages_per_seq = max(1, math.ceil(int(lengths.max()) / page_size))
    num_blocks = b * pages_per_seq
    block_table = torch.randperm(num_blocks, generator=gen).view(b, pages_per_seq)

    # Distinct random positions below each sequence's length, -1 past it.
    keys = torch.rand(b, s_q, max(topk, pages_per_seq * page_size), generator=gen)
    position = torch.arange(keys.shape[-1])
    keys = keys.masked_fill(position >= lengths[:, None, None], -1.0)
    picked = keys.topk(topk, dim=-1)
    abs_indices = torch.where(picked.values >= 0, picked.indices, torch.full_like(picked.indices, -1))
    if all_invalid:
        abs_indices.fill_(-1)
    pages = torch.gather(block_table, 1, (abs_indices.clamp(min=0) // page_size).view(b, -1)).view_as(abs_indices)
    indices = torch.where(abs_indices >= 0, pages * page_size + abs_indices % page_size, abs_indices)

    topk_length = None
    used = indices
    if with_topk_length:
        topk_length = torch.randint(0, topk + 1, (b,), generator=gen)
        used = indices.masked_fill(torch.arange(topk) >= topk_length[:, None, None], -1)

    kv = torch.randn(num_blocks, page_size, 1, layout.head_dim, generator=cache_gen, device=device)
    kv = (kv / 10).clamp(-1, 1).to(torch.bfloat16)
    k_cache = fp8_cache.quantize_kv_cache(kv, layout)
    del kv
    unused = torch.ones(num_blocks * page_size, dtype=torch.bool)
    unused[used[used >= 0]] = False
    unused = unused.view(num_blocks, page_size).to(device)
    for part in token_byte_parts(k_cache, layout):
        part[unused] = NAN_BYTE
    return _PagedTokens(k_cache, indices, topk_length, lengths)


def token_byte_parts(k_cache: torch.Tensor, layout: fp8_cache.Fp8Layout) -> list[torch.Tensor]:
    """Writable uint8 views ``[num_blocks, page_size, n]`` of ``k_cache``'s bytes that
    together are every token's bytes: for V3.2 its 656-byte row; for MODEL1 its 576-byte
    row of latent and rope values and its 8-byte row of scales, which lie apart in the page."""
    raw = fp8_cache.cache_bytes(k_cache, layout)  # checks the layout
    if layout is fp8_cache.V32:
        return [raw[:, :, 0]]
    return list(fp8_cache.page_parts(raw, layout))


def with_page_stride(k_cache: torch.Tensor, page_stride: int) -> torch.Tensor:
    """A copy of an FP8 cache of either layout whose pages lie ``page_stride`` bytes
    apart, ``NAN_BYTE`` between them; uint8, on the cache's device."""
    num_blocks, page_size, _, bytes_per_token = k_cache.shape
    page = page_size * bytes_per_token
    if page_stride < page:
        raise ValueError(f"page_stride must be at least a page's {page} bytes, got {page_stride}")
    buffer = torch.full((num_blocks, page_stride), NAN_BYTE, dtype=torch.uint8, device=k_cache.device)
    buffer[:, :page] = page_bytes(k_cache)
    return buffer.as_strided(k_cache.shape, (page_stride, bytes_per_token, bytes_per_token, 1))


def page_bytes(k_cache: torch.Tensor) -> torch.Tensor:
    """uint8 view ``[num_blocks, page_size * bytes_per_token]`` of an FP8 cache of either
    layout: each page's bytes (its padding left out), read through the page stride."""
    num_blocks, page_size, _, bytes_per_token = k_cache.shape
    raw = k_cache.view(torch.uint8)
    return raw.as_strided((num_blocks, page_size * bytes_per_token), (raw.stride(0), 1))
