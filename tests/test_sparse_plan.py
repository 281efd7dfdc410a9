"""How the sparse kernel's work is cut over SMs: query-token tiles, whole or in fragments of
their top-k, from shapes alone."""

import pytest

from flashmla_cute import scheduler, sparse_plan
from flashmla_cute.sparse_plan import SparsePlan


def test_jobs_are_query_token_tiles_of_64_heads():
    assert sparse_plan.jobs_per_batch(s_q=2, h_q=128) == 4
    assert sparse_plan.jobs_per_batch(s_q=1, h_q=64) == 1
    assert sparse_plan.jobs_per_batch(s_q=1, h_q=16) == 1  # fewer heads are padded to a tile


@pytest.mark.parametrize(
    "shape,plan",
    [
        # 8 tiles of 32 steps on 132 SMs: 88 CTAs of 3 steps.
        ((2, 2, 128, 2048), SparsePlan(0, 11)),
        # 296 tiles, 2.24 waves: 264 whole tiles (two full waves), then the last 8
        # sequences' 32 tiles in 4 fragments each, 128 CTAs of 8 steps.
        ((74, 2, 128, 2048), SparsePlan(66, 4)),
        # 148 tiles of 256 steps: one full wave whole, the 16 others in 8 fragments.
        ((148, 1, 64, 16384), SparsePlan(132, 8)),
        ((128, 2, 128, 2048), SparsePlan(128, 1)),  # 512 tiles, 3.9 waves: nothing to gain
        ((64, 2, 128, 2048), SparsePlan(64, 1)),  # 256 tiles, 1.9 waves
        ((1, 1, 64, 64), SparsePlan(1, 1)),  # one step: nothing to split
    ],
)
def test_plans_for_the_benchmark_cases(shape, plan):
    # shape: (b, s_q, h_q, topk)
    assert sparse_plan.plan_splits(*shape, 132) == plan


@pytest.mark.parametrize("b", [1, 3, 74, 148, 1000])
@pytest.mark.parametrize("topk", [64, 576, 2048, 16384])
def test_every_fragment_has_a_step_and_every_sequence_its_fragments(b, topk):
    plan = sparse_plan.plan_splits(b, 1, 128, topk, 132)
    assert 0 <= plan.whole_batches <= b
    assert 1 <= plan.splits <= min(topk // sparse_plan.STEP_TOKENS, sparse_plan.MAX_SPLITS)
    offsets = plan.fragment_offsets(b)
    counts = [hi - lo for lo, hi in zip(offsets, offsets[1:])]
    assert counts == [1] * plan.whole_batches + [plan.splits] * (b - plan.whole_batches)
    assert offsets[-1] == plan.num_fragments(b)


def test_a_full_gpu_is_not_split():
    # Many waves of tiles: every split would only add partials to merge.
    assert sparse_plan.plan_splits(132 * 8, 1, 64, 16384, 132) == SparsePlan(132 * 8, 1)


def test_the_model_prefers_filling_the_last_wave():
    # 296 tiles of 33 step-costs: three waves whole (99), against two whole waves and the
    # rest in short fragments beside nothing (66 + 9 + the merge).
    whole = sparse_plan.modelled_time(SparsePlan(74, 1), 74, 4, 32, 132)
    mixed = sparse_plan.modelled_time(SparsePlan(66, 4), 74, 4, 32, 132)
    assert whole == 99 and mixed < 85


def test_the_workspace_holds_every_fragment_of_a_split_plan():
    # A fragment's slot: s_q * h_q rows of 512 partial values, then their fp32
    # log-sum-exps; the whole sequences' slots too. A plan with no split tile writes no
    # partials but still gets one fragment's workspace.
    split, whole = SparsePlan(66, 4), SparsePlan(74, 1)
    assert split.workspace_fragments(74) == 66 + 8 * 4
    assert split.workspace_values(74, 2, 128) == 98 * 256 * 512
    assert split.workspace_elems(74, 2, 128) == scheduler.accumulator_elems(98, 1, 256, 512)
    assert whole.workspace_fragments(74) == 1


# 4 query tokens of 128 heads: a fragment's slot is 2**18 partial values, so the kernels'
# 32-bit indices reach 8191 fragments (2**31 - 2**18 values).
def test_a_split_plan_past_the_kernels_32_bit_indices_is_passed_over():
    # b = 8185 on 132 SMs: the model's best plan cuts the last sequence into 11 fragments
    # (8195 in all); the best one the kernels can index cuts it into 7 (8191).
    best = SparsePlan(8184, 11)
    assert best.workspace_values(8185, 4, 128) > scheduler.MAX_PARTIAL_VALUES
    plan = sparse_plan.plan_splits(8185, 4, 128, 2048, 132)
    assert plan == SparsePlan(8184, 7)
    assert plan.workspace_values(8185, 4, 128) == 8191 * 2**18 <= scheduler.MAX_PARTIAL_VALUES
    assert sparse_plan.modelled_time(best, 8185, 8, 32, 132) < sparse_plan.modelled_time(plan, 8185, 8, 32, 132)


def test_a_batch_no_split_plan_fits_keeps_every_tile_whole():
    # b = 8190: the model's best, the last 6 sequences in 2 fragments, has 8196; from
    # b = 8191 on every split plan has more than 8191 fragments.
    assert SparsePlan(8184, 2).workspace_values(8190, 4, 128) > scheduler.MAX_PARTIAL_VALUES
    assert sparse_plan.plan_splits(8190, 4, 128, 2048, 132) == SparsePlan(8190, 1)
    assert sparse_plan.plan_splits(8191, 4, 128, 2048, 132) == SparsePlan(8191, 1)


@pytest.mark.parametrize("num_sms", [78, 114, 132])
@pytest.mark.parametrize("b,s_q", [(8180, 4), (8185, 4), (8190, 4), (9000, 4), (16380, 2), (16384, 2)])
def test_no_plan_passes_the_kernels_32_bit_indices(num_sms, b, s_q):
    for topk in (512, 16384):
        plan = sparse_plan.plan_splits(b, s_q, 128, topk, num_sms)
        assert plan.workspace_values(b, s_q, 128) <= scheduler.MAX_PARTIAL_VALUES, plan
