"""benchmarks/bench_sparse.py without a GPU: its cases, FLOP count, arguments, inputs, and
one case followed through both implementations on the CPU."""

import types
from pathlib import Path

import pytest
from conftest import load_script

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sparse.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH)


def test_production_cases_are_flashmla_v32_production_cases(bench):
    Case = bench.Case
    assert bench.CASE_SETS["production"] == [
        Case(b, s_q=2, h_q=128, topk=2048, seqlen=32768, varlen=True) for b in (2, 64, 74, 128)
    ]


def test_peak_cases(bench):
    Case = bench.Case
    assert bench.CASE_SETS["peak"] == [
        Case(148, s_q=1, h_q=h_q, topk=16384, seqlen=32768, varlen=False) for h_q in (64, 128)
    ]


def test_all_is_production_then_peak_and_names_are_unique(bench):
    every = bench.CASE_SETS["all"]
    assert every == bench.CASE_SETS["production"] + bench.CASE_SETS["peak"]
    assert len({c.name for c in every}) == len(every) == 6
    assert bench.Case(148, 1, 64, 16384, 32768, False).name == "b148 s1 h64 topk16384 sk32768"
    assert bench.Case(2, 2, 128, 2048, 32768, True).name == "b2 s2 h128 topk2048 sk32768 var"


def test_flops_count_scores_and_values_of_every_head_and_index(bench):
    assert bench.sparse_flops(bench.Case(148, 1, 128, 16384, 32768, False)) == 2 * 148 * 1 * 128 * 16384 * (576 + 512)
    assert bench.sparse_flops(bench.Case(2, 2, 128, 2048, 32768, True)) == 2 * 2 * 2 * 128 * 2048 * 1088


def test_arguments(bench):
    args = bench.parse_args(["--cases", "peak", "--check", "--json", "sparse.json"])
    assert (args.cases, args.check, args.json, args.no_peers) == ("peak", True, "sparse.json", False)
    defaults = bench.parse_args([])
    assert (defaults.cases, defaults.check, defaults.json) == ("all", False, None)
    assert bench.parse_args(["--cases", "production", "--no-peers"]).no_peers
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "serving"])


def test_without_a_gpu_it_exits_2_saying_why(bench, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--cases", "peak"]) == 2
    assert "bench_sparse.py needs a CUDA GPU" in capsys.readouterr().err


def test_lengths_hold_at_least_topk_tokens(bench):
    case = bench.Case(64, 2, 128, 2048, 4096, True)
    seqlens = bench.case_seqlens(case, seed=0)
    assert seqlens.shape == (64,) and int(seqlens.min()) == 2048 and len(set(seqlens.tolist())) > 10
    assert bench.case_seqlens(bench.Case(3, 1, 64, 128, 500, False), seed=0).tolist() == [500] * 3


def test_indices_are_distinct_tokens_of_their_own_sequence(bench, monkeypatch):
    import torch

    from flashmla_cute import fp8_cache

    monkeypatch.setattr(bench, "CACHE_CHUNK_BLOCKS", 2)  # the cache drawn a few pages at a time
    case = bench.Case(3, 2, 64, 128, 300, True)
    seqlens = bench.case_seqlens(case, seed=1)
    x = bench.make_inputs(case, seqlens, seed=1, device="cpu")

    pages = [-(-n // 64) for n in seqlens.tolist()]
    assert x.q.shape == (3, 2, 64, 576) and x.q.dtype == torch.bfloat16
    assert x.k_cache.shape == (sum(pages), 64, 1, fp8_cache.BYTES_PER_TOKEN)
    assert x.k_cache.dtype == torch.float8_e4m3fn
    assert x.indices.shape == (3, 2, 128) and x.indices.dtype == torch.int32
    # Each sequence's pages are its own: no block is named by two sequences, and each
    # sequence names no more of them than it has.
    blocks = [set((x.indices[i] // 64).flatten().tolist()) for i in range(3)]
    assert all(len(blocks[i]) <= pages[i] for i in range(3))
    assert not (blocks[0] & blocks[1] or blocks[0] & blocks[2] or blocks[1] & blocks[2])
    for row in x.indices.flatten(0, 1):
        assert len(set(row.tolist())) == 128
    assert torch.isfinite(fp8_cache.dequantize_v32_kv_cache(x.k_cache).float()).all()


def test_a_case_runs_both_implementations_on_the_same_inputs(bench, monkeypatch):
    """FlashMLA stood in for by this package's own current API on the CPU: one plan per
    implementation and case, made by a first call, then reused for every input set."""
    import torch

    from flashmla_cute import api

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    plans = []

    def get_mla_metadata():
        plans.append(api.get_mla_metadata()[0])
        return plans[-1], None

    def flash_mla_with_kvcache(*args, **kwargs):
        assert args[2:7] == (None, None, 512, plans[-1], None) and kwargs["is_fp8_kvcache"] is True
        return api.flash_mla_with_kvcache(*args, **kwargs)

    peer = types.SimpleNamespace(get_mla_metadata=get_mla_metadata, flash_mla_with_kvcache=flash_mla_with_kvcache)
    times = iter([0.5, 0.4])  # ours, FlashMLA
    calls = []

    def timer(fn):
        fn(), fn()  # a timer calls fn repeatedly: the input sets rotate
        calls.append(1)
        return next(times)

    case = bench.Case(2, 1, 64, 64, 200, True)
    row = bench.run_case({bench.OURS: api, bench.PEER: peer}, case, timer, l2=10**6, check=True, seed=3,
                         device="cpu")

    assert bench.Case.of_row(row) == case
    assert row["input_sets"] > 1  # small inputs: several sets, rotated
    assert (row["ms"], row["flash_mla_head_ms"]) == (0.5, 0.4)
    assert row["tflops"] == pytest.approx(bench.sparse_flops(case) / 0.5e-3 / 1e12)
    assert row["ratio"] == pytest.approx(0.8) and row["faster_peer"] == bench.PEER
    assert row["cos_out"] < 1e-5 and row["cos_lse"] < 1e-5  # ours against the reference
    assert row["flash_mla_head_cos_out"] == 0.0 and row["flash_mla_head_cos_lse"] == 0.0  # against ours
    assert len(plans) == 1 and plans[0].have_initialized and plans[0].config.topk == 64
