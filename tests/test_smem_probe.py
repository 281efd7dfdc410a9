"""benchmarks/smem_probe.py: the parts that run without a GPU."""

import argparse
from pathlib import Path

import pytest

from conftest import load_script

probe = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "smem_probe.py")


def test_a_case_is_four_positive_integers():
    assert probe.parse_case("128,4096,128,1") == (128, 4096, 128, 1)
    for bad in ("128,4096,128", "128,4096,128,0", "128,4096,h128,1", "128,4096,128,1,2"):
        with pytest.raises(argparse.ArgumentTypeError, match="b,seqlen,h_q,s_q"):
            probe.parse_case(bad)
