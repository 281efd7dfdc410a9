"""benchmarks/bench_decode.py without a GPU: its case sets, arguments, peer ratios, CSV, and
the plot drawn from a saved JSON."""

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import load_script

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_decode.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH)


def test_all_is_the_32_case_batch_128_grid(bench):
    cases = bench.CASE_SETS["all"]
    assert len(cases) == 32 and len(set(cases)) == 32
    assert {c.b for c in cases} == {128}
    assert {(c.seqlen, c.h_q, c.s_q, c.varlen) for c in cases} == {
        (sk, h, s, v) for sk in (4096, 8192) for h in (16, 32, 64, 128) for s in (1, 2) for v in (False, True)
    }


def test_quick_is_part_of_the_grid(bench):
    assert len(bench.CASE_SETS["quick"]) == 5
    assert set(bench.CASE_SETS["quick"]) <= set(bench.CASE_SETS["all"])


def test_serving_cases(bench):
    Case = bench.Case
    expected = [Case(b, sk, h, 1, False) for b in (1, 8, 32) for sk in (1024, 16384) for h in (16, 128)]
    expected += [Case(4, 32768, 16, 1, False), Case(64, 2048, 32, 2, True)]
    assert bench.CASE_SETS["serving"] == expected
    assert len(expected) == 14


def test_every_anchor_is_a_case_and_case_names_are_unique(bench):
    every = [c for cases in bench.CASE_SETS.values() for c in cases]
    assert set(bench.ANCHORS) <= set(every)
    assert len({c.name for c in set(every)}) == len(set(every))
    assert bench.Case(64, 2048, 32, 2, True).name == "b64 sk2048 h32 s2 var"


def test_arguments(bench, tmp_path):
    args = bench.parse_args(["--cases", "serving", "--check", "--csv", "r.csv", "--plot", "r.png"])
    assert (args.cases, args.check, args.csv, args.plot, args.no_peers) == ("serving", True, "r.csv", "r.png", False)
    assert bench.parse_args([]).cases == "all"
    source = tmp_path / "r.json"
    source.write_text(json.dumps(synthetic_record(bench, ())))
    with pytest.raises(SystemExit):
        bench.parse_args(["--plot-from", str(source)])  # nowhere to draw
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "huge"])


def test_match_picks_cases_by_name_and_refuses_a_pattern_that_picks_none(bench):
    args = bench.parse_args(["--cases", "all", "--match", "h128 s. var"])
    assert [c.name for _, c in bench.selected_cases(args)] == [
        f"b128 sk{sk} h128 s{s_q} var" for sk in (4096, 8192) for s_q in (1, 2)]
    assert [c for _, c in bench.selected_cases(bench.parse_args(["--cases", "quick"]))] == bench.CASE_SETS["quick"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "serving", "--match", "b128"])  # the serving cases have no b = 128


