"""benchmarks/kernel_times.py: the parts that run without a GPU."""

import math
from pathlib import Path

import pytest
import torch
from conftest import load_script

kernel_times = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_times.py")


def test_plan_cases_cover_small_and_large_batches():
    assert min(kernel_times.PLAN_BATCHES) == 1 and max(kernel_times.PLAN_BATCHES) >= 4096
    assert set(kernel_times.PLAN_ROWS) == {16, 256}


def test_plan_step_of_this_package_plans_on_the_lengths_device():
    seqlens = torch.tensor([4096, 100, 0], dtype=torch.int32)
    steps = kernel_times.plan_steps(seqlens, 16, with_peers=False)
    assert list(steps) == ["ours"]
    meta, num_splits = steps["ours"]()
    assert meta.device == seqlens.device and num_splits.tolist()[0] == 0 and len(num_splits) == 4


def test_plan_steps_leave_out_flashmla_above_its_batch_limit():
    seqlens = torch.ones(kernel_times.FLASHMLA_FEB2025_MAX_BATCH + 1, dtype=torch.int32)
    assert list(kernel_times.plan_steps(seqlens, 16, with_peers=True)) == ["ours"]


def test_tail_is_measured_from_each_calls_decode_kernel_end_to_its_last_kernel_end():
    # Two calls: a decode kernel and a combine launched early (it starts before the
    # decode kernel ends), and one call whose combine ends first.
    kernels = [
        ("flash_fwd_splitkv_mla_kernel", 0.0, 20.0), ("flash_fwd_mla_combine_kernel", 5.0, 24.0),
        ("MlaDecodeSm90_0", 30.0, 50.0), ("MlaCombine_1", 31.0, 49.0),
        ("MlaDecodeSm90_0", 60.0, 80.0), ("MlaCombine_1", 61.0, 86.0),
    ]
    assert kernel_times.tail_after_decode(kernels) == 4.0  # the median of 4, 0, 6


def test_tail_is_not_a_number_without_a_decode_kernel():
    assert math.isnan(kernel_times.tail_after_decode([("flash_fwd_mla_combine_kernel", 0.0, 1.0)]))


def test_only_picks_a_case_of_the_chosen_set_and_names_them_when_none_matches(capsys):
    assert kernel_times.parse_args(["--only", "b1 sk100 h16 s1"]).only == "b1 sk100 h16 s1"
    with pytest.raises(SystemExit):
        kernel_times.parse_args(["--cases", "serving", "--only", "b1 sk100 h16 s1"])  # an anchor, not a serving case
    assert "--only 'b1 sk100 h16 s1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kernel_times.parse_args(["--only", "bogus"])
    assert "'b128 sk8192 h16 s1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kernel_times.parse_args(["--cases", "plans", "--only", "b1 sk100 h16 s1"])


def test_without_a_gpu_it_exits_2_saying_why(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernel_times.main(["--cases", "plans"]) == 2
    assert "kernel_times.py needs a CUDA GPU" in capsys.readouterr().err
