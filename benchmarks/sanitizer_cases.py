"""Two small decode problems for ``compute-sanitizer --tool memcheck``: one with split
sequences (merged in the decode kernel), causal MTP and an empty sequence; one with several
KV heads and partial last pages; then the same with values the host does not check (a
length past the block table's width, page indices past the cache and negative), which must
not make the kernels touch memory out of bounds.

``python benchmarks/sanitizer_cases.py race`` runs only the first small split case, for
racecheck and synccheck."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import flashmla_cute  # noqa: E402
from flashmla_cute.testing import make_decode_inputs  # noqa: E402


def run(b, s_q, h_q, h_kv, seqlens, causal, corrupt=False):
    x = make_decode_inputs(b, s_q, h_q, h_kv=h_kv, seqlens=seqlens, device="cuda", seed=0)
    if corrupt:
        x.cache_seqlens[0] = x.block_table.shape[1] * 64 + 5
        x.block_table[1, 0] = x.k_cache.shape[0] + 7
        x.block_table[2, 0] = -3
    meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flashmla_cute.flash_mla_with_kvcache(
        x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits, causal=causal
    )
    torch.cuda.synchronize()
    print(f"b={b} s_q={s_q} h_q={h_q} h_kv={h_kv} corrupt={corrupt}: out finite={bool(torch.isfinite(out).all())}")


if __name__ == "__main__":
    if sys.argv[1:] == ["race"]:
        # One small split, causal case: racecheck and synccheck are slow on larger ones.
        run(3, 2, 32, 1, [700, 130, 2000], causal=True)
        sys.exit(0)
    run(4, 2, 64, 1, [0, 1, 700, 3000], causal=True)
    run(3, 1, 32, 2, [65, 129, 1000], causal=False)
    run(3, 2, 64, 1, [65, 129, 1000], causal=True, corrupt=True)
