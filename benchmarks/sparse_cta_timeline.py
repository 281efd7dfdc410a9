"""Where the sparse pair kernel's CTAs spend their lives: when each one starts, is set up,
has its first K tile, ends its steps and leaves, on one clock for all SMs.

    python benchmarks/sparse_cta_timeline.py [--match REGEX]     # default: '^b2 '
    python benchmarks/sparse_cta_timeline.py --match '^MODEL1 b2 .*extralen'
    python benchmarks/sparse_cta_timeline.py --compile-only      # no GPU needed

A stamped copy of the pair kernel (a subclass of ``SparsePairDecodeSm90``; the package's
kernel is left as it is) reads the GPU's global timer (``%globaltimer``, nanoseconds, the
same on every SM) in one thread of every CTA at the points of ``POINTS``: the kernel's
entry (the first warp, before it starts Q's copy), consumer 0 past the cluster's setup
barrier, Q landed, the first K tile full, the step loop's end, the first output row's
start (both consumers past their steps), the epilogue's end and the CTA's exit (past the
last cluster barrier); in the gather warpgroup's first thread its start, its first fetch
issued (its index loaded: the fetch branches on it), the first tile unpacked (the first
step's bytes fetched) and its end; and in consumer 1's first thread the end of its steps
and of its epilogue. The stamps go to a buffer whose address is compiled into the
stamped kernel.

For each case of ``bench_sparse.py`` that runs the pair kernel (V3.2's production cases,
MODEL1's at h_q 128) and whose name matches ``--match``, the script times the plain and
the stamped call (``bench_decode``'s timer, an L2 flush before each call), then stamps
one call after a flush and prints, for each point, the median, minimum and maximum over
the CTAs of its time from the first CTA's entry, in microseconds, and each CTA's life
(exit - entry). The global timer may tick more coarsely than a nanosecond; the smallest
step between distinct stamps is printed.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_decode, bench_sparse

MAX_CTAS = 4096  # CTAs of one call that are stamped
POINTS = ("entry", "setup done", "Q landed", "first tile full", "steps done", "rows start", "epilogue done", "exit",
          "gather start", "first fetch out", "first tile unpacked", "gather end", "values steps done",
          "values epilogue done")
"""The stamped points, in the order of the trace's columns."""
NO_STAMP = 2**63 - 1
"""The trace's value where a point has no stamp (above every time: ``first_only``
points keep the minimum)."""


class Stamps:
    """Trace-time state of the stamping: the trace buffer (a tensor at a compiled-in
    address, ``MAX_CTAS`` rows of ``len(POINTS)`` int64 stamps, ``NO_STAMP`` where none)."""

    def __init__(self, address: int):
        self.address = address

    def stamp(self, point: str, enabled, first_only: bool = False):
        """Store the global timer at ``point`` of this CTA's row where ``enabled``;
        ``first_only``: the earliest of its stamps (a point inside a loop)."""
        import cutlass.cute as cute
        from cutlass import Int64

        ptr = cute.make_ptr(Int64, self.address, cute.AddressSpace.gmem, assumed_align=8)
        trace = cute.make_tensor(ptr, cute.make_layout(MAX_CTAS * len(POINTS)))
        cta, _, _ = cute.arch.block_idx()
        time_store()(trace, enabled & (cta < MAX_CTAS), cta * len(POINTS) + POINTS.index(point), first_only)


@functools.cache
def timer_ops():
    """``(global_timer, reduce)``: ``global_timer()`` reads ``%globaltimer`` (ns);
    ``reduce(op, address, value)`` is a ``red.global.<op>`` (``"min.s64"``, ``"add.u64"``:
    PTX adds 64-bit integers only as unsigned, the same bits) on an int64 in global
    memory. A reduction, not a read and a store: the stamping thread must not wait for a
    load (a round trip to DRAM after the flush) at a point it stamps. Built once; the
    DSL is imported only when a kernel is compiled."""
    from cutlass import Int64
    from cutlass._mlir.dialects import llvm
    from cutlass.cutlass_dsl import T, dsl_user_op

    @dsl_user_op
    def global_timer(*, loc=None, ip=None) -> Int64:
        return Int64(llvm.inline_asm(T.i64(), [], "mov.u64 $0, %globaltimer;", "=l", has_side_effects=True,
                                     is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip))

    @dsl_user_op
    def reduce(op: str, address, value, *, loc=None, ip=None):
        llvm.inline_asm(None, [Int64(address).ir_value(loc=loc, ip=ip), Int64(value).ir_value(loc=loc, ip=ip)],
                        f"red.global.{op} [$0], $1;", "l,l", has_side_effects=True, is_align_stack=False,
                        asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)

    return global_timer, reduce


