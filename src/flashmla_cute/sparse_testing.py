"""Random inputs for sparse (top-k) decoding over a V3.2 FP8 cache, shared by the tests,
the example and the benchmarks. Importing it needs only torch.

The inputs follow FlashMLA's test setup: sequences of random lengths around
``seqlen`` stored in randomly ordered pages of ``page_size`` tokens; each query token's
``topk`` indices are distinct random positions of its sequence (``-1`` once the sequence
has fewer tokens), translated through the page table into cache indices; every cache
token that no index uses holds NaN bytes, so a kernel that reads one shows it.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import fp8_cache

NAN_BYTE = 0xFF
"""A byte that is NaN as float8_e4m3fn and, repeated, NaN as float32 and bfloat16."""


@dataclasses.dataclass
class SparseDecodeInputs:
    q: torch.Tensor  # [b, s_q, h_q, 576] bfloat16
    k_cache: torch.Tensor  # [num_blocks, page_size, 1, 656] float8_e4m3fn (V3.2 layout)
    indices: torch.Tensor  # [b, s_q, topk] int32
    topk_length: torch.Tensor | None  # [b] int32
    attn_sink: torch.Tensor | None  # [h_q] float32
    softmax_scale: float
    cache_seqlens: torch.Tensor  # [b] int32: tokens of each sequence (the indices' range)


def make_sparse_decode_inputs(
    b: int,
    s_q: int,
    h_q: int,
    seqlen: int,
    topk: int,
    page_size: int,
    seed: int = 0,
    *,
    varlen: bool = True,
    with_sink: bool = False,
    with_topk_length: bool = False,
    all_invalid: bool = False,
    zero_lengths: bool = False,
    device: torch.device | str = "cpu",
) -> SparseDecodeInputs:
    """Random sparse-decode inputs (see the module docstring).

    ``with_sink``: sinks drawn from N(0, 1), about a third of them ``+inf`` and a third
    ``-inf``. ``all_invalid``: every index is ``-1``. ``zero_lengths``: about half the
    sequences are empty (all their indices ``-1``). ``with_topk_length``: random
    ``topk_length`` in ``[0, topk]``.
    """
    gen = torch.Generator().manual_seed(seed)
    d = fp8_cache.HEAD_DIM
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

    # The cache is the big tensor: drawn and quantized where it will be used.
    cache_gen = torch.Generator(device=device).manual_seed(seed)
    kv = torch.randn(num_blocks, page_size, 1, d, generator=cache_gen, device=device)
    kv = (kv / 10).clamp(-1, 1).to(torch.bfloat16)
    k_cache = fp8_cache.quantize_v32_kv_cache(kv).view(torch.uint8)
    del kv
    unused = torch.ones(num_blocks * page_size, dtype=torch.bool)
    unused[used[used >= 0]] = False
    k_cache.view(-1, fp8_cache.BYTES_PER_TOKEN)[unused.to(device)] = NAN_BYTE

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
        k_cache=k_cache.view(torch.float8_e4m3fn),
        indices=to_device(indices, torch.int32),
        topk_length=to_device(topk_length, torch.int32),
        attn_sink=to_device(attn_sink, torch.float32),
        softmax_scale=d ** -0.55,  # not the default, so that a kernel ignoring it shows
        cache_seqlens=to_device(lengths, torch.int32),
    )
