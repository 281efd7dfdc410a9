"""When each CTA of the dense decode kernel starts, begins its last epilogue and ends, on
one clock for all SMs: whether a call's time is its CTAs' common pace or the last of
them.

    python benchmarks/cta_timeline.py [--case B,SEQLEN,H_Q,S_Q[,var] ...]
    python benchmarks/cta_timeline.py --loads-only [--case ...]   # the K stream alone
    python benchmarks/cta_timeline.py --compile-only   # no GPU needed: compiles for sm_90a

A stamped copy of the decode kernel (a subclass of ``MlaDecodeSm90``; the package's
kernel is left as it is) reads the GPU's global timer (``%globaltimer``, the same on every
SM) in the first thread of each consumer warpgroup at the points of ``POINTS``: the
consumer's start, the start of each batch's epilogue (the last one is kept: the end of
the CTA's last K tile) and its end; it sums in ``SUMS`` the time each consumer spends in
its pairs of blocks and counts them; and it keeps the SM the CTA ran on. The stamps go to
a buffer whose address is compiled into the stamped kernel, one row a CTA (``m_tile +
tiles * (kv_head + heads * part)``).

For each case the script times the plain and the stamped call (``bench_decode``'s timer,
an L2 flush before each call), then stamps one call after a flush and prints, for each
point, percentiles over the CTAs of its time from the first CTA's start, in
microseconds, how far the CTAs' ends spread, each CTA's mean time a pair and the share
of its life spent in pairs, that time a pair by SM, and what a fragment costs: each
CTA's life fitted over the CTAs as a cost a pair plus a cost a fragment of its part
(``print_fragment_cost``; a varied-length case gives the parts different counts).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_decode, pair_timeline, sparse_cta_timeline

MAX_CTAS = 4096  # CTAs of one call that are stamped
POINTS = ("left start", "left last epilogue", "left end", "right start", "right last epilogue", "right end")
"""The stamped points, in the order of the trace's first columns."""
SUMS = ("left pairs ns", "left pairs", "right pairs ns", "right pairs")
"""The summed columns after them: each consumer's time in its pairs (ns) and its pairs."""
SM = "sm"
"""The last column: the SM the CTA ran on (``%smid``)."""
COLUMNS = POINTS + SUMS + (SM,)
SM_BIN = 8  # SMs a bin of the time-a-pair-by-SM line
DEFAULT_CASES = [(128, 8192, 128, 2, False), (128, 4096, 128, 2, False)]
NO_STAMP = -1


class Stamps:
    """Trace-time state: the trace buffer's address (``MAX_CTAS`` rows of ``len(COLUMNS)``
    int64 values)."""

    def __init__(self, address: int):
        self.address = address

    def _slot(self, column: str):
        """(this CTA's row exists, the trace and the index of ``column`` in the row)."""
        import cutlass.cute as cute
        from cutlass import Int64

        ptr = cute.make_ptr(Int64, self.address, cute.AddressSpace.gmem, assumed_align=8)
        trace = cute.make_tensor(ptr, cute.make_layout(MAX_CTAS * len(COLUMNS)))
        m_tile, kv_head, part = cute.arch.block_idx()
        tiles, heads, _ = cute.arch.grid_dim()
        cta = m_tile + tiles * (kv_head + heads * part)
        return cta < MAX_CTAS, trace, cta * len(COLUMNS) + COLUMNS.index(column)

    def stamp(self, point: str, enabled):
        """Store the global timer at ``point`` of this CTA's row where ``enabled`` (a
        later store of the same point replaces an earlier one)."""
        from sparse_cta_timeline import time_store

        in_trace, trace, idx = self._slot(point)
        time_store()(trace, enabled & in_trace, idx, False)

    def record_sm(self, enabled):
        """Store this CTA's SM number in its row where ``enabled``."""
        in_trace, trace, idx = self._slot(SM)
        sm_store()(trace, enabled & in_trace, idx)

    def add(self, column: str, enabled, sign: int = 0):
        """Add to ``column`` of this CTA's row where ``enabled``: the global timer times
        ``sign`` (+1 or -1: a span's end and start), or 1 with ``sign`` 0 (a count)."""
        in_trace, trace, idx = self._slot(column)
        trace_add()(trace, enabled & in_trace, idx, sign)


