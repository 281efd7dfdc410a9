"""Where a plan's output tensors come from (``runtime._plan_outputs``), with the CUDA
stream queries stood in for, so that the rules run without a GPU: a configuration that
repeats gets slots of a kept slab; a plan made during a CUDA-graph capture never does."""

import pytest
import torch

from flashmla_cute import runtime

PARTS = 66


@pytest.fixture
def stream(monkeypatch):
    state = {"capturing": False}
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0x5000, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: state["capturing"], raising=False)
    monkeypatch.setattr(runtime, "_plan_slabs", {})
    monkeypatch.setattr(runtime, "_last_plan_key", None)
    return state


def is_slab_slot(t: torch.Tensor) -> bool:
    return t._base is not None


def test_a_repeated_configuration_gets_slab_slots(stream):
    seqlens = torch.zeros(4, dtype=torch.int32)
    first = runtime._plan_outputs(seqlens, PARTS)
    later = [runtime._plan_outputs(seqlens, PARTS) for _ in range(3)]
    assert not any(map(is_slab_slot, first))
    assert all(is_slab_slot(t) for pair in later for t in pair)
    assert [t.shape for t in later[0]] == [(PARTS, runtime.METADATA_INTS), (5,)]


def test_a_plan_made_in_a_capture_owns_its_memory(stream):
    seqlens = torch.zeros(4, dtype=torch.int32)
    for _ in range(3):  # warm-ups on the capture stream, as testing.capture_graph makes them
        runtime._plan_outputs(seqlens, PARTS)
    stream["capturing"] = True
    captured = [runtime._plan_outputs(seqlens, PARTS) for _ in range(2)]
    stream["capturing"] = False
    assert not any(is_slab_slot(t) for pair in captured for t in pair)
    assert [t.shape for t in captured[0]] == [(PARTS, runtime.METADATA_INTS), (5,)]
    kept = {t.untyped_storage().data_ptr() for slots in runtime._plan_slabs.values() for pair in slots for t in pair}
    assert not kept & {t.untyped_storage().data_ptr() for pair in captured for t in pair}
