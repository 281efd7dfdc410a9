"""GPU time per call of decode cases (CUDA-graph replays), and, from the torch profiler
over one replay of the same graph, each kernel's time and the time from the decode
kernel's end to the call's last kernel's end: where a case's time goes, for this
package and, when they import, FlashMLA's two builds (``flash_mla``, Feb 2025, and
``flash_mla_head``, its current API) on the same inputs.

    python benchmarks/kernel_times.py [--cases anchors|serving|all|plans]

``anchors`` are the b = 128 anchor cases and the tiny problem that ``bench_overhead.py``
calls in a loop; ``serving`` the small-batch cases of the kernel work (b 1..64); ``plans``
times ``get_mla_metadata`` alone (once per decode step, shared by the layers) for
batches of 1 to 4096, beside FlashMLA's Feb 2025 build (its current build plans inside
its first decode call; the Feb 2025 planner takes batches of at most 4095).
"""

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_decode
import flashmla_cute  # noqa: E402
from bench_decode import no_hopper_reason  # noqa: E402
from flashmla_cute.testing import capture_graph, make_decode_inputs, random_seqlens  # noqa: E402

# (b, seqlen, h_q, s_q, varlen)
ANCHORS = [(128, 8192, 16, 1, False), (128, 8192, 64, 1, False), (128, 8192, 128, 1, False),
           (128, 8192, 128, 2, False), (1, 100, 16, 1, False)]
SERVING = [(b, seqlen, h_q, 1, False) for b in (1, 8, 32) for seqlen in (1024, 16384) for h_q in (16, 128)]
SERVING += [(4, 32768, 16, 1, False), (64, 2048, 32, 2, True)]
CASE_SETS = {"anchors": ANCHORS, "serving": SERVING, "all": ANCHORS + SERVING}  # and "plans": no decode cases
CALLS = 10
PLAN_BATCHES = (1, 8, 32, 128, 512, 4096)
PLAN_ROWS = (16, 256)  # s_q * h_q per KV head: 132 and 33 SM parts on an H100
FLASHMLA_FEB2025_MAX_BATCH = 4095  # its planner asserts batch_size < 4096


def peers():
    """Callables ``make(x, s_q, h_q) -> step`` for each FlashMLA build that imports."""
    found = {}
    try:
        import flash_mla

        def feb2025(x, s_q, h_q):
            meta, splits = flash_mla.get_mla_metadata(x.cache_seqlens, s_q * h_q, 1)
            return lambda: flash_mla.flash_mla_with_kvcache(
                x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits, causal=s_q > 1)

        found["flashmla-feb2025"] = feb2025
    except ImportError:
        pass
    try:
        import flash_mla_head

        def head(x, s_q, h_q):
            sched, _ = flash_mla_head.get_mla_metadata()
            return lambda: flash_mla_head.flash_mla_with_kvcache(
                x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, sched, None, causal=s_q > 1)

        found["flashmla-head"] = head
    except ImportError:
        pass
    return found


def ours(x, s_q, h_q):
    meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, s_q * h_q, 1)
    return lambda: flashmla_cute.flash_mla_with_kvcache(
        x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits, causal=s_q > 1)


