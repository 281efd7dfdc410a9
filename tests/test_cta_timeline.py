"""benchmarks/cta_timeline.py without a GPU: its stamped kernel compiles for sm_90a (the
methods it wraps still exist), and its summary of a trace."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import load_script

TOOL = Path(__file__).resolve().parent.parent / "benchmarks" / "cta_timeline.py"


def test_stamped_kernel_compiles_for_sm90a(tmp_path):
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", FLASHMLA_CUTE_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(TOOL), "--compile-only"], env=env, capture_output=True, text=True,
                          check=True)
    assert "compiled the stamped kernel" in done.stdout


def test_summary_times_points_from_the_first_start_and_tells_the_ends_spread(capsys):
    tool = load_script(TOOL)
    us = 1000
    rows = [[0, 90 * us, 100 * us, 0, 91 * us, 100 * us],
            [5 * us, 95 * us, 104 * us, 5 * us, 96 * us, 105 * us],
            [2 * us, 80 * us, 90 * us, 2 * us, 81 * us, 92 * us]]
    tool.summarize(rows, "case")
    out = capsys.readouterr().out
    assert "3 CTAs stamped" in out
    assert "right end" in out and "max    105.0 us" in out
    assert "the last CTA ends 5.0 us after the median one; 1 of 3 CTAs end in the last 3% of the span" in out