def test_match_must_be_a_regular_expression(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--match", "("])
    assert "--match '(' is not a regular expression" in capsys.readouterr().err


def test_plot_from_must_be_a_saved_dense_table(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--plot-from", str(tmp_path / "missing.json"), "--plot", "r.png"])
    assert "argument --plot-from: cannot read" in capsys.readouterr().err
    sparse = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "h100-sparse.json"
    with pytest.raises(SystemExit):
        bench.parse_args(["--plot-from", str(sparse), "--plot", "r.png"])  # bench_sparse.py's: no copy ceiling
    err = capsys.readouterr().err
    assert "argument --plot-from:" in err and "lacks copy" in err


def test_a_matched_case_keeps_its_position_in_the_whole_set_so_its_inputs_are_the_same(bench):
    whole = bench.CASE_SETS["all"]
    matched = bench.selected_cases(bench.parse_args(["--cases", "all", "--match", "sk8192 h128 s2 var"]))
    assert matched == [(whole.index(bench.Case(128, 8192, 128, 2, True)), bench.Case(128, 8192, 128, 2, True))]
    assert matched[0][0] == len(whole) - 1


def synthetic_row(bench, case, ms, peers_ms):
    flops, nbytes = 1e12 * ms * 1e-3 * 400, 1e9 * ms * 1e-3 * 2500
    row = {**case._asdict(), "h_kv": 1, "flops": flops, "bytes": nbytes, "ms": ms,
           "gbps": nbytes / (ms * 1e-3) / 1e9, "tflops": flops / (ms * 1e-3) / 1e12}
    for peer, peer_ms in peers_ms.items():
        row[f"{peer}_ms"] = peer_ms
        row[f"{peer}_gbps"] = nbytes / (peer_ms * 1e-3) / 1e9
        row[f"{peer}_tflops"] = flops / (peer_ms * 1e-3) / 1e12
    row.update(bench.compare_with_peers(row, list(peers_ms)))
    return row


def synthetic_record(bench, peers=("flash_mla", "flash_mla_head")):
    cases = bench.CASE_SETS["serving"][:3]
    rows = [synthetic_row(bench, case, 0.1 * (i + 1), {p: 0.1 * (i + 1) * (0.9 + 0.2 * k) for k, p in enumerate(peers)})
            for i, case in enumerate(cases)]
    return {
        "device": "NVIDIA H100 80GB HBM3", "time": "2026-01-02 03:04:05", "dtype": "bfloat16",
        "case_set": "serving", "copy": {"gbps": 3000.0}, "matmul": {"tflops": 700.0},
        "peers": list(peers), "geomean": bench.ratio_summary(rows, list(peers)), "cases": rows,
    }


def test_ratio_is_the_faster_peer_over_ours(bench):
    row = synthetic_row(bench, bench.Case(1, 1024, 16), 0.02, {"flash_mla": 0.015, "flash_mla_head": 0.016})
    assert row["faster_peer"] == "flash_mla"
    assert row["ratio"] == pytest.approx(0.75)
    assert bench.compare_with_peers(row, []) == {}


def test_geometric_mean_of_ratios(bench):
    rows = [{"ratio": 0.5, "ms": 1.0, "flash_mla_ms": 0.5}, {"ratio": 2.0, "ms": 1.0, "flash_mla_ms": 2.0}]
    assert bench.ratio_summary(rows, ["flash_mla"]) == pytest.approx({"ratio": 1.0, "flash_mla": 1.0})
    assert bench.ratio_summary(rows, []) == {}
    assert math.isnan(bench.geometric_mean([]))


def test_csv_has_the_run_and_every_column_of_every_case(bench, tmp_path):
    record = synthetic_record(bench)
    path = tmp_path / "results.csv"
    bench.write_csv(record, str(path))
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(record["cases"])
    first = rows[0]
    assert first["device"] == "NVIDIA H100 80GB HBM3" and first["time"] == "2026-01-02 03:04:05"
    assert float(first["copy_gbps"]) == 3000.0 and float(first["matmul_tflops"]) == 700.0
    assert first["case"] == "b1 sk1024 h16 s1"
    for key in ("ms", "gbps", "tflops", "flash_mla_ms", "flash_mla_head_tflops", "ratio"):
        assert float(first[key]) > 0
    assert first["faster_peer"] == "flash_mla"


@pytest.mark.parametrize("peers", [("flash_mla", "flash_mla_head"), ()])
def test_plot_from_a_saved_json_needs_no_gpu(bench, tmp_path, peers):
    pytest.importorskip("matplotlib")
    source = tmp_path / "results.json"
    source.write_text(json.dumps(synthetic_record(bench, peers)))
    image = tmp_path / "results.png"

    assert bench.main(["--plot-from", str(source), "--plot", str(image)]) == 0

    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(bench, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        bench.import_pyplot()


class FakeHeadSched:
    """FlashMLA-current's plan object: filled by the first decode call."""

    def __init__(self):
        self.plans = 0


def fake_peers(plans: list):
    """Both FlashMLA APIs, computed by this package's CPU path: the benchmark's calls to them
    can be followed without a GPU. FlashMLA-current's plan objects are appended to ``plans``."""
    import types

    import flashmla_cute

    def head_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, sched, num_splits, causal):
        assert num_splits is None
        if not hasattr(sched, "meta"):
            sched.meta = flashmla_cute.get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2] // k_cache.shape[2],
                                                        k_cache.shape[2])
            sched.plans += 1
        return flashmla_cute.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, *sched.meta,
                                                    causal=causal)

    def head_plan():
        plans.append(FakeHeadSched())
        return plans[-1], None

    head = types.SimpleNamespace(get_mla_metadata=head_plan, flash_mla_with_kvcache=head_decode)
    return {"flash_mla": flashmla_cute, "flash_mla_head": head}


