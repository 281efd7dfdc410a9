"""benchmarks/plan_probe.py: the parts that run without a GPU (case names and the plans it
builds by hand)."""

from pathlib import Path

import torch
from conftest import load_script

from flashmla_cute import scheduler

plan_probe = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "plan_probe.py")


def test_case_names_as_the_benchmark_writes_them():
    assert plan_probe.parse_case("b1 sk1024 h16 s1") == (1, 1024, 16, 1, False)
    assert plan_probe.parse_case("b64 sk2048 h32 s2 var") == (64, 2048, 32, 2, True)
    assert plan_probe.parse_case("b8 sk16384 h128") == (8, 16384, 128, 1, False)


def test_balanced_plan_where_it_fits():
    # 32 sequences of 16 blocks on 132 parts: largest 5 gives 4 fragments of 4 each
    # (128 parts); largest 3 would need 6 a sequence (192 parts).
    rows, fragments = plan_probe.balanced_plan([16] * 32, 132, 5)
    assert fragments == [4] * 32
    assert rows[:4] == [[0, 4 * j, 0, 4 * j + 4, j, 0, 0, 0] for j in range(4)]
    assert rows[128:] == [[32, 0, 31, 0, 0, 0, 0, 0]] * 4
    assert plan_probe.balanced_plan([16] * 32, 132, 3) is None


def test_plan_kinds_are_the_host_plans():
    # b = 128 sequences of 128 blocks on 66 parts: no balanced plan within the slack,
    # a packed one (two a part) which is the package's plan, and the walk.
    blocks = [128] * 128
    kinds = plan_probe.plan_kinds(blocks, 66)
    assert set(kinds) == {"packed", "walk"}
    meta, num_splits = scheduler.plan_torch(torch.full((128,), 8192, dtype=torch.int32), 66)
    assert kinds["packed"][0] == meta.tolist()
    assert kinds["packed"][1] == [1] * 128
    assert sum(kinds["walk"][1]) > 128  # the walk splits sequences
    summary = plan_probe.plan_summary(*kinds["packed"], blocks)
    assert summary.split() == " 64 parts,  128 fragments,   0 split, longest  256 blocks".split()
