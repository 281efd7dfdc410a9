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
