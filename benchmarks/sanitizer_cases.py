"""Two small decode problems for ``compute-sanitizer --tool memcheck``: one with split
sequences (merged by the combine kernel), causal MTP and an empty sequence; one with several
KV heads and partial last pages; then the same with values the host does not check (a
length past the block table's width, page indices past the cache and negative), which must
not make the kernels touch memory out of bounds.

``python benchmarks/sanitizer_cases.py race`` runs only the first small split case, for
racecheck and synccheck.

``python benchmarks/sanitizer_cases.py sparse`` runs only small sparse (V3.2 FP8) calls (h_q 64 and 128)
whose indices the kernel must skip without reading the cache: ``-1``, past the cache, and
past a ``topk_length`` shorter than topk (those name NaN tokens), with an attention sink;
then MODEL1 calls with an extra cache whose indices are also ``-1``, past that cache and
past an ``extra_topk_length``.

Run each form once without the sanitizer first (or after the GPU tests), so that the
sanitized run loads its kernels from the compile cache: a compile under memcheck adds
about 34 "errors" that are cuda-python's driver bindings asking the driver for entry
points it does not have (``cuGetProcAddress_v2`` returning CUDA_ERROR_INVALID_VALUE),
not accesses of our kernels."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import flashmla_cute  # noqa: E402
from flashmla_cute import api, fp8_cache  # noqa: E402
from flashmla_cute.sparse_testing import NAN_BYTE, make_sparse_decode_inputs  # noqa: E402
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


def run_sparse(b=3, s_q=2, h_q=64, topk=128, page=64):
    x = make_sparse_decode_inputs(b, s_q, h_q, 300, topk, page, seed=0, with_sink=True, device="cuda")
    num_tokens = x.k_cache.shape[0] * page
    indices = x.indices
    indices[0, 0, :16] = -1
    indices[2, 1, :] = -1  # a query row that sees no token
    indices[0, 1, 3:6] = torch.tensor([num_tokens, num_tokens + page, 2**31 - 1], dtype=torch.int32)
    # Sequence 1 uses only its first half; the rest names a token no index uses, which
    # holds NaN bytes: out stays finite only if the kernel stops at topk_length.
    short = topk // 2
    nan_token = int(torch.nonzero(x.k_cache.view(torch.uint8).view(num_tokens, -1)[:, 0] == NAN_BYTE)[0])
    indices[1, :, short:] = nan_token
    topk_length = torch.full((b,), topk, dtype=torch.int32, device="cuda")
    topk_length[1] = short
    plan, _ = api.get_mla_metadata()
    out, lse = api.flash_mla_with_kvcache(
        x.q, x.k_cache, None, None, 512, plan, None, is_fp8_kvcache=True, indices=indices,
        attn_sink=x.attn_sink, topk_length=topk_length,
    )
    torch.cuda.synchronize()
    print(f"sparse b={b} s_q={s_q} h_q={h_q} topk={topk} page={page} (-1, past the cache, topk_length, sink): "
          f"out finite={bool(torch.isfinite(out).all())}")


def run_sparse_model1(b=3, s_q=2, h_q=64, topk=128, page=48, extra_topk=128, extra_page=16):
    x = make_sparse_decode_inputs(b, s_q, h_q, 300, topk, page, seed=1, with_sink=True, with_topk_length=True,
                                  layout=fp8_cache.MODEL1, extra_topk=extra_topk, extra_page_size=extra_page,
                                  with_extra_topk_length=True, device="cuda")
    extra_tokens = x.extra_k_cache.shape[0] * extra_page
    x.indices[0, 0, :16] = -1
    x.extra_indices[1, 0, :8] = -1
    x.extra_indices[2, 1, 3:5] = torch.tensor([extra_tokens, 2**31 - 1], dtype=torch.int32)
    plan, _ = api.get_mla_metadata()
    out, lse = api.flash_mla_with_kvcache(
        x.q, x.k_cache, None, None, 512, plan, None, is_fp8_kvcache=True, indices=x.indices,
        attn_sink=x.attn_sink, topk_length=x.topk_length, extra_k_cache=x.extra_k_cache,
        extra_indices_in_kvcache=x.extra_indices, extra_topk_length=x.extra_topk_length,
    )
    torch.cuda.synchronize()
    print(f"sparse MODEL1 b={b} s_q={s_q} h_q={h_q} topk={topk}+{extra_topk} pages {page}/{extra_page} "
          f"(-1, past the cache, topk lengths, sink): out finite={bool(torch.isfinite(out).all())}")


if __name__ == "__main__":
    if sys.argv[1:] == ["sparse"]:
        run_sparse(h_q=64)
        run_sparse(h_q=128)  # two head tiles a query token
        run_sparse_model1(h_q=64)
        run_sparse_model1(h_q=128)
        sys.exit(0)
    if sys.argv[1:] == ["race"]:
        # One small split, causal case: racecheck and synccheck are slow on larger ones.
        run(3, 2, 32, 1, [700, 130, 2000], causal=True)
        sys.exit(0)
    run(4, 2, 64, 1, [0, 1, 700, 3000], causal=True)
    run(3, 1, 32, 2, [65, 129, 1000], causal=False)
    run(3, 2, 64, 1, [65, 129, 1000], causal=True, corrupt=True)
