"""One sparse decoding step over an FP8 KV cache, with FlashMLA's current API.

    python examples/sparse_decode.py                   # DeepSeek-V3.2's layout
    python examples/sparse_decode.py --layout model1   # MODEL1's, with an extra cache

Builds a paged bf16 cache for a few sequences, quantizes it into the chosen FP8 layout
(V3.2: 656 bytes a token, keys of 576; MODEL1: 584, keys of 512), picks each query
token's top-k cache tokens at random (as the model's indexer would), and runs
``flash_mla_with_kvcache`` with ``indices`` for a few layers that share one plan. With
MODEL1 each query token also attends to an extra cache, its sequence's most recent
tokens (``extra_k_cache``, ``extra_indices_in_kvcache``, ``extra_topk_length``), in the
same softmax. On a Hopper GPU the CuTe DSL kernel runs (compiled on first use);
elsewhere the same calls run the reference on the CPU. Each layer's result is compared
with the float32 reference by cosine distance, with PASS (out and lse under 1e-5) or
FAIL; the example exits with status 1 if a layer fails.
"""

from __future__ import annotations

import argparse
import sys

import torch

from flashmla_cute import fp8_cache
from flashmla_cute.api import flash_mla_with_kvcache, get_mla_metadata
from flashmla_cute.sparse_reference import sparse_mla_reference
from flashmla_cute.testing import reference_verdict

DV = fp8_cache.VALUE_DIM  # value width: 512 in both layouts
LAYOUTS = {layout.key: layout for layout in fp8_cache.LAYOUTS}  # "v32" and "model1"


def pick_device() -> torch.device:
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        return torch.device("cuda")
    print("No Hopper (sm_90) GPU found: running the float32 reference on the CPU instead")
    return torch.device("cpu")


def paged_cache(layout: fp8_cache.Fp8Layout, seqlens: torch.Tensor, page: int, gen: torch.Generator, device):
    """A random cache holding each sequence's tokens in pages of ``page`` tokens, in a
    random page order: ``(k_cache, block_table)``."""
    b = len(seqlens)
    max_pages = int((seqlens.max() + page - 1) // page)
    block_table = torch.randperm(b * max_pages, generator=gen).view(b, max_pages)
    kv = torch.randn(b * max_pages, page, 1, layout.head_dim, generator=gen).to(torch.bfloat16)
    return fp8_cache.quantize_kv_cache(kv, layout).to(device), block_table


def cache_indices(positions: torch.Tensor, block_table: torch.Tensor, page: int) -> torch.Tensor:
    """Token positions ``[b, s_q, k]`` of each sequence as cache indices ``page * size + slot``
    (negative positions stay -1: no token)."""
    b = positions.shape[0]
    pages = torch.gather(block_table, 1, (positions.clamp(min=0) // page).view(b, -1)).view_as(positions)
    return torch.where(positions >= 0, pages * page + positions % page, -1).to(torch.int32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=tuple(LAYOUTS), default="v32")
    args = parser.parse_args(argv)
    device = pick_device()
    gen = torch.Generator().manual_seed(0)
    b, s_q, h_q, topk, num_layers = 4, 2, 128, 512, 3  # s_q = 2: one extra MTP token
    page = 64  # tokens per page: sparse decoding takes any page size below 2**31 bytes
    seqlens = torch.randint(1000, 3000, (b,), generator=gen)
    layout = LAYOUTS[args.layout]
    k_cache, block_table = paged_cache(layout, seqlens, page, gen, device)

    # Top-k positions of each query token, then their cache indices.
    scores = torch.rand(b, s_q, int(seqlens.max()), generator=gen)
    scores = scores.masked_fill(torch.arange(scores.shape[-1]) >= seqlens[:, None, None], -1.0)
    indices = cache_indices(scores.topk(topk, dim=-1).indices, block_table, page).to(device)  # [b, s_q, topk]
    attn_sink = torch.randn(h_q, generator=gen).to(device)  # [h_q] float32

    extra = {}
    if layout is fp8_cache.MODEL1:
        # The extra cache: a window of each sequence's latest tokens, in pages of 16; its
        # index lists are 128 wide, of which the first extra_topk_length count.
        window, extra_page, extra_topk = 100, 16, 128
        window_lens = torch.full((b,), window)
        extra_cache, extra_table = paged_cache(layout, window_lens, extra_page, gen, device)
        positions = torch.arange(extra_topk).expand(b, s_q, extra_topk)
        extra = dict(
            extra_k_cache=extra_cache,
            extra_indices_in_kvcache=cache_indices(torch.where(positions < window, positions, -1), extra_table,
                                                   extra_page).to(device),
            extra_topk_length=torch.full((b,), window, dtype=torch.int32, device=device),
        )
    reference_extra = {k.replace("_in_kvcache", ""): v for k, v in extra.items()}

    plan, _ = get_mla_metadata()  # filled by the first call, reused by the others
    all_passed = True
    for layer in range(num_layers):
        q = torch.randn(b, s_q, h_q, layout.head_dim, generator=gen).to(torch.bfloat16).to(device)
        out, lse = flash_mla_with_kvcache(
            q, k_cache, None, None, DV, plan, is_fp8_kvcache=True, indices=indices, attn_sink=attn_sink, **extra,
        )
        ref_out, ref_lse = sparse_mla_reference(q, k_cache, indices, attn_sink=attn_sink, **reference_extra)
        passed, verdict = reference_verdict(out, lse, ref_out, ref_lse)
        all_passed &= passed
        print(f"layer {layer}: out {tuple(out.shape)} {out.dtype}, lse {tuple(lse.shape)}; "
              f"against the float32 reference: {verdict}")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
