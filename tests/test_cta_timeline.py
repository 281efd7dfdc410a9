"""benchmarks/cta_timeline.py without a GPU: its stamped kernel compiles for sm_90a (the
methods it wraps still exist), and its summary of a trace."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

TOOL = Path(__file__).resolve().parent.parent / "benchmarks" / "cta_timeline.py"


@pytest.mark.parametrize("flags", [[], ["--loads-only"]], ids=["full", "loads-only"])
def test_stamped_kernel_compiles_for_sm90a(tmp_path, flags):
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", FLASHMLA_CUTE_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(TOOL), "--compile-only", *flags], env=env, capture_output=True,
                          text=True, check=True)
    assert "compiled the stamped kernel" in done.stdout


def test_summary_times_points_from_the_first_start_and_tells_the_ends_spread(capsys):
    tool = load_script(TOOL)
    us = 1000
    # Per CTA: the six points (ns), each consumer's time in pairs (ns) and its pairs, its SM.
    rows = [[0, 90 * us, 100 * us, 0, 91 * us, 100 * us, 80 * us, 20, 80 * us, 20, 3],
            [5 * us, 95 * us, 104 * us, 5 * us, 96 * us, 105 * us, 88 * us, 20, 90 * us, 20, 9],
            [2 * us, 80 * us, 90 * us, 2 * us, 81 * us, 92 * us, 72 * us, 20, 72 * us, 20, 1]]
    tool.summarize(rows, "case")
    out = capsys.readouterr().out
    assert "3 CTAs stamped" in out
    assert "right end" in out and "max    105.0 us" in out
    assert ("of the CTAs with pairs, the last ends 5.0 us after the median one and 6.0 us after the mean; "
            "1 of 3 end in the last 3% of the span") in out
    assert "left time a pair     min      3.6  p10      3.6  median      4.0  p90      4.0  max      4.4 us" in out
    assert "left share in pairs  median 81.8%, min 80.0% (3 CTAs with pairs)" in out
    # SMs 3 and 1 share the first bin of eight (4.0 and 3.6 us a pair), SM 9 the second.
    assert "left time a pair by SM (first SM of each 8: mean us) 0: 3.80, 8: 4.40" in out


def test_part_work_counts_each_parts_fragments_and_its_blocks_in_pairs():
    tool = load_script(TOOL)
    # Three sequences of 5, 2 and 4 blocks (64 tokens each, the last one partly full).
    seqlens = [5 * 64, 2 * 64, 3 * 64 + 1]
    meta = [[0, 0, 0, 3, 0, 0, 0, 0],  # blocks 0-2 of sequence 0
            [0, 3, 2, 4, 1, 0, 0, 0],  # its blocks 3-4, sequence 1 whole, sequence 2 whole
            [3, 0, 2, 0, 0, 0, 0, 0]]  # empty
    assert tool.part_work(meta, seqlens) == [(1, 2), (3, 1 + 1 + 2), (0, 0)]


def test_fragment_cost_is_fitted_in_blocks_and_the_ends_listed_by_fragment_count(capsys):
    tool = load_script(TOOL)
    us = 1000
    # Parts of (fragments, pairs); a CTA lives 3 us a pair + 2 us a fragment + 1 us.
    work = [(1, 10), (2, 8), (3, 6), (1, 12)]
    rows = {}
    for part, (fragments, pairs) in enumerate(work):
        life = (3 * pairs + 2 * fragments + 1) * us
        rows[part] = [part * us, 0, part * us + life, part * us, 0, part * us + life, 0, pairs, 0, pairs, part]
    tool.print_fragment_cost(rows, work, tiles=1)
    out = capsys.readouterr().out
    assert "life of a CTA = 3.000 us a pair + 2.00 us a fragment + 1.0 us" in out
    assert "a fragment costs 1.33 blocks (the planner charges 4)" in out
    assert "1: 2, 11.0, 37.5; 2: 1, 8.0, 30.0; 3: 1, 6.0, 27.0" in out


def test_cases_take_fixed_or_varied_lengths():
    tool = load_script(TOOL.parent / "pair_timeline.py")
    assert tool.parse_case("128,8192,128,2") == (128, 8192, 128, 2, False)
    assert tool.parse_case("128,8192,128,2,var") == (128, 8192, 128, 2, True)
    for bad in ("128,8192,128", "128,8192,128,2,varied", "a,b,c,d"):
        with pytest.raises(Exception, match="B,SEQLEN,H_Q,S_Q"):
            tool.parse_case(bad)
