"""benchmarks/clock_probe.py: the parts that run without a GPU."""

import math
from pathlib import Path

from conftest import load_script

probe = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "clock_probe.py")


def test_a_sample_is_clock_power_and_reasons_and_other_lines_are_none():
    assert probe.parse_sample("1455, 697.12, 0x0000000000000004\n", 3.0) == (3.0, 1455.0, 697.12, "0x0000000000000004")
    assert probe.parse_sample("clocks.sm [MHz], power.draw [W], clocks_event_reasons.active", 3.0) is None
    assert probe.parse_sample("[N/A], [N/A], [N/A]", 3.0) is None


def test_a_phase_keeps_its_samples_after_the_clock_settles():
    t0 = 10.0
    samples = [(t0 + 0.5, 1980.0, 300.0, "0x0"),  # before the clock settles: left out
               (t0 + probe.SETTLE_S + 0.1, 1400.0, 699.0, "0x4"), (t0 + probe.SETTLE_S + 0.2, 1500.0, 697.0, "0x4"),
               (t0 + probe.SETTLE_S + 0.3, 1450.0, 698.0, "0x4"), (t0 + 9.0, 600.0, 90.0, "0x1")]  # after the phase
    assert probe.phase_summary(samples, t0, t0 + 3.0) == (1450.0, 698.0, "0x4")
    clock, watts, reasons = probe.phase_summary(samples, 100.0, 103.0)
    assert math.isnan(clock) and math.isnan(watts) and reasons == ""


def test_each_decode_phase_calls_its_own_implementation():
    # The phases are listed before any runs: each must keep its own call.
    called = []
    callers = {name: (lambda name: lambda module, inp, case: lambda x: called.append(name))(name)
               for name in ("flashmla_cute", "flash_mla", "flash_mla_head")}
    original = probe.CALLERS
    probe.CALLERS = callers
    try:
        class Testing:
            @staticmethod
            def random_seqlens(*args):
                return None

            @staticmethod
            def make_decode_inputs(*args, **kwargs):
                return None

            @staticmethod
            def decode_flops(*args):
                return 1.0

        case = probe.Case(1, 64, 16)
        phases = list(probe.decode_phases(case, {name: None for name in callers}, Testing))
    finally:
        probe.CALLERS = original
    for _, fn, _, _ in phases:
        fn()
    assert called == ["flashmla_cute", "flash_mla", "flash_mla_head"]