@functools.cache
def time_store():
    """``store(trace, enabled, idx, first_only)``: ``trace[idx]`` = the global timer
    where ``enabled``, or with ``first_only`` the smaller of the two (the trace starts at
    ``NO_STAMP``)."""
    import cutlass
    import cutlass.cute as cute

    global_timer, reduce = timer_ops()

    @cute.jit
    def store(trace: cute.Tensor, enabled, idx, first_only: cutlass.Constexpr):
        if enabled:
            if cutlass.const_expr(first_only):
                reduce("min.s64", (trace.iterator + idx).toint(), global_timer())
            else:
                trace[idx] = global_timer()

    return store


def stamped_kernel_class(stamps: Stamps):
    """The stamped pair kernel: the package's, with ``stamps.stamp`` around the methods
    that mark the points."""
    import cutlass.cute as cute

    from flashmla_cute.kernels.sparse_pair_sm90 import CONSUMER_THREADS, WARPGROUP_THREADS, SparsePairDecodeSm90 as Pair

    # Each role's first thread, the one that stamps the role's points.
    SCORES_THREAD, VALUES_THREAD, GATHER_THREAD = 0, WARPGROUP_THREADS, CONSUMER_THREADS

    def thread_is(first):
        tidx, _, _ = cute.arch.thread_idx()
        return tidx == first

    # No data-dependent control flow below: plain Python, traced inline into the kernel.
    class StampedPair(Pair):
        def start_q_load(self, *args):
            stamps.stamp("entry", thread_is(SCORES_THREAD))
            Pair.start_q_load(self, *args)

        def wait_for_peer(self):
            Pair.wait_for_peer(self)
            stamps.stamp("setup done", thread_is(SCORES_THREAD))

        def consumer(self, scores, *args):
            Pair.consumer(self, scores, *args)
            if scores:
                stamps.stamp("exit", thread_is(SCORES_THREAD))

        def consume_scores(self, *args):
            stamps.stamp("Q landed", thread_is(SCORES_THREAD))
            Pair.consume_scores(self, *args)
            stamps.stamp("steps done", thread_is(SCORES_THREAD))

        def wait_tile(self, *args):
            Pair.wait_tile(self, *args)
            stamps.stamp("first tile full", thread_is(SCORES_THREAD), first_only=True)

        def write_row(self, *args):
            stamps.stamp("rows start", thread_is(SCORES_THREAD), first_only=True)
            Pair.write_row(self, *args)

        def consume_values(self, *args):
            Pair.consume_values(self, *args)
            stamps.stamp("values steps done", thread_is(VALUES_THREAD))

        def finish_pair(self, *args):
            Pair.finish_pair(self, *args)
            stamps.stamp("epilogue done", thread_is(SCORES_THREAD))
            stamps.stamp("values epilogue done", thread_is(VALUES_THREAD))

        def gather(self, *args):
            stamps.stamp("gather start", thread_is(GATHER_THREAD))
            Pair.gather(self, *args)
            stamps.stamp("gather end", thread_is(GATHER_THREAD))

        def fetch(self, *args):
            Pair.fetch(self, *args)
            stamps.stamp("first fetch out", thread_is(GATHER_THREAD), first_only=True)

        def unpack(self, *args, **kwargs):
            Pair.unpack(self, *args, **kwargs)
            stamps.stamp("first tile unpacked", thread_is(GATHER_THREAD), first_only=True)

    return StampedPair


PAIR_VARIANTS = (("v32", False), ("model1", True))
"""The pair kernel's variants (layout, extra cache) that the traced cases run."""


def pair_variants() -> list:
    """``PAIR_VARIANTS`` as ``compile.sparse_decode_variant``'s variants."""
    from flashmla_cute import compile as compile_mod

    return [compile_mod.sparse_decode_variant(layout, extra, pair_heads=True) for layout, extra in PAIR_VARIANTS]


