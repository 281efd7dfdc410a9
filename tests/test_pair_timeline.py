"""The pair-timeline tool (``benchmarks/pair_timeline.py``) wraps the decode kernel's
steps by name, so it is compiled here, without a GPU, to catch a renamed step; and it
leaves the package's kernel as it was."""

import os
import re
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


def compiled_steps(tmp_path, option: str) -> dict:
    """Each role's stamped steps of the kernel ``--compile-only option`` builds."""
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", FLASHMLA_CUTE_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(TOOL), "--compile-only", option], env=env,
                          capture_output=True, text=True, check=True)
    roles = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    return {role: steps.split("; ") for role, steps in roles.items()}


def test_the_loads_only_kernel_compiles_for_sm90a(tmp_path):
    # Its consumers only wait for and release each pair's K tiles: no S, no barriers
    # between them.
    roles = compiled_steps(tmp_path, "--loads-only")
    for role in ("left", "right"):
        assert roles[role] == ["start", "waited chunks 0-8", "released 0-8", "waited chunks 0-8", "released 0-8",
                               "end"], roles[role]


def test_the_scores_only_kernel_compiles_for_sm90a(tmp_path):
    # Its consumers compute S on their blocks, waiting for each K group as it lands, and
    # release both tiles: no softmax, no P V, no barriers between them.
    roles = compiled_steps(tmp_path, "--scores-only")
    for role in ("left", "right"):
        steps = roles[role]
        assert steps[0] == "start" and steps[-1] == "end", steps
        assert "S done" in steps and steps.count("released 0-8") == 2, steps
        assert not any(s.startswith(("arrived", "waited left", "waited right", "waited p1")) for s in steps), steps


def test_the_package_kernel_is_left_as_it_was():
    from flashmla_cute.kernels import consumer_barriers, kv_stages

    tool = load_script(TOOL)
    before = [kv_stages.KvStages.__dict__[n] for n in ("wait", "release", "load")]
    create = consumer_barriers.ConsumerBarriers.__dict__["create"]
    with tool.stamped_steps(tool.Stamps(0)):
        assert kv_stages.KvStages.__dict__["wait"] is not before[0]
    assert [kv_stages.KvStages.__dict__[n] for n in ("wait", "release", "load")] == before
    assert consumer_barriers.ConsumerBarriers.__dict__["create"] is create


def test_summary_reads_steps_from_each_pair_start_and_epilogues_per_batch(capsys):
    import torch

    tool = load_script(TOOL)
    arr = torch.full((len(tool.ROLES), tool.MAX_STEPS, tool.MAX_PAIRS), -1, dtype=torch.int64)
    for p in range(10):
        arr[0, 0, p] = 5000 * p  # left start
        arr[0, tool.TIMER_STEP, p] = 1_000_000 + 3000 * p  # the same on the global timer (ns)
        arr[0, 1, p] = 5000 * p + 1200  # left: S done
        arr[1, 0, p] = 5000 * p + 500  # right start
        arr[2, 0, p] = 5000 * p - 1300  # producer: K0's first group
    begin, end = tool.EPILOGUE_STEPS
    arr[0, begin, 0], arr[0, end, 0] = 100, 2100
    arr[0, begin, 1], arr[0, end, 1] = 50000, 53000
    names = [{0: "start", 1: "S done"}, {0: "start"}, {0: "acquired 0-3 of K0"}]
    tool.summarize(arr, names, "synthetic")
    out = capsys.readouterr().out
    assert "8 pairs, period median 5000 cycles" in out  # the first and last pair are left out
    assert "clock 1667 MHz: 3.00 us a pair" in out  # 5000 cycles every 3000 ns
    assert "epilogue: median 2500 cycles over 2 batches (min 2000, max 3000)" in out
    medians = {m.group(1).strip(): int(m.group(2)) for m in re.finditer(r"^\s+\d+ (.+?) median\s+(-?\d+)", out, re.M)}
    assert medians["S done"] == 1200
    assert medians["acquired 0-3 of K0"] == -1300


def test_a_batch_change_is_measured_between_the_pairs_around_its_epilogue(capsys):
    import torch

    tool = load_script(TOOL)
    arr = torch.full((len(tool.ROLES), tool.MAX_STEPS, tool.MAX_PAIRS), -1, dtype=torch.int64)
    begin, end = tool.EPILOGUE_STEPS
    # Pairs 0-3 of one batch, its epilogue, pairs 4-7 of the next; the change costs
    # the last pair 3000 cycles more than the 5000 of a steady period and the first 500.
    starts = [5000 * p for p in range(4)] + [23000, 28500, 33500, 38500]
    for p, start in enumerate(starts):
        arr[0, 0, p] = start  # start
        arr[0, 1, p] = start + 1200  # S done
        arr[0, 2, p] = start + 4800  # end
    arr[0, begin, 0], arr[0, end, 0] = 20000, 22000  # pair 3 ends at 19800
    names = [{0: "start", 1: "S done", 2: "end"}, {}, {}]
    tool.summarize_batch_changes(arr, names)
    out = capsys.readouterr().out
    assert "left: 1 batch changes (steady period 5000 cycles)" in out
    for part in ("epilogue 2000", "last pair's end -> epilogue 200", "epilogue -> next pair 1000",
                 "next pair's S 1200", "last pair's excess period 3000", "first pair's excess period 500"):
        assert part in out, part


def test_the_kernel_without_output_stores_compiles_for_sm90a(tmp_path):
    # The probe of what the epilogue's stores cost: the same steps, no output row stored.
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", FLASHMLA_CUTE_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(TOOL), "--compile-only", "--no-output-stores"], env=env,
                          capture_output=True, text=True, check=True)
    roles = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert "S done" in roles["left"].split("; "), roles["left"]
    from flashmla_cute.kernels import utils

    tool = load_script(TOOL)
    store = utils.store_acc_row_sectors
    with tool.output_stores_left_out():
        assert utils.store_acc_row_sectors is not store
    assert utils.store_acc_row_sectors is store