@functools.cache
def trace_add():
    """``add(trace, enabled, idx, sign)``, ``Stamps.add``'s device side; built once, as
    ``sparse_cta_timeline.time_store``."""
    import cutlass
    import cutlass.cute as cute
    from cutlass import Int64

    from sparse_cta_timeline import timer_ops

    global_timer, reduce = timer_ops()

    @cute.jit
    def add(trace: cute.Tensor, enabled, idx, sign: cutlass.Constexpr):
        if enabled:
            value = Int64(1)
            if cutlass.const_expr(sign != 0):
                value = global_timer() * Int64(sign)
            reduce("add.u64", (trace.iterator + idx).toint(), value)

    return add


@functools.cache
def sm_store():
    """``store(trace, enabled, idx)``, ``Stamps.record_sm``'s device side."""
    import cutlass.cute as cute
    from cutlass import Int64

    @cute.jit
    def store(trace: cute.Tensor, enabled, idx):
        if enabled:
            trace[idx] = Int64(cute.arch.smid())

    return store


def stamped_kernel_class(stamps: Stamps, loads_only: bool = False):
    """The stamped decode kernel: the package's, with ``stamps.stamp`` around ``consume``
    and ``finish_batch``; with ``loads_only``, its pairs are ``pair_timeline``'s that only
    wait for their K tiles and release them."""
    import cutlass

    from flashmla_cute.kernels.decode_sm90 import MlaDecodeSm90
    from pair_timeline import FULL, LOADS_ONLY, pair_methods

    roles = ("left", "right")
    methods = dict(zip(roles, pair_methods(LOADS_ONLY if loads_only else FULL)))

    # No data-dependent control flow below: plain Python, traced inline into the kernel.
    class StampedDecode(MlaDecodeSm90):
        def consume(self, wg: cutlass.Constexpr, wg_tidx, *args):
            stamps.stamp(f"{roles[wg]} start", wg_tidx == 0)
            if cutlass.const_expr(wg == 0):
                stamps.record_sm(wg_tidx == 0)
            MlaDecodeSm90.consume(self, wg, wg_tidx, *args)
            stamps.stamp(f"{roles[wg]} end", wg_tidx == 0)

        def finish_batch(self, wg: cutlass.Constexpr, t, *args):
            stamps.stamp(f"{roles[wg]} last epilogue", t.wg_tidx == 0)
            MlaDecodeSm90.finish_batch(self, wg, t, *args)

        def left_pair(self, t, *args):
            timed_pair(methods["left"], "left", self, t, *args)

        def right_pair(self, t, *args):
            timed_pair(methods["right"], "right", self, t, *args)

    def timed_pair(role_pair, role: str, self, t, *args):
        stamps.add(f"{role} pairs", t.wg_tidx == 0)
        stamps.add(f"{role} pairs ns", t.wg_tidx == 0, -1)
        role_pair(self, t, *args)
        stamps.add(f"{role} pairs ns", t.wg_tidx == 0, 1)

    return StampedDecode


def compile_stamped(stamps: Stamps, options: str, loads_only: bool = False):
    """The stamped bf16 causal decode kernel (``stamped_kernel_class``), compiled with
    ``options``."""
    from pair_timeline import compile_decode_subclass

    return compile_decode_subclass(stamped_kernel_class(stamps, loads_only), options)


def percentiles(values: list) -> str:
    values = sorted(values)
    pick = [values[int(q * (len(values) - 1))] for q in (0.0, 0.1, 0.5, 0.9, 1.0)]
    return "min {:8.1f}  p10 {:8.1f}  median {:8.1f}  p90 {:8.1f}  max {:8.1f} us".format(*pick)


