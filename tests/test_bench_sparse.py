"""benchmarks/bench_sparse.py without a GPU: its cases (V3.2's and MODEL1's), FLOP count,
arguments, inputs (with an extra cache for MODEL1), and one case of each layout followed
through both implementations on the CPU."""

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


def test_model1_cases_are_flashmla_model1_production_configurations(bench):
    Case = bench.Case
    configs = [  # FlashMLA's configurations 1 to 4: h_q, extra_topk, extra page size, extra_topk_length
        (64, 512, 64, False), (128, 1024, 64, False), (64, 1024, 2, True), (128, 1024, 2, True),
    ]
    assert bench.CASE_SETS["model1"] == [
        Case(b, s_q=2, h_q=h_q, topk=128, seqlen=16384, varlen=True, layout="MODEL1", page_size=256,
             extra_topk=extra_topk, extra_seqlen=16384, extra_page_size=extra_page, extra_topk_length=extra_length)
        for h_q, extra_topk, extra_page, extra_length in configs
        for b in (2, 64, 74, 128, 148)
    ]


def test_all_is_production_then_peak_then_model1_and_names_are_unique(bench):
    every = bench.CASE_SETS["all"]
    assert every == bench.CASE_SETS["production"] + bench.CASE_SETS["peak"] + bench.CASE_SETS["model1"]
    assert len({c.name for c in every}) == len(every) == 26
    assert bench.Case(148, 1, 64, 16384, 32768, False).name == "b148 s1 h64 topk16384 sk32768"
    assert bench.Case(2, 2, 128, 2048, 32768, True).name == "b2 s2 h128 topk2048 sk32768 var"
    model1 = bench.CASE_SETS["model1"]
    assert model1[0].name == "MODEL1 b2 s2 h64 topk128+512 sk16384+16384 page256+64 var"
    assert model1[-1].name == "MODEL1 b148 s2 h128 topk128+1024 sk16384+16384 page256+2 var extralen"


def test_flops_count_scores_and_values_of_every_head_and_index(bench):
    assert bench.sparse_flops(bench.Case(148, 1, 128, 16384, 32768, False)) == 2 * 148 * 1 * 128 * 16384 * (576 + 512)
    assert bench.sparse_flops(bench.Case(2, 2, 128, 2048, 32768, True)) == 2 * 2 * 2 * 128 * 2048 * 1088


def test_model1_flops_count_both_caches_entries_at_d_qk_512(bench):
    """Every extra entry counts, extra_topk_length or not (configurations 3 and 4)."""
    for case in bench.CASE_SETS["model1"]:
        assert bench.sparse_flops(case) == 2 * case.b * 2 * case.h_q * (128 + case.extra_topk) * (512 + 512)
    assert bench.sparse_flops(bench.CASE_SETS["model1"][0]) == 2 * 2 * 2 * 64 * (128 + 512) * 1024


def test_of_row_reads_rows_of_earlier_runs_as_v32_cases(bench):
    old_row = {"b": 2, "s_q": 2, "h_q": 128, "topk": 2048, "seqlen": 32768, "varlen": True, "ms": 0.03}
    assert bench.Case.of_row(old_row) == bench.Case(2, 2, 128, 2048, 32768, True)
    case = bench.CASE_SETS["model1"][-1]
    assert bench.Case.of_row({**case._asdict(), "ms": 0.1}) == case


def test_arguments(bench):
    args = bench.parse_args(["--cases", "peak", "--check", "--json", "sparse.json"])
    assert (args.cases, args.check, args.json, args.no_peers) == ("peak", True, "sparse.json", False)
    defaults = bench.parse_args([])
    assert (defaults.cases, defaults.check, defaults.json) == ("all", False, None)
    assert bench.parse_args(["--cases", "production", "--no-peers"]).no_peers
    assert bench.parse_args(["--cases", "model1"]).cases == "model1"
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


