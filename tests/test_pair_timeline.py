"""The pair-timeline tool (``benchmarks/pair_timeline.py``) wraps the decode kernel's
steps by name, so it is compiled here, without a GPU, to catch a renamed step; and it
leaves the package's kernel as it was."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import load_script

TOOL = Path(__file__).resolve().parent.parent / "benchmarks" / "pair_timeline.py"


def test_stamped_kernel_compiles_for_sm90a(tmp_path):
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", FLASHMLA_CUTE_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(TOOL), "--compile-only"], env=env, capture_output=True, text=True,
                          check=True)
    roles = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    for step in ("start", "S done", "waited right_stats", "released 0-3", "end"):
        assert step in roles["left"].split("; "), roles["left"]
    for step in ("start", "S done", "waited left_stats", "arrived right_stats", "end"):
        assert step in roles["right"].split("; "), roles["right"]
    assert "acquired 0-3 of K0" in roles["producer"]


def test_the_package_kernel_is_left_as_it_was():
    from flashmla_cute.kernels import consumer_barriers, kv_stages

    tool = load_script(TOOL)
    before = [kv_stages.KvStages.__dict__[n] for n in ("wait", "release", "load")]
    create = consumer_barriers.ConsumerBarriers.__dict__["create"]
    with tool.stamped_steps(tool.Stamps(0)):
        assert kv_stages.KvStages.__dict__["wait"] is not before[0]
    assert [kv_stages.KvStages.__dict__[n] for n in ("wait", "release", "load")] == before
    assert consumer_barriers.ConsumerBarriers.__dict__["create"] is create