def summarize(rows: list, label: str) -> None:
    """Each point's time from the first CTA's start over the stamped CTAs, the spread of
    the CTAs' ends, and each CTA's time a pair. ``rows``: one list of ``len(COLUMNS)``
    values (ns, counts) a CTA that ran."""
    print(f"\n== {label}: {len(rows)} CTAs stamped")
    if not rows:
        return
    t0 = min(row[0] for row in rows)
    for p, point in enumerate(POINTS):
        values = [(row[p] - t0) / 1000 for row in rows if row[p] != NO_STAMP]
        if values:
            print(f"  {point:20s} {percentiles(values)}")
    end, count = POINTS.index("right end"), COLUMNS.index("right pairs")
    ends = sorted((row[end] - t0) / 1000 for row in rows if row[end] != NO_STAMP and row[count] > 0)
    if ends:
        print(f"  of the CTAs with pairs, the last ends {ends[-1] - statistics.median(ends):.1f} us after the median "
              f"one and {ends[-1] - statistics.mean(ends):.1f} us after the mean; "
              f"{sum(e > 0.97 * ends[-1] for e in ends)} of {len(ends)} end in the last 3% of the span")
    for role in ("left", "right"):
        ns, count = COLUMNS.index(f"{role} pairs ns"), COLUMNS.index(f"{role} pairs")
        start, stop = POINTS.index(f"{role} start"), POINTS.index(f"{role} end")
        working = [row for row in rows if row[count] > 0]
        if working:
            print(f"  {role + ' time a pair':20s} " + percentiles([row[ns] / row[count] / 1000 for row in working]))
            shares = sorted(row[ns] / (row[stop] - row[start]) for row in working)
            print(f"  {role + ' share in pairs':20s} median {100 * statistics.median(shares):.1f}%, "
                  f"min {100 * shares[0]:.1f}% ({len(working)} CTAs with pairs)")
    print_pair_time_by_sm(rows)


