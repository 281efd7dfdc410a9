"""One DeepSeek-V3.2 sparse decoding step over an FP8 KV cache, with FlashMLA's current API.

    python examples/sparse_decode_v32.py

Builds a paged bf16 cache for a few sequences, quantizes it into the V3.2 FP8 layout
(656 bytes a token), picks each query token's top-k cache tokens at random (as the
model's indexer would), and runs ``flash_mla_with_kvcache`` with ``indices`` for a few
layers that share one plan. On a Hopper GPU the CuTe DSL kernel runs (compiled on first
use) and is compared with the float32 reference; elsewhere the same calls run the
reference on the CPU.
"""

from __future__ import annotations

import torch

from flashmla_cute.api import flash_mla_with_kvcache, get_mla_metadata
from flashmla_cute.fp8_cache import quantize_v32_kv_cache
from flashmla_cute.sparse_reference import sparse_mla_reference
from flashmla_cute.testing import cosine_distance

PAGE = 64  # tokens per page: any page size works for sparse decoding
D, DV = 576, 512  # key width (512 latent + 64 rope), value width (the latent part)


def pick_device() -> torch.device:
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        return torch.device("cuda")
    print("No Hopper (sm_90) GPU found: running the float32 reference on the CPU instead")
    return torch.device("cpu")


def main() -> None:
    device = pick_device()
    gen = torch.Generator().manual_seed(0)
    b, s_q, h_q, topk, num_layers = 4, 2, 128, 512, 3  # s_q = 2: one extra MTP token
    seqlens = torch.randint(1000, 3000, (b,), generator=gen)

    # A paged cache: each sequence's pages in random order.
    max_pages = int((seqlens.max() + PAGE - 1) // PAGE)
    block_table = torch.randperm(b * max_pages, generator=gen).view(b, max_pages)
    kv = torch.randn(b * max_pages, PAGE, 1, D, generator=gen).to(torch.bfloat16)
    k_cache = quantize_v32_kv_cache(kv).to(device)  # [num_blocks, PAGE, 1, 656] float8_e4m3fn

    # Top-k positions of each query token, then their cache indices page * PAGE + slot.
    scores = torch.rand(b, s_q, int(seqlens.max()), generator=gen)
    scores = scores.masked_fill(torch.arange(scores.shape[-1]) >= seqlens[:, None, None], -1.0)
    positions = scores.topk(topk, dim=-1).indices
    pages = torch.gather(block_table, 1, (positions // PAGE).view(b, -1)).view_as(positions)
    indices = (pages * PAGE + positions % PAGE).to(torch.int32).to(device)  # [b, s_q, topk]; -1 = no token
    attn_sink = torch.randn(h_q, generator=gen).to(device)  # [h_q] float32

    plan, _ = get_mla_metadata()  # filled by the first call, reused by the others
    for layer in range(num_layers):
        q = torch.randn(b, s_q, h_q, D, generator=gen).to(torch.bfloat16).to(device)
        out, lse = flash_mla_with_kvcache(
            q, k_cache, None, None, DV, plan, is_fp8_kvcache=True, indices=indices, attn_sink=attn_sink,
        )
        ref_out, ref_lse = sparse_mla_reference(q, k_cache, indices, attn_sink=attn_sink)
        print(
            f"layer {layer}: out {tuple(out.shape)} {out.dtype}, lse {tuple(lse.shape)}; "
            f"cosine distance to the reference {cosine_distance(out, ref_out):.2e} (out), "
            f"{cosine_distance(lse, ref_lse):.2e} (lse)"
        )


if __name__ == "__main__":
    main()
