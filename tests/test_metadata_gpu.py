"""get_mla_metadata on the GPU computes exactly the plan of scheduler.plan_torch,
without host synchronization (it is captured and replayed in a CUDA graph)."""

import pytest
import torch

from flashmla_cute import scheduler

pytestmark = pytest.mark.gpu


def random_seqlens(gen, b):
    kind = torch.randint(0, 3, (1,), generator=gen).item()
    if kind == 0:
        s = torch.randint(0, 200, (b,), generator=gen)
    elif kind == 1:
        s = torch.randint(0, 20000, (b,), generator=gen)
    else:
        s = torch.full((b,), int(torch.randint(1, 9000, (1,), generator=gen)))
    return s.to(torch.int32)


@pytest.mark.parametrize("b", [1, 2, 31, 32, 33, 128, 1000, 10000])
def test_gpu_plan_equals_torch_plan(requires_hopper, b):
    from flashmla_cute import runtime

    gen = torch.Generator().manual_seed(b)
    for num_parts in (1, 7, 33, 66, 132, 500):
        seqlens = random_seqlens(gen, b)
        meta, num_splits = runtime.plan_on_gpu(seqlens.cuda(), num_parts)
        ref_meta, ref_splits = scheduler.plan_torch(seqlens, num_parts)
        assert torch.equal(num_splits.cpu(), ref_splits), (b, num_parts)
        assert torch.equal(meta.cpu(), ref_meta), (b, num_parts)


@pytest.mark.parametrize("case", ["near 2**31", "garbage", "negative garbage"])
def test_gpu_plan_of_lengths_no_cache_holds(requires_hopper, case):
    # Lengths within 64 of 2**31 (their block counts wrap in 32 bits) and garbage whose
    # costs sum past 2**31: still the specification's plan, with which the decode kernel
    # reads nothing past the block table (test_decode_gpu).
    from flashmla_cute import runtime

    gen = torch.Generator().manual_seed(9)
    seqlens = {
        "near 2**31": torch.tensor([2**31 - 1, 2**31 - 63, 2**31 - 64, 2**31 - 65] * 16),
        "garbage": torch.randint(0, 2**31 - 1, (256,), generator=gen),
        "negative garbage": torch.randint(-2**31, 2**31 - 1, (1300,), generator=gen),
    }[case].to(torch.int32)
    for num_parts in (1, 66, 132, 500):
        meta, num_splits = runtime.plan_on_gpu(seqlens.cuda(), num_parts)
        ref_meta, ref_splits = scheduler.plan_torch(seqlens, num_parts)
        assert torch.equal(num_splits.cpu(), ref_splits), num_parts
        assert torch.equal(meta.cpu(), ref_meta), num_parts


def test_gpu_balanced_plan_over_several_chunks(requires_hopper):
    # More sequences than the planner's CTA has threads, and parts enough for a balanced
    # plan: its rows are written chunk by chunk, the parts numbered across the chunks.
    from flashmla_cute import runtime
    from flashmla_cute.kernels.metadata import PLAN_THREADS

    gen = torch.Generator().manual_seed(5)
    b = PLAN_THREADS + 500
    seqlens = torch.randint(0, 300, (b,), generator=gen).to(torch.int32)
    num_parts = 2 * b
    blocks = [max(-(-int(x) // scheduler.BLOCK_SIZE), 1) for x in seqlens.tolist()]
    payload = scheduler.payload_of(sum(blocks) + scheduler.FIXED_OVERHEAD_BLOCKS * b, num_parts, b)
    assert scheduler.balanced_fragment_blocks(blocks, num_parts, payload) > 0
    meta, num_splits = runtime.plan_on_gpu(seqlens.cuda(), num_parts)
    ref_meta, ref_splits = scheduler.plan_torch(seqlens, num_parts)
    assert torch.equal(num_splits.cpu(), ref_splits)
    assert torch.equal(meta.cpu(), ref_meta)


@pytest.mark.parametrize("case", ["grid", "fails late", "too many to pack"])
def test_gpu_packed_plan(requires_hopper, case):
    # A packed plan (whole sequences); a packing that fails only at the last of
    # PACKED_MAX_BATCH sequences (the walk then starts over); and more sequences than
    # PACKED_MAX_BATCH over three chunks, which would pack but are walked.
    from flashmla_cute import runtime
    from flashmla_cute.kernels.metadata import PLAN_CHUNK

    most = scheduler.PACKED_MAX_BATCH
    seqlens, num_parts = {
        "grid": ([8192] * 128, 66),
        "fails late": ([1920] * (most - 1) + [2_000_000], 7),
        "too many to pack": ([1920] * (3 * PLAN_CHUNK), 1685),  # payload 62, as in test_scheduler
    }[case]
    seqlens = torch.tensor(seqlens, dtype=torch.int32)
    blocks = [max(-(-int(x) // scheduler.BLOCK_SIZE), 1) for x in seqlens.tolist()]
    payload = scheduler.payload_of(sum(blocks) + scheduler.FIXED_OVERHEAD_BLOCKS * len(blocks), num_parts, len(blocks))
    assert not scheduler.balanced_fragment_blocks(blocks, num_parts, payload)
    would_pack = scheduler.packed_parts(blocks, payload + scheduler.FIXED_OVERHEAD_BLOCKS,
                                        scheduler.empty_rows(len(blocks), num_parts)) is not None
    assert would_pack == (case != "fails late")
    meta, num_splits = runtime.plan_on_gpu(seqlens.cuda(), num_parts)
    ref_meta, ref_splits = scheduler.plan_torch(seqlens, num_parts)
    assert torch.equal(num_splits.cpu(), ref_splits)
    assert torch.equal(meta.cpu(), ref_meta)
    packed = ref_splits.tolist() == list(range(len(blocks) + 1))
    assert packed == (case == "grid")


def test_metadata_is_graph_capturable(requires_hopper):
    import flashmla_cute

    seqlens = torch.full((64,), 1000, dtype=torch.int32, device="cuda")
    flashmla_cute.get_mla_metadata(seqlens, 16, 1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        meta, num_splits = flashmla_cute.get_mla_metadata(seqlens, 16, 1)
    new = torch.randint(0, 5000, (64,), dtype=torch.int32)
    seqlens.copy_(new.cuda())
    graph.replay()
    torch.cuda.synchronize()
    ref_meta, ref_splits = scheduler.plan_torch(new, meta.shape[0])
    assert torch.equal(meta.cpu(), ref_meta)
    assert torch.equal(num_splits.cpu(), ref_splits)


def test_every_plan_has_memory_of_its_own(requires_hopper):
    # Plans of one configuration asked for again and again, more of them than one slab
    # of outputs holds (see runtime._plan_outputs): every call's tensors hold its own
    # plan, overlap no other call's, and a plan's two tensors share no storage.
    import flashmla_cute
    from flashmla_cute import runtime

    gen = torch.Generator().manual_seed(7)
    lengths = [torch.randint(0, 5000, (9,), generator=gen, dtype=torch.int32) for _ in range(2 * runtime.PLAN_SLAB + 3)]
    plans = [flashmla_cute.get_mla_metadata(s.cuda(), 64, 1) for s in lengths]
    spans = []
    for s, (meta, num_splits) in zip(lengths, plans):
        ref_meta, ref_splits = scheduler.plan_torch(s, meta.shape[0])
        assert torch.equal(meta.cpu(), ref_meta) and torch.equal(num_splits.cpu(), ref_splits)
        assert meta.untyped_storage().data_ptr() != num_splits.untyped_storage().data_ptr()
        spans += [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (meta, num_splits)]
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
