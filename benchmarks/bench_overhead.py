"""Host overhead per call of get_mla_metadata and flash_mla_with_kvcache.

    python benchmarks/bench_overhead.py [--calls 500] [--batches 20] [--warmup 5] [--pin]

On a tiny problem (b = 1, seqlen 100, h_q 16, s_q 1, bf16) the GPU work per call is a few
microseconds, so a tight loop of calls measures what the host spends per call: argument
checks, output allocation and kernel launches. Each function is called ``--calls`` times
in a row, the device is synchronized only at the end of each such batch, and the median
over ``--batches`` batches of (wall time / calls) is reported. The functions take turns
batch by batch, after ``--warmup`` seconds of calling them all, so that all see the
host in the same state: on the machines measured, the host takes seconds of steady work
to reach its steady speed (a trivial torch op costs 10 us in the first second and 7 us
after ten). The enqueue-only time (the
loop before the final synchronize) and, for scale, the same loop around one tiny torch
kernel (``x.add_(1)``) are reported beside it, and so is the GPU time per call (the same
calls replayed from a CUDA graph, with no host work): a loop cannot run faster than the
GPU, so where that is close to the host time the loop measures the GPU. ``--pin`` keeps
the process on one CPU core (less scheduling noise between runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from bench_decode import positive_int  # noqa: E402

B, SEQLEN, H_Q, S_Q, H_KV = 1, 100, 16, 1, 1
D, DV = 576, 512


def import_package():
    """Import flashmla_cute from this checkout's src/ when there is one, else as installed."""
    src = Path(__file__).resolve().parent.parent / "src"
    if (src / "flashmla_cute" / "__init__.py").exists() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    import flashmla_cute

    return flashmla_cute


def time_batch(fn, calls: int) -> tuple[float, float]:
    """Microseconds per call of ``calls`` back-to-back calls of ``fn``, started on an
    idle device: (enqueue time, before the closing synchronize; wall time, with it)."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


def per_call_us(fns: dict, calls: int, batches: int, warmup_s: float = 1.0) -> dict:
    """For each named function: median and min over batches of the wall time per call,
    and the median enqueue time per call (before the batch's synchronize)."""
    import torch

    for fn in fns.values():  # compile on first use
        fn()
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        for fn in fns.values():
            for _ in range(10):
                fn()
        torch.cuda.synchronize()
    wall = {name: [] for name in fns}
    enqueue = {name: [] for name in fns}
    for _ in range(batches):
        for name, fn in fns.items():
            batch_enqueue, batch_wall = time_batch(fn, calls)
            enqueue[name].append(batch_enqueue)
            wall[name].append(batch_wall)
    return {
        name: {
            "us_per_call": statistics.median(wall[name]),
            "us_enqueue_per_call": statistics.median(enqueue[name]),
            "us_per_call_min": min(wall[name]),
        }
        for name in fns
    }


def graph_us(fn, calls: int = 100, replays: int = 20) -> float:
    """GPU microseconds per call of ``fn``: ``calls`` calls captured in one CUDA graph,
    replayed ``replays`` times."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=positive_int, default=500, help="calls per batch (default: 500)")
    parser.add_argument("--batches", type=positive_int, default=20, help="batches (default: 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up calls (default: 5)")
    parser.add_argument("--pin", action="store_true", help="run on one CPU core")
    args = parser.parse_args(argv)
    if not args.warmup >= 0:  # NaN too
        parser.error(f"--warmup must be >= 0 seconds, got {args.warmup:g}")
    if args.pin:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})

    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("bench_overhead.py needs a Hopper (sm_90) GPU.", file=sys.stderr)
        return 2

    fm = import_package()
    from flashmla_cute.testing import make_decode_inputs

    inp = make_decode_inputs(B, S_Q, H_Q, h_kv=H_KV, seqlen=SEQLEN, d=D, dtype=torch.bfloat16,
                             device="cuda", seed=args.seed)
    hpk = S_Q * H_Q // H_KV
    meta, num_splits = fm.get_mla_metadata(inp.cache_seqlens, hpk, H_KV)

    def metadata():
        fm.get_mla_metadata(inp.cache_seqlens, hpk, H_KV)

    def decode():
        fm.flash_mla_with_kvcache(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, DV,
                                  meta, num_splits, causal=True)

    x = torch.zeros(16, device="cuda")

    def tiny_torch_op():
        x.add_(1)

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{args.batches} batches of {args.calls} calls after {args.warmup:g} s of warm-up, sync after each batch"
          + (f", pinned to CPU {max(os.sched_getaffinity(0))}" if args.pin else ""))
    print(f"problem: b={B} seqlen={SEQLEN} h_q={H_Q} s_q={S_Q} h_kv={H_KV} bf16")
    fns = {"get_mla_metadata": metadata, "flash_mla_with_kvcache": decode, "torch x.add_(1) (scale)": tiny_torch_op}
    results = per_call_us(fns, args.calls, args.batches, args.warmup)
    print(f"{'function':<26} {'us/call':>9} {'enqueue us':>11} {'min us':>8} {'GPU us':>8}")
    for name, fn in fns.items():
        r = results[name]
        print(f"{name:<26} {r['us_per_call']:>9.1f} {r['us_enqueue_per_call']:>11.1f} {r['us_per_call_min']:>8.1f}"
              f" {graph_us(fn):>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
