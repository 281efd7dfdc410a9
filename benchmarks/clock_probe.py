"""SM clock and power while one workload runs back to back: the bf16 matmul that
``bench_decode.py`` takes as its ceiling, and decode cases for this package and, when
they import, FlashMLA's two builds. A compute-bound decode kernel's share of that
ceiling depends on the clock each one holds under the board's power limit, which
``bench_decode.py``'s medians cannot show.

    python benchmarks/clock_probe.py [--seconds 3] [--cases "b128 sk8192 h128 s2" ...] [--loads-only] [--idle]

Each phase calls one workload for ``--seconds`` with no flush between calls (the decode
inputs are larger than L2), timing groups of calls with CUDA events, while
``nvidia-smi`` samples the SM clock, the power draw and the active clock-event reasons
every 100 ms. Prints, per phase: median time a call, TFLOPS, the median clock and power
over the phase's samples (its first second left out, while the clock settles), and the
energy a call takes at that power.

``--loads-only`` adds, after our phase of each case, one of ``pair_timeline.py``'s
loads-only kernel (its consumers only wait for the K tiles and release them: the K
stream's own energy, outputs not the attention's); ``--idle`` a phase with no work (the
board's power at rest), so that a call's joules can be split into the K stream's, the
rest's and the floor's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import (CALLERS, CASE_SETS, D, DV, H_KV, MATMUL_N, OURS, Case,  # noqa: E402
                          import_package, import_peers)

SAMPLE_MS = 100
SETTLE_S = 1.0  # samples this early in a phase are left out
CALLS_PER_GROUP = 10
QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"


def parse_sample(line: str, now: float):
    """One ``nvidia-smi`` line of ``QUERY`` as (host time, SM MHz, watts, reasons), or
    None for a line that is not one (a header, "[N/A]")."""
    parts = [p.strip() for p in line.split(",")]
    try:
        return now, float(parts[0]), float(parts[1]), parts[2]
    except (ValueError, IndexError):
        return None


def phase_summary(samples: list, t0: float, t1: float) -> tuple[float, float, str]:
    """Median SM MHz and watts of the samples of a phase run from ``t0`` to ``t1``
    (host times), its first ``SETTLE_S`` left out, and the clock-event reasons seen (NaN
    and "" without samples)."""
    kept = [s for s in samples if t0 + SETTLE_S <= s[0] <= t1]
    if not kept:
        return float("nan"), float("nan"), ""
    return (statistics.median(s[1] for s in kept), statistics.median(s[2] for s in kept),
            " ".join(sorted({s[3] for s in kept})))


class Sampler:
    """``nvidia-smi`` in the background: ``parse_sample`` rows."""

    def __init__(self):
        self.rows = []
        self.proc = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", f"-lms={SAMPLE_MS}"],
            stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            sample = parse_sample(line, time.monotonic())
            if sample is not None:
                self.rows.append(sample)

    def stop(self):
        self.proc.terminate()


def run_phase(fn, seconds: float) -> tuple[list, float, float]:
    """Calls ``fn`` in groups for ``seconds``: per-call times (ms) and the phase's host span."""
    fn()
    torch.cuda.synchronize()
    times = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS_PER_GROUP):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS_PER_GROUP)
    return times, t0, time.monotonic()


def decode_phases(case: Case, impls: dict, testing, loads_only_kernel=None):
    seqlens = testing.random_seqlens(case.b, case.seqlen, case.s_q, case.varlen, 0)
    inp = testing.make_decode_inputs(case.b, case.s_q, case.h_q, h_kv=H_KV, seqlen=case.seqlen, d=D,
                                     dtype=torch.bfloat16, device="cuda", seed=0, seqlens=seqlens)
    flops = testing.decode_flops(seqlens, case.s_q, case.h_q, D, DV)
    for impl, module in impls.items():
        # Each phase's function binds its own call (the phases run after this generator
        # has moved on to the next implementation).
        call = functools.partial(CALLERS[impl](module, inp, case), inp)
        yield f"{case.name} {impl}", call, flops, contextlib.nullcontext
        if impl == OURS and loads_only_kernel is not None:
            from pair_timeline import decode_kernel_swapped

            # Our call, planned like ours, with the loads-only kernel in the decode
            # kernel's place for the whole phase.
            yield (f"{case.name} loads only", call, flops, functools.partial(decode_kernel_swapped, loads_only_kernel))


def loads_only_kernel():
    """``pair_timeline.py``'s loads-only decode kernel, compiled (its stamps go to a buffer
    of its own)."""
    import pair_timeline

    trace = torch.full((len(pair_timeline.ROLES) * pair_timeline.MAX_STEPS * pair_timeline.MAX_PAIRS,), -1,
                       dtype=torch.int64, device="cuda")
    kernel = pair_timeline.compile_stamped(pair_timeline.Stamps(trace.data_ptr()), "--enable-tvm-ffi",
                                           pair_timeline.LOADS_ONLY)
    return kernel, trace


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--cases", nargs="*", default=["b128 sk8192 h128 s2"])
    parser.add_argument("--loads-only", action="store_true", help="a phase of the loads-only kernel after ours")
    parser.add_argument("--idle", action="store_true", help="a phase with no work")
    args = parser.parse_args()

    impls = {OURS: import_package(), **import_peers(True)}
    from flashmla_cute import testing
    by_name = {c.name: c for cases in CASE_SETS.values() for c in cases}

    a = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    c = torch.empty_like(a)
    phases = [("matmul", lambda: torch.matmul(a, b, out=c), 2.0 * MATMUL_N**3, contextlib.nullcontext)]
    if args.idle:
        phases.append(("idle", lambda: time.sleep(1e-3), 0.0, contextlib.nullcontext))
    kernel = loads_only_kernel() if args.loads_only else None  # kept alive with its stamps' buffer
    for name in args.cases:
        phases += list(decode_phases(by_name[name], impls, testing, None if kernel is None else kernel[0]))
    phases.append(("matmul again", *phases[0][1:]))

    sampler = Sampler()
    time.sleep(0.5)
    rows = []
    for label, fn, flops, context in phases:
        with context():
            times, t0, t1 = run_phase(fn, args.seconds)
        ms = statistics.median(times)
        clock, watts, reasons = phase_summary(list(sampler.rows), t0, t1)
        rows.append((label, ms, flops / (ms * 1e-3) / 1e12, clock, watts, reasons))
        time.sleep(1.0)
    sampler.stop()

    print(f"{'phase':34} {'ms':>8} {'TFLOPS':>7} {'MHz':>6} {'W':>6} {'mJ':>7}  reasons")
    for label, ms, tflops, clock, watts, reasons in rows:
        print(f"{label:34} {ms:8.4f} {tflops:7.1f} {clock:6.0f} {watts:6.0f} {watts * ms:7.1f}  {reasons}")


if __name__ == "__main__":
    main()
