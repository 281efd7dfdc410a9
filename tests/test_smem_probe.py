"""benchmarks/smem_probe.py: the parts that run without a GPU."""

import argparse
from pathlib import Path

import pytest

from conftest import load_script

probe = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "smem_probe.py")


def test_a_case_is_four_positive_integers_and_maybe_var():
    # The timeline tools' cases (pair_timeline.parse_case).
    assert probe.parse_case("128,4096,128,1") == (128, 4096, 128, 1, False)
    assert probe.parse_case("128,4096,128,1,var") == (128, 4096, 128, 1, True)
    for bad in ("128,4096,128", "128,4096,128,0", "128,4096,h128,1", "128,4096,128,1,2"):
        with pytest.raises(argparse.ArgumentTypeError, match="B,SEQLEN,H_Q,S_Q"):
            probe.parse_case(bad)


def test_it_makes_at_least_one_call(monkeypatch, capsys):
    # No call would leave nothing to profile and no output to check.
    monkeypatch.setattr("sys.argv", ["smem_probe.py", "--calls", "0"])
    with pytest.raises(SystemExit):
        probe.main()
    assert "must be at least 1, got 0" in capsys.readouterr().err
