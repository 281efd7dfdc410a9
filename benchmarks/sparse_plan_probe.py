"""Times the sparse call on some of ``bench_sparse.py``'s cases under forced plans (every
sequence's tiles cut into ``k`` fragments, for each ``k`` asked), beside the plan that
``sparse_plan.plan_splits`` picks and FlashMLA's current kernel when it imports: where the
split model's constants (``sparse_plan.CTA_COST_STEPS``, ``MERGE_COST_STEPS``) stand against
the GPU. Same timing as ``bench_sparse.py`` (medians, an L2 flush before each call, input
sets cycled past L2). A forced count may leave fragments with no step
(``ceil(steps / k) * (k - 1) >= steps``, ``steps = topk / 64``), which the package's plans
never do (``tests/test_sparse_plan.py``). Needs a Hopper (sm_90) GPU.

    python benchmarks/sparse_plan_probe.py [--match REGEX] [--splits 4,8,11,16] [--profile] [--graphs]

``--graphs`` also times each plan's call and the peer's replayed from CUDA graphs (one a
set), which leaves the host's time out. ``--profile`` also prints, for the picked plan,
each forced one and the peer, each kernel of one call (the torch profiler's CUDA times,
the L2 flushed before it: each kernel's start after the flush's end, and its time) and
the span from the first kernel's start to the last one's end. With both, the flush and
the call are replayed from one CUDA graph under the profiler, so each kernel's start
after the flush is the GPU's alone (eager, it includes the host's time to the launch).
"""

import argparse
import re
import sys
from pathlib import Path

# The cases, inputs and calls are bench_sparse's, the timer bench_decode's, beside this file.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import bench_decode  # noqa: E402
import bench_sparse  # noqa: E402

SMALLEST_BATCHES = r"^(MODEL1 )?b2 "
"""The default ``--match``: the b = 2 cases, whose time the split count should set."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--match", default=SMALLEST_BATCHES, help="cases of bench_sparse's 'all' set whose name "
                        "matches (default: the b = 2 cases)")
    parser.add_argument("--splits", default="4,6,8,11,16,22,32", help="fragment counts to force, comma-separated")
    parser.add_argument("--profile", action="store_true", help="also print each kernel's time in one call")
    parser.add_argument("--graphs", action="store_true", help="also time each plan's call and the peer's "
                        "replayed from CUDA graphs (no host time)")
    parser.add_argument("--no-peers", action="store_true", help=f"do not time {bench_sparse.PEER} even if it imports")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up time per measurement (default: 25)")
    parser.add_argument("--rep-ms", type=float, default=200.0, help="timed time per measurement (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    args = parser.parse_args(argv)
    reason = bench_decode.no_hopper_reason("sparse_plan_probe.py")
    if reason:
        print(reason, file=sys.stderr)
        return 2
    bench_decode.import_package()
    import torch

    from flashmla_cute import api, runtime, sparse_plan, sparse_runtime

    peers = bench_decode.import_peers(not args.no_peers, names=(bench_sparse.PEER,))
    timer = bench_decode.Timer(args.warmup_ms, args.rep_ms)
    l2 = bench_decode.l2_bytes()
    num_sms = runtime.num_sms(torch.cuda.current_device())
    chosen_plan = sparse_runtime.plan_splits
    forced = [int(k) for k in args.splits.split(",")]
    for case in bench_sparse.CASE_SETS["all"]:
        if not re.search(args.match, case.name):
            continue
        _, _, sets = bench_sparse.case_inputs(case, args.seed, l2)
        picked = chosen_plan(case.b, case.s_q, case.h_q, case.topk + case.extra_topk, num_sms)
        times = {}
        forced_profiles = {}  # printed after the picked plan's, with --profile
        for k in [None] + forced:
            sparse_runtime.plan_splits = chosen_plan if k is None else (
                lambda *_, k=k: sparse_plan.SparsePlan(0, k))
            call = bench_sparse.planned_caller(api, sets[0])
            times[f"picked {tuple(picked)}" if k is None else f"k={k}"] = timer(bench_decode.cycled(call, sets))
            if k is None:
                calls = {"ours": call}  # the package's plan, profiled below
                continue
            # While the plan is forced (each call plans anew):
            if args.graphs:
                times[f"k={k} graph"] = timer(graph_replays(call, sets))
            if args.profile:
                forced_profiles[f"ours k={k}"] = profile_call(call, sets[1 % len(sets)], args.graphs)
        sparse_runtime.plan_splits = chosen_plan
        for peer, module in peers.items():
            calls[peer] = bench_sparse.planned_caller(module, sets[0])
            times[peer] = timer(bench_decode.cycled(calls[peer], sets))
        if args.graphs:
            for name, call in list(calls.items()):
                times[f"{name} graph"] = timer(graph_replays(call, sets))
        print(f"{case.name}: " + ", ".join(f"{name} {ms * 1000:.1f} us" for name, ms in times.items()), flush=True)
        if args.profile:
            for name, call in calls.items():
                print(f"    {name}: {profile_call(call, sets[1 % len(sets)], args.graphs)}", flush=True)
            for name, profiled in forced_profiles.items():
                print(f"    {name}: {profiled}", flush=True)
        del sets
        torch.cuda.empty_cache()
    return 0


def graph_replays(call, sets: list):
    """``fn()`` that replays, in turn, one CUDA graph per input set, each capturing
    ``call(set)`` (``kernel_times.capture``, warmed up on the capture stream): the call's
    GPU work without its host time, as an engine that captures its decode step runs it."""
    import kernel_times

    graphs = [kernel_times.capture(lambda inp=inp: call(inp), calls=1) for inp in sets]
    return bench_decode.cycled(lambda graph: graph.replay(), graphs)


def profile_call(call, inputs, graphed: bool = False) -> str:
    """Each CUDA kernel of one ``call(inputs)`` after an L2 flush, with the span of them all
    (``graphed``: the flush and the call replayed from one CUDA graph)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import kernel_times

    flush = torch.empty(bench_decode.FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def flushed_call():
        flush.zero_()
        call(inputs)

    if graphed:
        graph = kernel_times.capture(flushed_call, calls=1)
        run = graph.replay
    else:
        for _ in range(3):  # warm
            call(inputs)
        run = flushed_call
    flush.zero_()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    flush_end, kernels = events[0].time_range.end, events[1:]  # the flush first
    if not kernels:
        return "no kernels seen"
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    # Each kernel as its name, its start after the flush's end (+us) and its time.
    parts = [f"{e.name[:40]} +{e.time_range.start - flush_end:.1f} {e.time_range.elapsed_us():.1f}" for e in kernels]
    return "; ".join(parts) + f" | span {span:.1f} us"


if __name__ == "__main__":
    sys.exit(main())
