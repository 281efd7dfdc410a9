"""get_mla_metadata + flash_mla_with_kvcache captured in one CUDA graph: replays with new
cache_seqlens and block_table contents (changed in place) match the reference."""

import gc

import pytest
import torch

import flashmla_cute
from flashmla_cute.reference import flash_mla_reference
from flashmla_cute.testing import capture_graph, cosine_distance, make_decode_inputs

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


# ------------------------------------- graphs captured on streams of their own, one plan
# A plan keeps its split workspaces for the calls made with it; a graph that captured a
# call must not depend on them: here two graphs share one plan, each warmed up and
# captured on a stream of its own (``testing.capture_graph``), with an eager call on the
# default stream after them. Every replay must still match the reference (a workspace
# freed under a graph made these replays fault).


def replays_match(queries, graphs_and_outputs, reference):
    for graph, _ in graphs_and_outputs:
        graph.replay()
    torch.cuda.synchronize()
    for q, (_, (out, lse)) in zip(queries, graphs_and_outputs):
        ref_out, ref_lse = reference(q)
        assert cosine_distance(out.float(), ref_out.float()) < 1e-5
        assert cosine_distance(lse, ref_lse) < 1e-5


def test_two_graphs_on_two_streams_share_a_dense_plan(requires_hopper):
    x = make_decode_inputs(2, 1, 64, seqlens=[8000, 50], device="cuda", seed=2)
    meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, 64, 1)
    assert int(splits[1] - splits[0]) > 1  # the long sequence is split: the workspace is used
    queries = [torch.randn_like(x.q) / 10 for _ in range(3)]

    def call(q):
        return flashmla_cute.flash_mla_with_kvcache(q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits)

    def reference(q):
        return flash_mla_reference(q, x.k_cache, x.block_table, x.cache_seqlens, 512)

    captured = [capture_graph(lambda q=q: call(q)) for q in queries[:2]]
    replays_match(queries, captured, reference)
    eager = call(queries[2])  # the plan's own workspace for the default stream
    replays_match(queries, captured, reference)
    ref_out, _ = reference(queries[2])
    assert cosine_distance(eager[0].float(), ref_out.float()) < 1e-5


def test_two_graphs_on_two_streams_share_a_sparse_plan(requires_hopper):
    from flashmla_cute import api
    from flashmla_cute.sparse_reference import sparse_mla_reference
    from flashmla_cute.sparse_testing import make_sparse_decode_inputs

    x = make_sparse_decode_inputs(2, 1, 64, 4096, 2048, 64, seed=4, with_sink=True, device="cuda")
    plan, _ = api.get_mla_metadata()
    queries = [torch.randn_like(x.q) / 10 for _ in range(3)]

    def call(q):
        return api.flash_mla_with_kvcache(q, x.k_cache, None, None, 512, plan, softmax_scale=x.softmax_scale,
                                          is_fp8_kvcache=True, indices=x.indices, attn_sink=x.attn_sink)

    def reference(q):
        return sparse_mla_reference(q, x.k_cache, x.indices, None, x.attn_sink, x.softmax_scale)

    captured = [capture_graph(lambda q=q: call(q)) for q in queries[:2]]
    replays_match(queries, captured, reference)
    eager = call(queries[2])
    replays_match(queries, captured, reference)
    ref_out, _ = reference(queries[2])
    assert cosine_distance(eager[0].float(), ref_out.float()) < 1e-5


def test_a_plan_captured_after_warm_ups_is_the_graphs_own(requires_hopper):
    # The warm-ups make the plan's configuration repeat on the capture stream, where outside
    # a capture the runtime hands out slots of a slab it keeps (runtime._plan_outputs). The
    # graph's plan must live in the graph's own memory: once the runtime lets its slabs go
    # and new tensors on that stream take their memory, replays must leave those alone.
    from flashmla_cute import runtime

    x = make_decode_inputs(2, 1, 64, seqlens=[8000, 50], device="cuda", seed=2)
    plan_bytes = []

    def step():
        meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, 64, 1)
        if torch.cuda.is_current_stream_capturing():
            plan_bytes.extend(t.untyped_storage().nbytes() for t in (meta, splits))
        return flashmla_cute.flash_mla_with_kvcache(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits)

    stream = torch.cuda.Stream()
    graph, (out, lse) = capture_graph(step, stream=stream)
    runtime._plan_slabs.clear()  # what the runtime does when more configurations come
    gc.collect()
    with torch.cuda.stream(stream):  # the caching allocator reuses a stream's freed memory on it
        others = [torch.full((n // 4,), -7, dtype=torch.int32, device="cuda") for n in plan_bytes for _ in range(4)]
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert all(bool((t == -7).all()) for t in others), "a replay wrote its plan into memory the graph does not own"
    ref_out, ref_lse = flash_mla_reference(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512)
    assert cosine_distance(out.float(), ref_out.float()) < 1e-5
    assert cosine_distance(lse, ref_lse) < 1e-5
