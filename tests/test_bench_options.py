"""benchmarks/bench_merge.py and bench_overhead.py without a GPU: their options are checked
by the parser, and without a Hopper GPU they exit 2 saying why."""

from pathlib import Path

import pytest
import torch
from conftest import load_script

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench_merge():
    return load_script(BENCHMARKS / "bench_merge.py")


@pytest.fixture(scope="module")
def bench_overhead():
    return load_script(BENCHMARKS / "bench_overhead.py")


def test_bench_merge_has_help_and_refuses_arguments(bench_merge, capsys):
    with pytest.raises(SystemExit) as shown:
        bench_merge.main(["--help"])
    assert shown.value.code == 0 and "merge kernel" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        bench_merge.main(["--cases", "all"])
    assert refused.value.code == 2


@pytest.mark.parametrize("script", ["bench_merge", "bench_overhead"])
def test_without_a_gpu_it_exits_2_saying_why(script, bench_merge, bench_overhead, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert {"bench_merge": bench_merge, "bench_overhead": bench_overhead}[script].main([]) == 2
    assert f"{script}.py needs a" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--calls", "0"), ("--batches", "0"), ("--calls", "-5"),
                                           ("--warmup", "-1"), ("--warmup", "nan")])
def test_bench_overhead_refuses_counts_below_one_and_a_negative_warmup(bench_overhead, capsys, option, value):
    with pytest.raises(SystemExit) as refused:
        bench_overhead.main([option, value])
    assert refused.value.code == 2 and option in capsys.readouterr().err
