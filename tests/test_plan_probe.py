"""benchmarks/plan_probe.py: the parts that run without a GPU (case names and the plans it
builds by hand)."""

import argparse
from pathlib import Path

import pytest
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


def test_tailed_plan_moves_each_parts_last_blocks_into_pieces_after_the_parts():
    # b = 4 sequences of 20 blocks, one a part, with an empty part: tails of 6 blocks in
    # pieces of 4 (4 + 2), numbered after each sequence's own fragment.
    blocks = [20] * 4
    rows = [[i, 0, i, 20, 0, 0, 0, 0] for i in range(4)] + [[4, 0, 3, 0, 0, 0, 0, 0]]
    tailed, fragments = plan_probe.tailed_plan(rows, [1] * 4, blocks, 6, 4)
    assert tailed[:4] == [[i, 0, i, 14, 0, 0, 0, 0] for i in range(4)]  # the empty part dropped
    assert tailed[4:] == [row for i in range(4) for row in ([i, 14, i, 18, 1, 0, 0, 0], [i, 18, i, 20, 2, 0, 0, 0])]
    assert fragments == [3] * 4
    assert rows[0] == [0, 0, 0, 20, 0, 0, 0, 0]  # the plan given is left as it was


def test_tailed_plan_keeps_every_block_once_and_cuts_only_where_asked():
    # The walk's plan of varied lengths: every block in exactly one part, every
    # fragment number of a sequence once; with longest_only, only the parts within the
    # tail of the longest give blocks up, and a last fragment too short keeps them.
    seqlens = torch.tensor([3000 + 40 * i for i in range(128)], dtype=torch.int32)
    blocks = scheduler.plan_blocks(seqlens.tolist())
    meta, splits = scheduler.plan_torch(seqlens, 66)
    fragments = [q - p for p, q in zip(splits.tolist(), splits.tolist()[1:])]
    for longest_only in (False, True):
        rows, counts = plan_probe.tailed_plan(meta.tolist(), fragments, blocks, 8, 4, longest_only)
        seen, numbers = {}, {}
        for row in rows:
            for batch, first, last in scheduler.part_fragments(row, blocks):
                for block in range(first, last):
                    seen[batch, block] = seen.get((batch, block), 0) + 1
        assert sorted(seen) == [(i, k) for i, n in enumerate(blocks) for k in range(n)]
        assert set(seen.values()) == {1}
        pieces = rows[sum(1 for row in meta.tolist() if row[0] <= row[2]):]
        for batch, _, _, _, number, *_ in pieces:
            numbers.setdefault(batch, []).append(number)
        for batch, taken in numbers.items():
            assert taken == list(range(fragments[batch], counts[batch]))
        assert all(last - first == 4 for _, first, _, last, *_ in pieces)
    every, longest = (len(plan_probe.tailed_plan(meta.tolist(), fragments, blocks, 8, 4, only)[0])
                      for only in (False, True))
    assert longest < every


def test_tails_option_reads_tail_and_piece_and_refuses_anything_else():
    assert plan_probe.tail_specs("8:4,16:8:longest") == [(8, 4, False), (16, 8, True)]
    for bad in ("8", "8:x", "8:4:shortest", "0:4", "8:0", "8:4:longest:1"):
        with pytest.raises(argparse.ArgumentTypeError):
            plan_probe.tail_specs(bad)
