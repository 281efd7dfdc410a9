"""The sparse CTA-timeline tool (``benchmarks/sparse_cta_timeline.py``) wraps the pair
kernel's methods by name, so it is compiled here, without a GPU, to catch a renamed one;
its summary is read on a made-up trace."""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import load_script

TOOL = Path(__file__).resolve().parent.parent / "benchmarks" / "sparse_cta_timeline.py"


def test_stamped_kernel_compiles_for_sm90a(tmp_path):
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", FLASHMLA_CUTE_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(TOOL), "--compile-only"], env=env, capture_output=True, text=True,
                          check=True)
    compiled = re.findall(r"compiled the stamped kernel \((\w+)\)", done.stdout)
    assert len(compiled) == len(load_script(TOOL).PAIR_VARIANTS), done.stdout


def test_it_traces_the_cases_that_run_the_pair_kernel():
    """V3.2's production cases and MODEL1's with two head tiles (h_q 64 runs the
    eight-warp kernel, which has no stamps), each of a layout the tool compiles."""
    from flashmla_cute import fp8_cache
    from flashmla_cute.sparse_plan import HEAD_TILE

    tool = load_script(TOOL)
    cases = tool.traced_cases()
    key_of = {layout.name: layout.key for layout in fp8_cache.LAYOUTS}
    assert {key_of[case.layout] for case in cases} == {"v32", "model1"}
    assert all(case.h_q > HEAD_TILE for case in cases)
    compiled = set(tool.PAIR_VARIANTS)
    assert all((key_of[case.layout], case.extra_topk > 0) in compiled for case in cases)


def test_the_stamped_class_overrides_only_its_own_methods():
    from flashmla_cute.kernels.sparse_pair_sm90 import SparsePairDecodeSm90

    tool = load_script(TOOL)
    before = dict(SparsePairDecodeSm90.__dict__)
    stamped = tool.stamped_kernel_class(tool.Stamps(0))
    assert issubclass(stamped, SparsePairDecodeSm90)
    assert dict(SparsePairDecodeSm90.__dict__) == before
    for name in ("start_q_load", "wait_for_peer", "consumer", "consume_scores", "consume_values", "wait_tile",
                 "write_row", "finish_pair", "gather", "fetch", "unpack"):
        # A method renamed in the kernel would leave its stamp untaken, silently.
        assert callable(getattr(SparsePairDecodeSm90, name, None)), f"the pair kernel has no {name}"
        assert name in stamped.__dict__, name


def test_summary_reads_each_point_from_the_first_entry(capsys):
    import torch

    tool = load_script(TOOL)
    trace = torch.full((tool.MAX_CTAS, len(tool.POINTS)), -1, dtype=torch.int64)
    entry, exit_ = tool.POINTS.index("entry"), tool.POINTS.index("exit")
    first_tile = tool.POINTS.index("first tile full")
    for cta, start in enumerate((1_000_000, 1_002_000, 1_004_000)):
        trace[cta, entry] = start
        trace[cta, first_tile] = start + 5_000
        trace[cta, exit_] = start + 10_000
    tool.summarize(trace, "synthetic")
    out = capsys.readouterr().out
    assert "3 CTAs stamped" in out
    assert "smallest step between stamps: 1000 ns" in out  # 1.004 ms entry, 1.005 ms first tile
    medians = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^  (.+?) median\s+(-?[\d.]+)", out, re.M)}
    assert medians["entry"] == 2.0
    assert medians["first tile full"] == 7.0
    assert medians["life (exit - entry)"] == 10.0
    assert "setup done" not in medians  # no stamp, no line