def test_extra_cache_lengths_are_drawn_apart_and_hold_at_least_extra_topk(bench):
    import torch

    case = bench.Case(64, 2, 64, 128, 600, True, layout="MODEL1", page_size=256, extra_topk=512, extra_seqlen=600,
                      extra_page_size=2)
    main = bench.case_seqlens(case, seed=0)
    extra = bench.case_seqlens(case, seed=0, extra=True)
    assert int(main.min()) == 128 and int(extra.min()) == 512
    assert not torch.equal(main, extra)


def test_extra_topk_length_is_drawn_once_per_case_in_range(bench):
    import torch

    with_length = bench.Case(128, 2, 64, 128, 16384, True, layout="MODEL1", page_size=256, extra_topk=1024,
                             extra_seqlen=16384, extra_page_size=2, extra_topk_length=True)
    without = with_length._replace(extra_topk_length=False)
    lengths = bench.case_extra_topk_length(with_length, seed=5)
    assert lengths.shape == (128,) and lengths.dtype == torch.int32
    assert 0 <= int(lengths.min()) and int(lengths.max()) <= 1024 and len(set(lengths.tolist())) > 50
    assert torch.equal(lengths, bench.case_extra_topk_length(with_length, seed=5))
    assert bench.case_extra_topk_length(without, seed=5) is None


def test_indices_are_distinct_tokens_of_their_own_sequence(bench, monkeypatch):
    import torch

    from flashmla_cute import fp8_cache

    monkeypatch.setattr(bench, "CACHE_CHUNK_TOKENS", 2 * 64)  # the cache drawn a few pages at a time
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


def test_model1_inputs_have_an_extra_cache_of_its_own_pages(bench, monkeypatch):
    import torch

    from flashmla_cute import fp8_cache

    monkeypatch.setattr(bench, "CACHE_CHUNK_TOKENS", 3 * 8)  # a few pages at a time, in both caches
    case = bench.Case(3, 2, 64, 128, 300, True, layout="MODEL1", page_size=8, extra_topk=64, extra_seqlen=200,
                      extra_page_size=3, extra_topk_length=True)
    seqlens, extra_seqlens = bench.case_seqlens(case, seed=1), bench.case_seqlens(case, seed=1, extra=True)
    extra_topk_length = bench.case_extra_topk_length(case, seed=1)
    x = bench.make_inputs(case, seqlens, 1, "cpu", extra_seqlens, extra_topk_length)

    assert x.q.shape == (3, 2, 64, 512) and x.q.dtype == torch.bfloat16
    for cache, indices, lengths, page, topk in ((x.k_cache, x.indices, seqlens, 8, 128),
                                                (x.extra_k_cache, x.extra_indices, extra_seqlens, 3, 64)):
        blocks = sum(-(-n // page) for n in lengths.tolist())
        assert cache.shape == (blocks, page, 1, fp8_cache.MODEL1_BYTES_PER_TOKEN)
        assert cache.dtype == torch.float8_e4m3fn and cache.stride(0) == fp8_cache.model1_page_bytes(page)
        assert indices.shape == (3, 2, topk) and indices.dtype == torch.int32
        assert bool(((indices >= 0) & (indices < blocks * page)).all())
        for row in indices.flatten(0, 1):
            assert len(set(row.tolist())) == topk
        assert torch.isfinite(fp8_cache.dequantize_model1_kv_cache(cache).float()).all()
    assert torch.equal(x.extra_topk_length, extra_topk_length)


@pytest.mark.parametrize("case", [
    (2, 1, 64, 64, 200, True),
    (2, 2, 64, 64, 200, True, "MODEL1", 16, 128, 150, 2, True),
], ids=["V3.2", "MODEL1-extra"])
def test_a_case_runs_both_implementations_on_the_same_inputs(bench, monkeypatch, case):
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

    case = bench.Case(*case)
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
    assert plans[0].config.extra_topk == (case.extra_topk or None)
