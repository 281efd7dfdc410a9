"""How the sparse kernel's work is cut: query-token tiles, and fragments of each tile's
top-k, from shapes alone."""

import pytest

from flashmla_cute import sparse_plan


def test_jobs_are_query_token_tiles_of_64_heads():
    assert sparse_plan.num_jobs(b=2, s_q=2, h_q=128) == 8
    assert sparse_plan.num_jobs(b=148, s_q=1, h_q=64) == 148
    assert sparse_plan.num_jobs(b=3, s_q=1, h_q=16) == 3  # fewer heads are padded to a tile


@pytest.mark.parametrize(
    "jobs,topk,splits",
    [
        (8, 2048, 11),  # b 2, s_q 2, h_q 128: 88 CTAs of 3 steps instead of 8 of 32
        (148, 16384, 8),  # b 148 h_q 64: two waves of 148 CTAs would leave the second 11% full
        (512, 2048, 1),  # b 128, s_q 2, h_q 128: 4 waves, nearly full
        (296, 2048, 1),  # splitting would write and read more partials than it saves
        (1, 64, 1),  # one step: nothing to split
    ],
)
def test_splits_for_the_benchmark_cases(jobs, topk, splits):
    assert sparse_plan.topk_splits(jobs, topk, 132) == splits


@pytest.mark.parametrize("jobs", [1, 7, 132, 1000])
@pytest.mark.parametrize("topk", [64, 576, 2048, 16384])
def test_every_fragment_has_a_step(jobs, topk):
    steps = topk // sparse_plan.STEP_TOKENS
    assert 1 <= sparse_plan.topk_splits(jobs, topk, 132) <= steps


def test_a_full_gpu_is_not_split():
    # Many waves of jobs: every split would only add partials to merge.
    assert sparse_plan.topk_splits(132 * 8, 16384, 132) == 1
