"""benchmarks/sparse_plan_probe.py without a GPU: the cases it picks by default, and a
clean refusal where there is no Hopper GPU."""

import re
from pathlib import Path

import pytest
import torch
from conftest import load_script

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def probe():
    return load_script(BENCHMARKS / "sparse_plan_probe.py")


def test_by_default_it_probes_the_smallest_batches(probe):
    bench = load_script(BENCHMARKS / "bench_sparse.py")
    picked = [case for case in bench.CASE_SETS["all"] if re.search(probe.SMALLEST_BATCHES, case.name)]
    assert picked == [case for case in bench.CASE_SETS["all"] if case.b == 2]
    assert len(picked) == 5  # V3.2's and the four MODEL1 configurations'


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_without_a_gpu_it_says_so_and_exits_2(probe, capsys):
    assert probe.main(["--splits", "8"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
