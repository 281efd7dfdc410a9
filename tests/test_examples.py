"""The examples run end to end (on the CPU path here, on the kernels with a Hopper GPU) and
pass their own checks; the context-parallel split is exact for every length."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

from flashmla_cute import merge_attention_states
from flashmla_cute.reference import flash_mla_reference
from flashmla_cute.testing import make_decode_inputs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 300


def run_example(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def load_example(name: str):
    return load_script(EXAMPLES / f"{name}.py")


def test_multi_layer_decode_runs_and_passes_its_check():
    # On the kernels with a Hopper GPU, else on the CPU path; it says which.
    result = run_example(str(EXAMPLES / "multi_layer_decode.py"),
                         "--layers", "2", "--batch", "2", "--context", "100", "--steps", "3", "--mtp", "--tp", "8")
    on_hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    assert ("device: NVIDIA" if on_hopper else "running through the CPU path") in result.stdout
    assert "step   2:" in result.stdout and "tokens/s" in result.stdout
    assert result.stdout.rstrip().endswith("PASS")


def test_multi_layer_decode_grows_into_new_pages():
    # At most 62 tokens, then 2 per step for 40 steps: every sequence crosses a page edge.
    result = run_example(str(EXAMPLES / "multi_layer_decode.py"),
                         "--layers", "1", "--batch", "3", "--context", "62", "--steps", "40", "--mtp", "--tp", "16")
    assert result.stdout.rstrip().endswith("PASS")


def test_paged_batch_takes_a_new_page_when_the_last_one_is_full():
    mld = load_example("multi_layer_decode")
    allocator = mld.PageAllocator(16, torch.Generator().manual_seed(0))
    batch = mld.PagedBatch([63, 10], max_pages=4, allocator=allocator)
    first_page = int(batch.table[0, 0])
    assert batch.first_slots[:63].tolist() == [first_page * 64 + t for t in range(63)]

    slots = batch.append_tokens([2, 1]).tolist()

    assert batch.lengths == [65, 11] and batch.num_pages == [2, 1]
    second_page = int(batch.table[0, 1])
    assert second_page not in (first_page, int(batch.table[1, 0]))
    assert slots == [first_page * 64 + 63, second_page * 64, int(batch.table[1, 0]) * 64 + 10]


@pytest.mark.gpu
def test_multi_layer_decode_with_cuda_graph_passes_on_the_gpu():
    result = run_example(str(EXAMPLES / "multi_layer_decode.py"),
                         "--layers", "4", "--batch", "8", "--context", "1000", "--steps", "4", "--mtp", "--cuda-graph")
    assert "captured" in result.stdout
    assert result.stdout.rstrip().endswith("PASS")


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    return run_example("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                       str(EXAMPLES / "context_parallel_decode.py"), *args)


@pytest.mark.parametrize("mtp", [False, True])
def test_context_parallel_decode_on_two_cpu_ranks_passes_its_check(mtp):
    result = torchrun(2, "--backend", "gloo", "--batch", "2", "--context", "300", *(["--mtp"] if mtp else []))
    assert "rank 1:" in result.stdout
    assert "PASS" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_context_parallel_decode_on_two_gpus_passes_its_check(monkeypatch):
    # NVLink multicast off unless asked for, as the README's commands run it: some
    # machines do not allow it, and two ranks' all_gather does not need it.
    monkeypatch.setenv("NCCL_NVLS_ENABLE", os.environ.get("NCCL_NVLS_ENABLE", "0"))
    result = torchrun(2, "--mtp", "--iters", "3")
    assert "PASS" in result.stdout


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("s_q", [1, 2])
def test_context_parallel_shards_merge_into_the_whole_attention(world, s_q):
    # Lengths around page edges, shorter than a page, shorter than s_q, and empty.
    cp = load_example("context_parallel_decode")
    lengths = [0, 1, 2, 63, 64, 65, 129, 300, 64 * world, 64 * world + 1]
    x = make_decode_inputs(len(lengths), s_q, 16, seqlens=lengths, dtype=torch.float32, seed=7)
    whole_out, whole_lse = flash_mla_reference(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, causal=True)

    out = lse = None
    held = torch.zeros(len(lengths), dtype=torch.int64)
    for rank in range(world):
        local, causal = cp.shard(x, rank, world, s_q)
        assert causal == (rank == world - 1)
        held += local.cache_seqlens.long()
        part = flash_mla_reference(local.q, local.k_cache, local.block_table, local.cache_seqlens, 512, causal=causal)
        out, lse = part if out is None else merge_attention_states(out, lse, *part)

    assert held.tolist() == lengths  # every token on exactly one rank
    torch.testing.assert_close(out, whole_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, whole_lse, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_sparse_decode_example_runs_each_layout(layout):
    result = run_example(str(EXAMPLES / "sparse_decode.py"), "--layout", layout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("layer")]
    assert len(lines) == 3
    for line in lines:
        assert line.endswith("PASS"), line


def test_sparse_decode_example_exits_1_when_a_layer_fails(monkeypatch, capsys):
    sparse = load_example("sparse_decode")
    verdicts = iter([(True, "PASS"), (False, "FAIL"), (True, "PASS")])
    monkeypatch.setattr(sparse, "reference_verdict", lambda *tensors: next(verdicts))
    assert sparse.main([]) == 1
    assert [line.rsplit(" ", 1)[-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("layer")] == ["PASS", "FAIL", "PASS"]


def test_decode_step_runs_without_arguments_and_refuses_any():
    result = run_example(str(EXAMPLES / "decode_step.py"))
    assert "layer 2 checksum" in result.stdout
    with pytest.raises(SystemExit) as refused:
        load_example("decode_step").main(["--layers", "2"])
    assert refused.value.code == 2


@pytest.mark.parametrize("available, count, local_rank", [(False, 0, 0), (True, 1, 1)])
def test_context_parallel_decode_with_nccl_and_no_gpu_for_the_rank_says_use_gloo(monkeypatch, capsys, available,
                                                                                  count, local_rank):
    # No CUDA, or fewer GPUs than ranks: the hint, before set_device fails with torch's own error.
    cp = load_example("context_parallel_decode")
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    def set_device(device):
        raise AssertionError("set_device called for a GPU that is not there")

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    assert cp.main([]) == 2
    assert f"cuda:{local_rank} is not there ({count} CUDA GPUs found). Use --backend gloo" in capsys.readouterr().err
