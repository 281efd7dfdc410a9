"""One MLA decoding step over a paged KV cache, FlashMLA style.

    python examples/decode_step.py

Builds a small random batch (4 sequences of different lengths around 1000 tokens, one
new query token each, 16 query heads sharing one latent KV head), plans the split-KV work
once with ``get_mla_metadata`` and runs ``flash_mla_with_kvcache`` for a few layers, as a
model's decode step would. On a Hopper GPU the CuTe DSL kernels run (compiled on first
use) and are compared with the float32 reference; elsewhere the same calls run the
reference on the CPU.
"""

from __future__ import annotations

import argparse
import sys

import torch

import flashmla_cute
from flashmla_cute.reference import flash_mla_reference

BLOCK_SIZE = 64  # tokens per page of the KV cache
D, DV = 576, 512  # q/k head dim (512 latent + 64 rope), v head dim (the latent part)


def pick_device() -> torch.device:
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        return torch.device("cuda")
    print("No Hopper (sm_90) GPU found: running the float32 reference on the CPU instead")
    return torch.device("cpu")


def make_paged_cache(seqlens: torch.Tensor, h_kv: int, dtype, device, gen):
    """A KV cache whose pages are handed out in random order, as an allocator would."""
    b = seqlens.numel()
    blocks_per_seq = (seqlens + BLOCK_SIZE - 1) // BLOCK_SIZE
    max_blocks = int(blocks_per_seq.max())
    num_blocks = b * max_blocks
    pages = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_table = pages.view(b, max_blocks)
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, h_kv, D, generator=gen).to(dtype)
    return k_cache.to(device), block_table.to(device)


def main(argv=None) -> int:
    # No options: the parser gives --help and refuses arguments the example would ignore.
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    device = pick_device()
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)

    b, s_q, h_q, h_kv = 4, 1, 16, 1
    num_layers = 3
    cache_seqlens = torch.randint(700, 1300, (b,), generator=gen, dtype=torch.int32)
    caches = [make_paged_cache(cache_seqlens, h_kv, dtype, device, gen) for _ in range(num_layers)]
    block_table = caches[0][1]  # every layer's cache uses the same page table here
    caches = [k for k, _ in caches]
    cache_seqlens = cache_seqlens.to(device)

    # Once per decode step: how the work is split across the GPU's SMs.
    tile_scheduler_metadata, num_splits = flashmla_cute.get_mla_metadata(
        cache_seqlens, s_q * h_q // h_kv, h_kv
    )

    # Once per layer: attention of the new token(s) over that layer's cache.
    outputs = []
    for layer in range(num_layers):
        q = torch.randn(b, s_q, h_q, D, generator=gen).to(dtype).to(device)
        out, lse = flashmla_cute.flash_mla_with_kvcache(
            q, caches[layer], block_table, cache_seqlens, DV,
            tile_scheduler_metadata, num_splits, causal=True,
        )
        outputs.append((q, caches[layer], out, lse))

    q, k_cache, out, lse = outputs[-1]
    print(f"device:        {device}")
    print(f"cache_seqlens: {cache_seqlens.tolist()}")
    print(f"q:             {tuple(q.shape)} {q.dtype}")
    print(f"k_cache:       {tuple(k_cache.shape)} {k_cache.dtype}")
    print(f"block_table:   {tuple(block_table.shape)} {block_table.dtype}")
    print(f"out:           {tuple(out.shape)} {out.dtype}")
    print(f"lse:           {tuple(lse.shape)} {lse.dtype}")
    for layer, (_, _, o, l) in enumerate(outputs):
        print(f"layer {layer} checksum: out sum {o.double().sum().item():+.6f}  lse sum {l.double().sum().item():.6f}")

    if device.type == "cuda":
        from flashmla_cute.testing import reference_verdict

        ref_out, ref_lse = flash_mla_reference(q, k_cache, block_table, cache_seqlens, DV, causal=True)
        passed, verdict = reference_verdict(out, lse, ref_out, ref_lse)
        print(f"against the float32 reference: {verdict}")
        return 0 if passed else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