def capture(step, calls: int = CALLS) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` calls of ``step`` (``testing.capture_graph``: warmed up
    and captured on a stream of its own), replayed once."""
    graph, _ = capture_graph(step, calls)
    graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_time(graph: torch.cuda.CUDAGraph, calls: int = CALLS, replays: int = 20) -> float:
    """Device microseconds per call of a graph of ``calls`` calls: the median of
    ``replays`` replays. The wall time a serving engine's graph sees, launch gaps
    included, whatever kernels overlap (a programmatic dependent launch makes per-kernel
    times add up to more than the call)."""
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def graph_time(step, calls: int = CALLS, replays: int = 20) -> float:
    """``replay_time`` of a graph of ``calls`` calls of ``step``."""
    return replay_time(capture(step, calls), calls, replays)


def graph_kernels(graph: torch.cuda.CUDAGraph, calls: int = CALLS):
    """({kernel name: mean device microseconds per call}, the median time from a call's
    decode kernel's end to its last kernel's end, ``tail_after_decode``), from the torch
    profiler's kernel timestamps over one replay of the graph: the kernels as they run
    in the graph (an eager run's launch gaps and cache state differ). A combine kernel
    launched as a programmatic dependent starts early, and its time includes its wait."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    times = {}
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", 0)
        if total > 0 and evt.key not in ("Memset (Device)",):
            name = evt.key.replace("kernel_cutlass_kernel_flashmla_cutekernels", "")
            times[name[:40]] = total / calls
    kernels = [(evt.name, evt.time_range.start, evt.time_range.end) for evt in prof.events()
               if evt.device_type == torch.autograd.DeviceType.CUDA and evt.name != "Memset (Device)"]
    return times, tail_after_decode(kernels)


def is_combine(kernel_name: str) -> bool:
    """Whether a kernel merges split results (ours and both FlashMLA builds name it so)."""
    return "combine" in kernel_name.lower()


def tail_after_decode(kernels: list) -> float:
    """The median over calls of (the call's last kernel end - its decode kernel's end),
    from ``(name, start, end)`` of the profiled kernels: a call is a decode kernel (one
    that is not a combine) and the kernels that start after it and before the next one
    (a combine launched as a programmatic dependent starts before the decode kernel
    ends, so durations alone cannot give this). NaN without a decode kernel."""
    kernels = sorted(kernels, key=lambda k: k[1])
    tails, decode_end, call_end = [], None, None
    for name, _, end in kernels:
        if not is_combine(name):
            if decode_end is not None:
                tails.append(call_end - decode_end)
            decode_end = call_end = end
        elif decode_end is not None:
            call_end = max(call_end, end)
    if decode_end is not None:
        tails.append(call_end - decode_end)
    return sorted(tails)[len(tails) // 2] if tails else float("nan")


def plan_steps(seqlens: torch.Tensor, rows: int, with_peers: bool) -> dict:
    """``get_mla_metadata`` of this package and, when it imports, FlashMLA's Feb 2025 build."""
    steps = {"ours": lambda: flashmla_cute.get_mla_metadata(seqlens, rows, 1)}
    if with_peers and seqlens.shape[0] <= FLASHMLA_FEB2025_MAX_BATCH:
        try:
            import flash_mla

            steps["flashmla-feb2025"] = lambda: flash_mla.get_mla_metadata(seqlens, rows, 1)
        except ImportError:
            pass
    return steps


def time_plans(with_peers: bool):
    for rows in PLAN_ROWS:
        for b in PLAN_BATCHES:
            seqlens = random_seqlens(b, 4096, varlen=True, seed=b).cuda()
            line = [f"  {name:<17} {graph_time(step):8.1f} us per plan in a graph"
                    for name, step in plan_steps(seqlens, rows, with_peers).items()]
            print(f"plan b{b} rows{rows}", *line, sep="\n", flush=True)


def case_name(b, seqlen, h_q, s_q, varlen):
    return f"b{b} sk{seqlen} h{h_q} s{s_q}" + (" var" if varlen else "")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", choices=(*CASE_SETS, "plans"), default="anchors")
    parser.add_argument("--only", metavar="NAME", help="only the case with this name, e.g. 'b1 sk100 h16 s1'")
    parser.add_argument("--no-peers", action="store_true", help="time this package only")
    args = parser.parse_args(argv)
    if args.only is not None:
        names = [case_name(*c) for c in CASE_SETS.get(args.cases, [])]
        if not names:
            parser.error(f"--only picks a decode case; --cases {args.cases} has none")
        if args.only not in names:
            parser.error(f"--only {args.only!r}: no case of --cases {args.cases} has that name; "
                         f"its cases are {', '.join(map(repr, names))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = no_hopper_reason("kernel_times.py")
    if reason:
        print(reason, file=sys.stderr)
        return 2
    if args.cases == "plans":
        time_plans(not args.no_peers)
        return 0
    cases = CASE_SETS[args.cases]
    if args.only is not None:
        cases = [c for c in cases if case_name(*c) == args.only]
    impls = {"ours": ours, **({} if args.no_peers else peers())}
    for b, seqlen, h_q, s_q, varlen in cases:
        lens = random_seqlens(b, seqlen, s_q, varlen=varlen, seed=0)
        x = make_decode_inputs(b, s_q, h_q, seqlens=lens.tolist(), device="cuda", seed=0)
        line = []
        for name, make in impls.items():
            graph = capture(make(x, s_q, h_q))
            wall = replay_time(graph)
            times, tail = graph_kernels(graph)
            parts = " + ".join(f"{k.split('(')[0][-28:]} {t:.1f}" for k, t in sorted(times.items(), key=lambda kv: -kv[1]))
            line.append(f"  {name:<17} {wall:8.1f} us per call in a graph  [kernels: {parts}; "
                        f"{tail:.1f} after the decode kernel's end]")
        print(case_name(b, seqlen, h_q, s_q, varlen), *line, sep="\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