def print_pair_time_by_sm(rows: list) -> None:
    """The left consumer's mean time a pair over the CTAs of each bin of ``SM_BIN`` SMs
    (by ``%smid``), in us: whether the slow CTAs are the SMs' or the work's."""
    ns, count, sm = COLUMNS.index("left pairs ns"), COLUMNS.index("left pairs"), COLUMNS.index(SM)
    bins = {}
    for row in rows:
        if row[count] > 0 and row[sm] != NO_STAMP:
            bins.setdefault(row[sm] // SM_BIN, []).append(row[ns] / row[count] / 1000)
    if bins:
        cells = [f"{b * SM_BIN}: {statistics.mean(v):.2f}" for b, v in sorted(bins.items())]
        print(f"  left time a pair by SM (first SM of each {SM_BIN}: mean us) " + ", ".join(cells))


def part_work(meta: list, seqlens: list) -> list:
    """(fragments, pairs of blocks) of each part of the plan ``meta`` (its rows) for
    ``seqlens``: its fragments (``scheduler.part_fragments``) and, in each, the blocks the
    decode kernel loads (none past a sequence's last page) two at a time."""
    from flashmla_cute.scheduler import BLOCK_SIZE, part_fragments, plan_blocks

    blocks = plan_blocks(seqlens)
    work = []
    for row in meta:
        pieces = part_fragments(row, blocks)
        loaded = [min(last, -(-seqlens[batch] // BLOCK_SIZE)) - first for batch, first, last in pieces]
        work.append((len(pieces), sum(-(-max(n, 0) // 2) for n in loaded)))
    return work


def print_fragment_cost(rows: dict, work: list, tiles: int) -> None:
    """Fits each CTA's life (its first start to its last end, us) as ``a pairs + b
    fragments + c`` over the CTAs with pairs (``rows``: trace rows by CTA index, ``work``:
    ``part_work`` of the plan, ``tiles`` query tiles a part), prints a fragment's cost in
    blocks (``b / (a / 2)``, against the planner's F) and the CTAs' mean end by their part's
    fragment count."""
    import torch

    from flashmla_cute.scheduler import FIXED_OVERHEAD_BLOCKS

    start, end = POINTS.index("left start"), POINTS.index("right end")
    t0 = min(row[start] for row in rows.values())
    samples = []  # (pairs, fragments, start us, end us)
    for index, row in rows.items():
        fragments, pairs = work[index // tiles]
        if pairs > 0 and row[end] != NO_STAMP:
            samples.append((pairs, fragments, (row[start] - t0) / 1000, (row[end] - t0) / 1000))
    if len(samples) < 4 or len({s[1] for s in samples}) < 2:
        print("  a fragment's cost: the parts' fragment counts do not vary enough to fit it")
        return
    x = torch.tensor([[p, f, 1.0] for p, f, _, _ in samples], dtype=torch.float64)
    life = torch.tensor([[e - b] for _, _, b, e in samples], dtype=torch.float64)
    (a, b, c), = torch.linalg.lstsq(x, life).solution.T.tolist()
    residual = (x @ torch.tensor([[a], [b], [c]], dtype=torch.float64) - life).pow(2).mean().sqrt().item()
    print(f"  life of a CTA = {a:.3f} us a pair + {b:.2f} us a fragment + {c:.1f} us (rms residual {residual:.2f} us, "
          f"{len(samples)} CTAs): a fragment costs {2 * b / a:.2f} blocks (the planner charges {FIXED_OVERHEAD_BLOCKS})")
    by_count = {}
    for pairs, fragments, _, stop in samples:
        by_count.setdefault(fragments, []).append((stop, pairs))
    print("  by fragments of the part (CTAs, mean pairs, mean end us): " + "; ".join(
        f"{f}: {len(v)}, {statistics.mean(p for _, p in v):.1f}, {statistics.mean(e for e, _ in v):.1f}"
        for f, v in sorted(by_count.items())))


def run(cases, loads_only: bool = False) -> None:
    import torch

    from bench_decode import FLUSH_BYTES, Case, Timer
    from flashmla_cute.scheduler import num_query_tiles
    from pair_timeline import case_call, decode_kernel_swapped

    trace = torch.full((MAX_CTAS, len(COLUMNS)), NO_STAMP, dtype=torch.int64, device="cuda")
    stamped = compile_stamped(Stamps(trace.data_ptr()), "--enable-tvm-ffi", loads_only)
    timer = Timer(25, 100)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for case in map(Case._make, cases):
        call, seqlens, meta = case_call(*case)
        plain_ms = timer(call)
        with decode_kernel_swapped(stamped):
            stamped_ms = timer(call)
            trace.fill_(NO_STAMP)
            trace[:, len(POINTS):len(POINTS) + len(SUMS)] = 0  # the sums start at 0
            flush.zero_()
            call()
            torch.cuda.synchronize()
        rows = {index: row for index, row in enumerate(trace.tolist()) if row[0] != NO_STAMP}
        summarize(list(rows.values()), f"{case.name}: plain {plain_ms * 1000:.1f} us, "
                                       f"stamped {stamped_ms * 1000:.1f} us")
        print_fragment_cost(rows, part_work(meta, seqlens), num_query_tiles(case.s_q * case.h_q))


def main(argv=None) -> int:
    from pair_timeline import CASE_METAVAR, parse_case

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", type=parse_case, action="append", metavar=CASE_METAVAR,
                        help="a case to stamp (var: varied lengths; repeatable; default: b128 sk8192 and "
                             "sk4096, h_q 128, s_q 2)")
    parser.add_argument("--loads-only", action="store_true",
                        help="stamp pair_timeline's kernel whose pairs only wait for their K tiles")
    parser.add_argument("--compile-only", action="store_true", help="compile the stamped kernel for sm_90a")
    args = parser.parse_args(argv)
    if args.compile_only:
        os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
        compile_stamped(Stamps(1 << 40), "--gpu-arch=sm_90a", args.loads_only)  # any address: not run
        return 0
    run(args.case or DEFAULT_CASES, args.loads_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