def traced_cases() -> list:
    """``bench_sparse.py``'s cases that run the pair kernel: V3.2's production cases and
    MODEL1's with more than one head tile."""
    import bench_sparse

    from flashmla_cute.sparse_plan import HEAD_TILE

    return bench_sparse.CASE_SETS["production"] + [c for c in bench_sparse.CASE_SETS["model1"] if c.h_q > HEAD_TILE]


def compile_stamped(stamps: Stamps, options: str, variant):
    """The stamped pair kernel of ``variant`` (a pair variant of
    ``compile.sparse_decode_variant``), compiled with ``options``."""
    import cutlass.cute as cute

    kernel, args = variant.build()
    stamped = stamped_kernel_class(stamps)(kernel.layout, kernel.has_extra)
    start = time.time()
    fn = cute.compile(stamped, *args, options=options)
    print(f"compiled the stamped kernel ({variant.name}) in {time.time() - start:.1f} s", flush=True)
    return fn


def summarize(trace, label: str) -> None:
    """Each point's time from the first CTA's entry over the stamped CTAs (median, min,
    max, in us), and the CTAs' lives. ``trace``: (MAX_CTAS, len(POINTS)) int64, -1 where
    no stamp."""
    rows = [row for row in trace.tolist() if row[0] >= 0]
    print(f"\n== {label}: {len(rows)} CTAs stamped")
    if not rows:
        return
    t0 = min(row[0] for row in rows)
    stamps = sorted({v for row in rows for v in row if v >= 0})
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    if steps:
        print(f"  smallest step between stamps: {min(steps)} ns")
    for p, point in enumerate(POINTS):
        values = sorted((row[p] - t0) / 1000 for row in rows if row[p] >= 0)
        if values:
            print(f"  {point:20s} median {statistics.median(values):7.2f}  min {values[0]:7.2f}  "
                  f"max {values[-1]:7.2f} us  ({len(values)} CTAs)")
    exit_p = POINTS.index("exit")
    lives = sorted((row[exit_p] - row[0]) / 1000 for row in rows if row[exit_p] >= 0)
    if lives:
        print(f"  {'life (exit - entry)':20s} median {statistics.median(lives):7.2f}  min {lives[0]:7.2f}  "
              f"max {lives[-1]:7.2f} us")


def run(match: str) -> None:
    import torch

    from flashmla_cute import api
    from flashmla_cute import compile as compile_mod

    import bench_decode
    import bench_sparse

    trace = torch.full((MAX_CTAS, len(POINTS)), NO_STAMP, dtype=torch.int64, device="cuda")
    stamped_names = {variant.name for variant in pair_variants()}
    stamped = {}  # compiled on first use, by variant name
    package_get = compile_mod.get

    def stamped_get(variant):
        if variant.name not in stamped_names:
            return package_get(variant)
        if variant.name not in stamped:
            stamped[variant.name] = compile_stamped(Stamps(trace.data_ptr()), "--enable-tvm-ffi", variant)
        return stamped[variant.name]

    timer = bench_decode.Timer(25, 100)
    flush = torch.empty(bench_decode.FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def use(get):
        compile_mod.get = get
        api._known_sparse.clear()

    try:
        for case in traced_cases():
            if not re.search(match, case.name):
                continue
            (inputs,) = bench_sparse.case_inputs(case, 0, 0, n_sets=1)[2]
            use(package_get)
            call = bench_sparse.planned_caller(api, inputs)
            plain_ms = timer(lambda: call(inputs))
            use(stamped_get)
            call = bench_sparse.planned_caller(api, inputs)
            stamped_ms = timer(lambda: call(inputs))
            trace.fill_(NO_STAMP)
            flush.zero_()
            call(inputs)
            torch.cuda.synchronize()
            stamped_trace = trace.cpu()
            summarize(stamped_trace.masked_fill(stamped_trace == NO_STAMP, -1),
                      f"{case.name}: plain {plain_ms * 1000:.1f} us, stamped {stamped_ms * 1000:.1f} us")
    finally:
        use(package_get)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--match", default="^b2 ", metavar="REGEX",
                        help="the traced cases whose names match (default: '^b2 ')")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the stamped kernels for sm_90a (no GPU needed)")
    args = parser.parse_args(argv)
    if args.compile_only:
        os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
        for variant in pair_variants():  # any address: the kernels are not run
            compile_stamped(Stamps(1 << 40), "--gpu-arch=sm_90a", variant)
        return 0
    run(args.match)
    return 0


if __name__ == "__main__":
    sys.exit(main())
