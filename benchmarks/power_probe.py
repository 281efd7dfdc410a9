"""The SM clock and board power that each implementation runs a decode case at, sustained.

    python benchmarks/power_probe.py [--case B,SEQLEN,H_Q,S_Q ...] [--seconds 4] [--rounds 2]
                                     [--walks F,...]

A board held at its power limit (an H200's 700 W under the compute-bound cases) sets the
SM clock by the power drawn, so two kernels of equal cycles a call can differ in time,
and a kernel's cycles a call are its time times the clock it got. For each case, each
implementation (ours, and each FlashMLA build that imports) runs calls back to back for
SECONDS while ``nvidia-smi`` samples the SM clock and the board's power every 50 ms; the
implementations take turns, ``--rounds`` times. Printed per turn: the time a call (the
loop's), the median clock and power over the turn's second half, and the cycles a call
(time x clock). Fixed lengths, bf16, inputs drawn once per case. ``--walks`` adds
ours under the walked plan with fixed cost F a fragment (``plan_probe.plan_kinds``' walk:
at 0 or 1 it spreads the blocks over every SM part, splitting sequences as FlashMLA's
planner does).
"""

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flashmla_cute.testing import make_decode_inputs  # noqa: E402
from kernel_times import ours, peers  # noqa: E402
from plan_probe import PARTS, plan_call, plan_kinds, scheduler, scheduler_overridden  # noqa: E402

CASES = ["128,4096,128,1", "128,4096,64,2", "128,8192,128,2", "128,8192,16,1"]
SAMPLE_MS = 50
CALLS_A_BATCH = 20  # calls enqueued between synchronizations


def ours_walked(overhead: int):
    """``make(x, s_q, h_q) -> step``: ours under the walked plan with fixed cost ``overhead``."""

    def make(x, s_q, h_q):
        parts = max(PARTS // scheduler.num_query_tiles(s_q * h_q), 1)
        with scheduler_overridden(FIXED_OVERHEAD_BLOCKS=overhead):
            rows, fragments = plan_kinds(scheduler.plan_blocks(x.cache_seqlens.tolist()), parts)["walk"]
        return plan_call(x, s_q, rows, fragments)

    return make


class Sampler:
    """``nvidia-smi`` sampling one GPU's SM clock (MHz) and power (W) in the background,
    each sample stamped with ``time.monotonic()`` as it is read."""

    def __init__(self, index: int):
        self.samples = []
        self.proc = subprocess.Popen(
            ["nvidia-smi", "-i", str(index), "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
             f"-lms={SAMPLE_MS}"], stdout=subprocess.PIPE, text=True, bufsize=1)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                clock, power = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.monotonic(), clock, power))

    def window(self, start: float, end: float):
        """Median clock and power of the samples read between ``start`` and ``end``."""
        inside = [(c, p) for t, c, p in self.samples if start <= t <= end]
        if not inside:
            return float("nan"), float("nan")
        return statistics.median(c for c, _ in inside), statistics.median(p for _, p in inside)

    def stop(self):
        self.proc.terminate()


def sustained(step, seconds: float):
    """(microseconds a call, start, end) of back-to-back calls for ``seconds``."""
    for _ in range(CALLS_A_BATCH):
        step()
    torch.cuda.synchronize()
    start = time.monotonic()
    calls = 0
    while time.monotonic() - start < seconds:
        for _ in range(CALLS_A_BATCH):
            step()
        torch.cuda.synchronize()
        calls += CALLS_A_BATCH
    end = time.monotonic()
    return (end - start) / calls * 1e6, start, end


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="B,SEQLEN,H_Q,S_Q (repeatable)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--walks", default="", help="ours also under walked plans of these fixed costs, e.g. 0,1")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("power_probe.py needs a CUDA GPU.", file=sys.stderr)
        return 1
    makers = {"ours": ours}
    makers.update({f"ours walk F={f}": ours_walked(int(f)) for f in args.walks.split(",") if f})
    makers.update(peers())
    sampler = Sampler(torch.cuda.current_device())
    try:
        for case in args.case or CASES:
            b, seqlen, h_q, s_q = (int(v) for v in case.split(","))
            x = make_decode_inputs(b, s_q, h_q, seqlens=[seqlen] * b, device="cuda", seed=0)
            steps = {name: make(x, s_q, h_q) for name, make in makers.items()}
            print(f"b{b} sk{seqlen} h{h_q} s{s_q}", flush=True)
            for r in range(args.rounds):
                for name, step in steps.items():
                    us, start, end = sustained(step, args.seconds)
                    clock, power = sampler.window((start + end) / 2, end)
                    print(f"  round {r}  {name:18s} {us:8.1f} us a call  {clock:6.0f} MHz  {power:5.0f} W  "
                          f"{us * clock / 1e3:8.0f} kcycles a call", flush=True)
            del x, steps
            torch.cuda.empty_cache()
    finally:
        sampler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