def test_every_implementation_runs_on_the_same_inputs_and_is_compared_with_ours(bench, monkeypatch):
    import torch

    import flashmla_cute
    from flashmla_cute import testing

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    plans = []
    peers = fake_peers(plans)
    times = iter([0.5, 0.4, 0.6])  # ours, flash_mla, flash_mla_head

    def timer(fn):
        fn(), fn()  # a timer calls fn repeatedly: the input sets rotate
        return next(times)

    case = bench.Case(2, 100, 16, 2, True)
    row = bench.run_case({bench.OURS: flashmla_cute, **peers}, testing, case, torch.bfloat16, timer,
                         l2=10**6, check=True, seed=1, device="cpu")

    assert bench.Case.of_row(row) == case
    assert row["input_sets"] > 1  # small inputs: several sets, rotated
    assert (row["ms"], row["flash_mla_ms"], row["flash_mla_head_ms"]) == (0.5, 0.4, 0.6)
    assert row["gbps"] == pytest.approx(row["bytes"] / 0.5e-3 / 1e9)
    assert row["flash_mla_tflops"] == pytest.approx(row["flops"] / 0.4e-3 / 1e12)
    assert row["ratio"] == pytest.approx(0.8) and row["faster_peer"] == "flash_mla"
    assert row["cos_out"] < 1e-5 and row["cos_lse"] < 1e-5  # ours against the reference
    assert row["flash_mla_cos_out"] == 0.0 and row["flash_mla_head_cos_lse"] == 0.0  # peers against ours
    assert len(plans) == 1 and plans[0].plans == 1  # planned by its first call, then reused for every set


def test_rounds_default_to_three_and_must_be_at_least_one(bench):
    assert bench.parse_args([]).rounds == 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])


def test_lengths_rounded_up_to_a_multiple_keep_the_draw_and_must_be_positive(bench):
    from flashmla_cute import testing

    case = bench.Case(128, 8192, 128, 2, True)
    drawn = bench.case_seqlens(testing, case, seed=31000)
    assert bench.parse_args([]).lengths_multiple == 1
    assert bench.case_seqlens(testing, case, seed=31000, multiple=1).tolist() == drawn.tolist()
    for multiple in (64, 128):
        rounded = bench.case_seqlens(testing, case, seed=31000, multiple=multiple)
        assert (rounded % multiple == 0).all() and (rounded >= drawn).all() and (rounded - drawn < multiple).all()
    with pytest.raises(SystemExit):
        bench.parse_args(["--lengths-multiple", "0"])


def test_every_implementation_is_timed_in_rounds_in_turned_orders_and_keeps_its_median(bench, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    order = []
    seconds = {"flashmla_cute": iter([3.0, 1.0, 2.0]), "flash_mla": iter([5.0, 4.0, 6.0]),
               "flash_mla_head": iter([7.0, 9.0, 8.0])}

    def caller(impl):
        def call(inputs):
            order.append(impl)
            return torch.zeros(1), torch.zeros(1)
        return call

    def timer(fn):
        fn()
        return next(seconds[order[-1]])

    calls = {impl: caller(impl) for impl in seconds}
    result = {}
    bench.time_and_check(calls, [None], None, timer, flops=1e9, nbytes=None, result=result, rounds=3)
    ours, feb, head = "flashmla_cute", "flash_mla", "flash_mla_head"
    assert order[3:] == [ours, feb, head, feb, head, ours, head, ours, feb]  # after one untimed call each
    assert (result["ms"], result["flash_mla_ms"], result["flash_mla_head_ms"]) == (2.0, 5.0, 8.0)
    assert result["ms_rounds"] == [3.0, 1.0, 2.0]


def test_confirm_times_only_the_cases_behind_again_in_passes_and_keeps_the_median(bench):
    rows = [{"ratio": 1.02}, {"ratio": 0.97}, {"ratio": 0.995}]
    again = {1: iter([1.01, 0.98]), 2: iter([1.004, 1.003])}
    order = []

    def rerun(n):
        order.append(n)
        return next(again[n])

    behind = bench.confirm_behind(rows, rerun, runs=2)
    assert order == [1, 2, 1, 2]  # passes over the cases behind, after the table
    assert behind == [rows[1], rows[2]]
    assert rows[1]["ratio_runs"] == [0.97, 1.01, 0.98] and rows[1]["ratio_median"] == 0.98
    assert rows[2]["ratio_runs"] == [0.995, 1.004, 1.003] and rows[2]["ratio_median"] == 1.003
    assert "ratio_runs" not in rows[0]  # ahead in the table: not timed again
    assert rows[1]["ratio"] == 0.97  # the table's own ratio stays the first run's


def test_confirm_needs_peers_and_a_count_of_at_least_zero(bench):
    assert bench.parse_args([]).confirm == 0
    assert bench.parse_args(["--confirm", "2"]).confirm == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--confirm", "-1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--confirm", "2", "--no-peers"])


def test_confirmation_prints_each_case_behind_with_its_runs_and_median(bench, capsys):
    row = {**bench.Case(128, 4096, 64, 2)._asdict(), "ratio": 0.97, "ratio_runs": [0.97, 1.01, 0.98],
           "ratio_median": 0.98}
    bench.print_confirmation([row], 2)
    out = capsys.readouterr().out
    assert "b128 sk4096 h64 s2: 0.970 / 1.010 / 0.980; median 0.980" in out
    assert "by the median: 0 of 1 at or above 1.00" in out
