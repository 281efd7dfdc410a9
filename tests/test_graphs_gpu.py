"""get_mla_metadata + flash_mla_with_kvcache captured in one CUDA graph: replays with new
cache_seqlens and block_table contents (changed in place) match the reference."""

import pytest
import torch

import flashmla_cute
from flashmla_cute.reference import flash_mla_reference
from flashmla_cute.testing import cosine_distance, make_decode_inputs

pytestmark = pytest.mark.gpu


def test_graph_replay_follows_new_lengths_and_pages(requires_hopper):
    b, s_q, h_q = 8, 2, 64
    x = make_decode_inputs(b, s_q, h_q, seqlens=[3000] * b, device="cuda", seed=1)
    width = x.block_table.shape[1]

    def step():
        meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, s_q * h_q, 1)
        return flashmla_cute.flash_mla_with_kvcache(
            x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits, causal=True
        )

    step()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()

    gen = torch.Generator().manual_seed(5)
    num_pages = x.k_cache.shape[0]
    for _ in range(3):
        lens = torch.randint(0, 2900, (b,), generator=gen, dtype=torch.int32)
        lens[0] = 0
        pages = torch.full((b, width), 2147480000, dtype=torch.int32)  # garbage past each length
        order = torch.randperm(num_pages, generator=gen)
        used = torch.zeros(num_pages, 64, dtype=torch.bool)
        taken = 0
        for i, n in enumerate(lens.tolist()):
            blocks = -(-n // 64)
            pages[i, :blocks] = order[taken : taken + blocks].to(torch.int32)
            taken += blocks
            for t in range(0, n, 64):
                used[pages[i, t // 64], : min(64, n - t)] = True
        fresh = (torch.randn(x.k_cache.shape, generator=gen) / 10).clamp(-1, 1)
        fresh[~used] = float("nan")
        x.k_cache.copy_(fresh)
        x.cache_seqlens.copy_(lens)
        x.block_table.copy_(pages)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = flash_mla_reference(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, causal=True)
        assert cosine_distance(out.float(), ref_out.float()) < 1e-5
        assert cosine_distance(lse, ref_lse) < 1e-5
