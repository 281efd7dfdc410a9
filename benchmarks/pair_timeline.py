"""Where a pair of blocks' time goes in the decode kernel: the timeline of one CTA.

    python benchmarks/pair_timeline.py [--case B,SEQLEN,H_Q,S_Q[,var] ...] [--loads-only | --scores-only]
                                       [--no-output-stores] [--sustained SECONDS]
    python benchmarks/pair_timeline.py --compile-only   # no GPU needed: compiles for sm_90a

With ``--loads-only`` the stamped copy's consumers only wait for each pair's K tiles and
release them (no MMA, no softmax, outputs not the attention's): the K ring's own pace.
With ``--scores-only`` they also compute S as the kernel's pairs do (the left on a pair's
first block, the right on its second, side by side, each group's k-steps as it lands),
then release both tiles (no softmax, no P V): the K ring's pace with S's shared-memory
reads beside the copies. Beside a ``--loads-only`` run, it says whether S's reads delay
the K groups' landings.
With ``--no-output-stores`` its epilogues do all but store the output rows (a probe of
what the stores cost; the outputs are not written, and the work only the stores need,
their packing and shuffles, is compiled away with them).

A stamped copy of the decode kernel (a subclass of ``MlaDecodeSm90``; the package's
kernel is left as it is) reads ``clock64`` in thread 0 of each consumer warpgroup and in
lane 0 of the producer warp of one CTA (part 0, KV head 0, query tile 0) at the steps of
the schedule: a pair's start and end, S done, every wait for a K group that returns,
every release, every barrier between the consumers, every K group the producer
acquires, and each batch's epilogue (start and end, per batch rather than per pair).
The stamps go to a buffer whose address is compiled into the stamped kernel.
For each step the script prints the median, 10th and 90th percentiles over the CTA's
pairs, in cycles from the left consumer's start of the pair, and the plain and stamped
kernels' times per call (alike within noise: the stamps cost little), and how many of the
CTA's pairs ran each step (a step inside a branch runs in some of them); then what each of
the CTA's batch changes cost (``summarize_batch_changes``). The left consumer's pair
starts are also read on the global timer, so the header gives the SM's clock over the
CTA's pairs and a pair's time in microseconds. With ``--sustained SECONDS`` the same
follows for the last of SECONDS of back-to-back calls: a pair's cycles with the clock
where the board's power limit holds it, beside the call stamped after the timer's
flushed calls.

Reading it:
- a stamp right after ``BAR.SYNC.DEFER_BLOCKING`` (the "waited left_stats / right_stats"
  steps) may be taken before the barrier completes: the warp blocks at its next
  dependent instruction, so such a stamp is a lower bound; the step after it is not;
- a "waited chunks" stamp is when the consumer got past the wait: the group may have
  landed long before;
- pairs are numbered by the CTA's count of K tiles / 2; where a sequence has an odd number
  of blocks, two pairs can share a number, and the later one's stamps are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from typing import Callable, NamedTuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_decode, clock_probe, sparse_cta_timeline

MAX_PAIRS = 512  # pairs of one CTA that are stamped
MAX_STEPS = 32  # stamped steps per role and pair
EPILOGUE_STEPS = (MAX_STEPS - 2, MAX_STEPS - 1)  # a batch's epilogue start and end, stamped per batch
TIMER_STEP = MAX_STEPS - 3  # the left consumer's pair start on the global timer (ns), beside its clock64
ROLES = ("left", "right", "producer")
PRODUCER = 2
DEFAULT_CASES = [(128, 8192, 128, 2, False)]


class Stamps:
    """Trace-time state of the stamping: which role is being traced, its step names, the
    trace buffer (a tensor at a compiled-in address) and the CTA's enable predicate."""

    def __init__(self, address: int):
        self.address = address
        self.names = [dict() for _ in ROLES]
        self.active = False

    def begin(self, role: int, enabled):
        import cutlass.cute as cute
        from cutlass import Int64

        ptr = cute.make_ptr(Int64, self.address, cute.AddressSpace.gmem, assumed_align=8)
        self.trace = cute.make_tensor(ptr, cute.make_layout(len(ROLES) * MAX_STEPS * MAX_PAIRS))
        self.enabled = enabled
        self.role = role
        self.active = True

    def new_pair(self, pair):
        self.pair = pair
        self.step = 0

    def consumer_step(self, label: str):
        """The next step of the consumer being traced (steps are numbered in program order)."""
        if not self.active or self.role == PRODUCER:
            return
        step = self.step
        self.step += 1
        assert step < TIMER_STEP, f"more than {TIMER_STEP} steps: {label}"
        self.names[self.role][step] = label
        enabled = self.enabled & (self.pair < MAX_PAIRS)
        clock_store()(self.trace, enabled, (self.role * MAX_STEPS + step) * MAX_PAIRS + self.pair)
        if self.role == 0 and step == 0:
            # The same instant on the global timer: the clock's rate over the CTA's pairs.
            timer_store()(self.trace, enabled, TIMER_STEP * MAX_PAIRS + self.pair)

    def epilogue(self, end: bool, batch):
        """A consumer starts (``end`` False) or ends a batch's epilogue; stamped at the
        batch's index (below ``MAX_PAIRS``), not the pair's."""
        if not self.active or self.role == PRODUCER:
            return
        step = EPILOGUE_STEPS[int(end)]
        clock_store()(self.trace, self.enabled & (batch < MAX_PAIRS),
                      (self.role * MAX_STEPS + step) * MAX_PAIRS + batch)

    def producer_acquired(self, group: int, chunks: range, count):
        """The producer has acquired K group ``group`` of its ``count``-th K tile."""
        if not self.active or self.role != PRODUCER:
            return
        for second in (0, 1):
            block = "K1" if second else "K0"
            self.names[PRODUCER][2 * group + second] = f"acquired {chunks.start}-{chunks.stop - 1} of {block}"
        pair = count // 2
        step = 2 * group + count % 2
        clock_store()(self.trace, self.enabled & (pair < MAX_PAIRS), (PRODUCER * MAX_STEPS + step) * MAX_PAIRS + pair)


@functools.cache
def clock_store():
    """``store(trace, enabled, idx)``: ``trace[idx] = clock64()`` where ``enabled``
    (built once; the DSL is imported only when a kernel is compiled)."""
    import cutlass.cute as cute

    @cute.jit
    def store(trace: cute.Tensor, enabled, idx):
        if enabled:
            trace[idx] = cute.arch.clock64()

    return store


@functools.cache
def timer_store():
    """``store(trace, enabled, idx)``: ``trace[idx]`` = the global timer (ns) where
    ``enabled`` (built once, like ``clock_store``)."""
    import cutlass.cute as cute

    from sparse_cta_timeline import timer_ops

    global_timer, _ = timer_ops()

    @cute.jit
    def store(trace: cute.Tensor, enabled, idx):
        if enabled:
            trace[idx] = global_timer()

    return store


@contextlib.contextmanager
def stamped_steps(stamps: Stamps):
    """The K ring's waits, releases and loads (not Q's) and the consumers' barriers, stamped, while
    the stamped kernel is compiled; the package's own afterwards."""
    import cutlass.cute as cute

    from flashmla_cute.kernels import consumer_barriers, kv_stages

    ring = kv_stages.KvStages
    ring_stages = kv_stages.NUM_STAGES
    saved = {name: ring.__dict__[name] for name in ("wait", "release", "load")}
    saved_create = consumer_barriers.ConsumerBarriers.__dict__["create"]

    def wait(self, state, chunks):
        saved["wait"](self, state, chunks)
        if self.num_stages == ring_stages and (chunks.start in self.group_starts() or len(chunks) > 1):
            stamps.consumer_step(f"waited chunks {chunks.start}-{chunks.stop - 1}")

    def release(self, state, chunks):
        saved["release"](self, state, chunks)
        if self.num_stages == ring_stages:
            stamps.consumer_step(f"released {chunks.start}-{chunks.stop - 1}")

    def load(self, state, tma_k, src, dst, cache_policy, chunks):
        for g in self._whole_groups(chunks):
            begin, end = self.groups[g]
            self.pipes[g].producer_acquire(state)
            if self.num_stages == ring_stages:  # the K ring, not Q
                stamps.producer_acquired(g, range(begin, end), state.count)
            for c in range(begin, end):
                cute.copy(tma_k, src[None, c], dst[None, c], tma_bar_ptr=self.pipes[g].producer_get_barrier(state),
                          cache_policy=cache_policy)

    class StampedBarrier:
        def __init__(self, barrier, name):
            self.barrier, self.name = barrier, name

        def arrive(self):
            self.barrier.arrive()
            stamps.consumer_step(f"arrived {self.name}")

        def arrive_and_wait(self):
            self.barrier.arrive_and_wait()
            stamps.consumer_step(f"waited {self.name}")

    def create(consumer):
        bars = saved_create.__func__(consumer)
        fields = {name: getattr(bars, name) for name in bars.__dataclass_fields__}
        for name in fields:
            if name not in ("mine", "sums"):  # the messages between the consumers, not the epilogue's
                fields[name] = StampedBarrier(fields[name], name)
        return consumer_barriers.ConsumerBarriers(**fields)

    ring.wait, ring.release, ring.load = wait, release, load
    consumer_barriers.ConsumerBarriers.create = staticmethod(create)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(ring, name, method)
        consumer_barriers.ConsumerBarriers.create = saved_create


FULL, LOADS_ONLY, SCORES_ONLY = "full", "loads only", "scores only"
"""What the stamped kernel's pairs do (``stamped_kernel_class``): the package's pairs, only
wait for and release the K tiles, or that and S."""


@functools.cache
def loads_only_pair_method():
    """A consumer's pair method (``left_pair`` / ``right_pair``'s arguments) that only waits
    for the pair's K tiles (and Q) and releases them: the K ring's own pace, with no MMA
    and no softmax (the outputs are not the attention's)."""
    import cutlass.cute as cute

    @cute.jit
    def loads_only_pair(self, t, bars, kv, q, pair, first_state, second_state, has_second, *rest):
        q.wait(self.all_chunks)
        kv.wait(first_state, self.all_chunks)
        kv.release(first_state, self.all_chunks)
        if has_second:
            kv.wait(second_state, self.all_chunks)
            kv.release(second_state, self.all_chunks)

    return loads_only_pair


@functools.cache
def scores_only_pair_methods():
    """The left and right consumers' pair methods that compute S as the package's pairs
    do (the left ``S0`` on the pair's first block, the right ``S1`` on its second, each
    group's k-steps as it lands) and release both K tiles: no softmax and no P V (the
    outputs are not the attention's)."""
    import cutlass.cute as cute

    @cute.jit
    def left_scores_only(self, t, bars, kv, q, pair, first_state, second_state, has_second, seqlen, mask_from, _):
        self.block_scores(pair, first_state, kv, q, t, bars, seqlen, mask_from)
        kv.release(first_state, self.all_chunks)
        if has_second:
            kv.wait(second_state, self.all_chunks)
            kv.release(second_state, self.all_chunks)

    @cute.jit
    def right_scores_only(self, t, bars, kv, q, pair, first_state, second_state, has_second, seqlen, mask_from, _):
        if has_second:
            self.block_scores(pair + 1, second_state, kv, q, t, bars, seqlen, mask_from)
            kv.release(second_state, self.all_chunks)
        else:
            q.wait(self.all_chunks)  # no S here, but the batch's Q lands before it is released
        kv.wait(first_state, self.all_chunks)
        kv.release(first_state, self.all_chunks)

    return left_scores_only, right_scores_only


def pair_methods(pairs: str) -> tuple:
    """The left and right consumers' pair methods for ``pairs`` (``FULL``: the package's;
    ``LOADS_ONLY``: they only wait for each pair's K tiles (and Q) and release them, the K
    ring's own pace; ``SCORES_ONLY``: that and S, ``scores_only_pair_methods``). Without
    the full pairs the kernel's outputs are not the attention's."""
    from flashmla_cute.kernels.decode_sm90 import MlaDecodeSm90

    if pairs == FULL:
        return MlaDecodeSm90.left_pair, MlaDecodeSm90.right_pair
    if pairs == LOADS_ONLY:
        return (loads_only_pair_method(),) * 2
    if pairs == SCORES_ONLY:
        return scores_only_pair_methods()
    raise ValueError(f"pairs must be one of {FULL!r}, {LOADS_ONLY!r}, {SCORES_ONLY!r}, got {pairs!r}")


def stamped_kernel_class(stamps: Stamps, pairs: str = FULL):
    """The stamped kernel, its pairs as ``pairs`` says (``pair_methods``)."""
    import cutlass
    import cutlass.cute as cute

    from flashmla_cute.kernels.decode_sm90 import MlaDecodeSm90

    left_method, right_method = pair_methods(pairs)

    # No data-dependent control flow below: plain Python, traced inline into the kernel.
    def stamped_pair(role_pair):
        def pair_method(self, t, bars, kv, q, pair, first_state, *args):
            stamps.new_pair(first_state.count // 2)
            stamps.consumer_step("start")
            role_pair(self, t, bars, kv, q, pair, first_state, *args)
            stamps.consumer_step("end")

        return pair_method

    class StampedDecode(MlaDecodeSm90):
        def consume(self, wg: cutlass.Constexpr, wg_tidx, *args):
            work = args[-1]
            stamps.begin(wg, (work.part + work.kv_head + work.m_tile + wg_tidx) == 0)
            MlaDecodeSm90.consume(self, wg, wg_tidx, *args)
            stamps.active = False

        def produce(self, *args):
            work = args[-1]
            stamps.begin(PRODUCER, (work.part + work.kv_head + work.m_tile + cute.arch.lane_idx()) == 0)
            MlaDecodeSm90.produce(self, *args)
            stamps.active = False

        left_pair = stamped_pair(left_method)
        right_pair = stamped_pair(right_method)

        def block_scores(self, *args):
            MlaDecodeSm90.block_scores(self, *args)
            stamps.consumer_step("S done")

        def finish_batch(self, *args):
            batch = args[-1].batch  # its Fragment
            stamps.epilogue(False, batch)
            MlaDecodeSm90.finish_batch(self, *args)
            stamps.epilogue(True, batch)

    return StampedDecode


def compile_decode_subclass(kernel_class, options: str, tracing=contextlib.nullcontext()):
    """``kernel_class`` (a subclass of the decode kernel) built as the package's bf16 causal
    variant and compiled with ``options``, traced inside the context ``tracing``."""
    import cutlass.cute as cute

    from flashmla_cute import compile as compile_mod

    kernel, args = compile_mod.decode_variant("bfloat16", True).build()
    stamped = kernel_class(kernel.dtype, kernel.head_dim, kernel.head_dim_v, kernel.causal)
    start = time.time()
    with tracing:
        fn = cute.compile(stamped, *args, options=options)
    print(f"compiled the stamped kernel in {time.time() - start:.1f} s", flush=True)
    return fn


@contextlib.contextmanager
def output_stores_left_out():
    """The decode kernel's epilogue stores no output row while a kernel is compiled in
    the block (``utils.store_acc_row_sectors`` called with nothing valid); the package's
    own afterwards."""
    import cutlass

    from flashmla_cute.kernels import utils

    store = utils.store_acc_row_sectors

    def no_store(*args):
        store(*args[:-1], cutlass.Boolean(False))

    utils.store_acc_row_sectors = no_store
    try:
        yield
    finally:
        utils.store_acc_row_sectors = store


def compile_stamped(stamps: Stamps, options: str, pairs: str = FULL, output_stores: bool = True):
    """The stamped bf16 causal decode kernel (``stamped_kernel_class``, its pairs as
    ``pairs`` says), compiled with ``options`` (without ``output_stores``:
    ``output_stores_left_out``)."""
    tracing = contextlib.ExitStack()
    tracing.enter_context(stamped_steps(stamps))
    if not output_stores:
        tracing.enter_context(output_stores_left_out())
    return compile_decode_subclass(stamped_kernel_class(stamps, pairs), options, tracing)


@contextlib.contextmanager
def decode_kernel_swapped(fn):
    """The package's calls run the compiled decode kernel ``fn`` (a stamped copy) instead
    of their own until the block ends (None: their own); the package's is restored."""
    from flashmla_cute import compile as compile_mod
    from flashmla_cute import interface, runtime

    package_get = compile_mod.get

    def use(get):
        compile_mod.get = get
        runtime.decode_fn.cache_clear()
        interface._known_decodes.clear()

    try:
        if fn is not None:
            use(lambda variant: fn if variant.name.startswith("decode_sm90") else package_get(variant))
        yield
    finally:
        use(package_get)


def inner_pairs(arr, roles=(0,)) -> list[int]:
    """The pairs every consumer of ``roles`` stamped the start of, the CTA's first and last
    left out (its start and its end are not a steady pair)."""
    return [p for p in range(MAX_PAIRS) if all(arr[role, 0, p] >= 0 for role in roles)][1:-1]


def pair_periods(arr, pairs) -> list[int]:
    """Cycles from each of ``pairs`` to the next pair's start (the left consumer's), where
    that pair is among them too, sorted: the one definition of a period both summaries use."""
    starts = arr[0, 0]
    return sorted(int(starts[q] - starts[p]) for p, q in zip(pairs, pairs[1:]) if q == p + 1)


def clock_mhz(arr, pairs) -> float:
    """The stamped SM's clock over ``pairs``: the left consumer's ``clock64`` cycles from
    the first pair's start to the last's, over the global timer's nanoseconds between
    the same two stamps (NaN where they do not advance)."""
    first, last = pairs[0], pairs[-1]
    ns = int(arr[0, TIMER_STEP, last] - arr[0, TIMER_STEP, first])
    return int(arr[0, 0, last] - arr[0, 0, first]) * 1e3 / ns if ns > 0 else float("nan")


def summarize(arr, names, label: str) -> None:
    """Medians and spread of every step, in cycles from the left consumer's pair start,
    after the period and the SM clock over the CTA's pairs."""
    starts = arr[0, 0]
    pairs = inner_pairs(arr, roles=(0, 1))
    if len(pairs) < 3:
        print(f"\n== {label}: too few stamped pairs ({len(pairs)})")
        return
    periods = pair_periods(arr, pairs)
    mhz = clock_mhz(arr, pairs)
    print(f"\n== {label}: {len(pairs)} pairs, period median {statistics.median(periods):.0f} cycles "
          f"(p10 {periods[len(periods) // 10]}, p90 {periods[9 * len(periods) // 10]}), "
          f"clock {mhz:.0f} MHz: {statistics.median(periods) / mhz:.2f} us a pair")
    for role, role_name in enumerate(ROLES):
        print(f"  {role_name}")
        if role != PRODUCER:
            begin, end = (arr[role, step] for step in EPILOGUE_STEPS)
            spans = sorted(int(end[i] - begin[i]) for i in range(MAX_PAIRS) if begin[i] >= 0 and end[i] >= 0)
            if spans:
                print(f"    epilogue: median {statistics.median(spans):.0f} cycles over {len(spans)} batches "
                      f"(min {spans[0]}, max {spans[-1]})")
        for step, name in sorted(names[role].items()):
            values = sorted(int(arr[role, step, p] - starts[p]) for p in pairs if arr[role, step, p] >= 0)
            if values:
                print(f"    {step:2d} {name:26s} median {statistics.median(values):7.0f}  "
                      f"p10 {values[len(values) // 10]:7d}  p90 {values[9 * len(values) // 10]:7d}  "
                      f"({len(values)} pairs)")


def summarize_batch_changes(arr, names) -> None:
    """What a change of batch costs each consumer: for every batch whose epilogue lies
    between two stamped pairs with consecutive numbers, the cycles from the last pair's end
    to the epilogue, the epilogue, on to the next batch's first pair, that pair's S, and
    the two pairs' periods against the median period (their excess is the change's cost)."""
    starts = arr[0, 0]
    steady = pair_periods(arr, inner_pairs(arr))
    if len(steady) < 3:
        return
    period = statistics.median(steady)
    for role in (0, 1):
        step_of = {name: step for step, name in names[role].items()}
        if not {"start", "end", "S done"} <= step_of.keys():
            continue
        start, end, s_done = (arr[role, step_of[name]] for name in ("start", "end", "S done"))
        begin_epi, end_epi = (arr[role, step] for step in EPILOGUE_STEPS)
        rows = []
        for b in range(MAX_PAIRS):
            if begin_epi[b] < 0 or end_epi[b] < 0:
                continue
            before = [p for p in range(MAX_PAIRS) if 0 <= end[p] <= begin_epi[b]]
            after = [p for p in range(MAX_PAIRS) if start[p] >= end_epi[b]]
            if not before or not after:
                continue
            last, first = max(before, key=lambda p: end[p]), min(after, key=lambda p: start[p])
            if first != last + 1 or first + 1 >= MAX_PAIRS or starts[first + 1] < 0 or s_done[first] < 0:
                continue
            rows.append((end_epi[b] - begin_epi[b], begin_epi[b] - end[last], start[first] - end_epi[b],
                         s_done[first] - start[first], starts[first] - starts[last] - period,
                         starts[first + 1] - starts[first] - period))
        if not rows:
            continue
        columns = list(zip(*rows))
        labels = ("epilogue", "last pair's end -> epilogue", "epilogue -> next pair", "next pair's S",
                  "last pair's excess period", "first pair's excess period")
        print(f"  {ROLES[role]}: {len(rows)} batch changes (steady period {period:.0f} cycles); medians: "
              + ", ".join(f"{label} {statistics.median(int(v) for v in col):.0f}" for label, col in zip(labels, columns)))


class CaseCall(NamedTuple):
    """A package call of one case (``case_call``) and what it was planned with."""

    call: Callable
    seqlens: list  # each sequence's length
    meta: list  # the plan's rows (``scheduler.py``)


def case_call(b: int, seqlen: int, h_q: int, s_q: int, varlen: bool = False) -> CaseCall:
    """A package call (causal) on fresh inputs of one case, with fixed lengths or (``varlen``)
    ``random_seqlens``' varied ones of seed 0, planned once; it runs whichever decode
    kernel is in place (``decode_kernel_swapped``)."""
    import flashmla_cute
    from flashmla_cute.testing import make_decode_inputs, random_seqlens

    seqlens = random_seqlens(b, seqlen, s_q, varlen, 0)
    x = make_decode_inputs(b, s_q, h_q, 1, seqlen, varlen, device="cuda", seed=0, seqlens=seqlens)
    meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, s_q * h_q, 1)

    def call():
        return flashmla_cute.flash_mla_with_kvcache(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits,
                                                    causal=True)

    return CaseCall(call, seqlens.tolist(), meta.tolist())


def run(cases, pairs: str = FULL, output_stores: bool = True, sustained: float = 0.0) -> None:
    import torch

    from bench_decode import Case, Timer
    from clock_probe import run_phase

    trace = torch.full((len(ROLES) * MAX_STEPS * MAX_PAIRS,), -1, dtype=torch.int64, device="cuda")
    stamps = Stamps(trace.data_ptr())
    stamped = compile_stamped(stamps, "--enable-tvm-ffi", pairs, output_stores)
    timer = Timer(25, 100)

    def report(label: str) -> None:
        arr = trace.view(len(ROLES), MAX_STEPS, MAX_PAIRS).cpu()
        summarize(arr, stamps.names, label)
        summarize_batch_changes(arr, stamps.names)

    for case in map(Case._make, cases):
        call = case_call(*case).call
        plain_ms = timer(call)
        with decode_kernel_swapped(stamped):
            stamped_ms = timer(call)
            trace.fill_(-1)
            call()
            torch.cuda.synchronize()
        report(f"{case.name}: plain {plain_ms:.4f} ms, stamped {stamped_ms:.4f} ms")
        if sustained > 0:
            # Back to back with no flush until the board holds its clock where its power
            # limit sets it; the last call's stamps are what the trace keeps.
            with decode_kernel_swapped(stamped):
                times, _, _ = run_phase(call, sustained)
            report(f"{case.name} back to back for {sustained:g} s: stamped "
                   f"{statistics.median(times):.4f} ms a call, the last one stamped")


CASE_METAVAR = "B,SEQLEN,H_Q,S_Q[,var]"
"""A ``--case`` of this tool and of ``cta_timeline.py`` (``parse_case``)."""


def parse_case(text: str) -> tuple:
    """``B,SEQLEN,H_Q,S_Q`` (fixed lengths) or ``B,SEQLEN,H_Q,S_Q,var`` (varied), four
    positive integers, as ``(b, seqlen, h_q, s_q, varlen)``."""
    fields = text.split(",")
    varlen = len(fields) == 5 and fields[4] == "var"
    try:
        values = tuple(int(v) for v in fields[:4])
    except ValueError:
        values = ()
    if len(values) != 4 or len(fields) != 4 + varlen or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"--case wants {CASE_METAVAR}, got {text!r}")
    return values + (varlen,)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", type=parse_case, action="append", metavar=CASE_METAVAR,
                        help="a decode case (bf16, causal, h_kv 1; var: varied lengths); repeatable "
                             "(default: 128,8192,128,2)")
    kinds = parser.add_mutually_exclusive_group()
    kinds.add_argument("--loads-only", dest="pairs", action="store_const", const=LOADS_ONLY, default=FULL,
                       help="the consumers only wait for and release the K tiles: the K ring's own pace")
    kinds.add_argument("--scores-only", dest="pairs", action="store_const", const=SCORES_ONLY,
                       help="the consumers compute S on their blocks and release the K tiles: the ring's "
                            "pace with S's shared-memory reads beside the copies")
    parser.add_argument("--no-output-stores", action="store_true",
                        help="the epilogues do all but store the output rows (what the stores cost)")
    parser.add_argument("--sustained", type=float, default=0.0, metavar="SECONDS",
                        help="also stamp the last of SECONDS of back-to-back calls (no flush): the pair "
                             "under the board's power limit")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the stamped kernel for sm_90a and list its steps (no GPU needed)")
    args = parser.parse_args(argv)
    if args.compile_only:
        os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
        stamps = Stamps(1 << 40)  # any address: the kernel is not run
        compile_stamped(stamps, "--gpu-arch=sm_90a", args.pairs, not args.no_output_stores)
        for role, names in zip(ROLES, stamps.names):
            print(f"{role}: " + "; ".join(names[s] for s in sorted(names)))
        return 0
    run(args.case or DEFAULT_CASES, args.pairs, not args.no_output_stores, args.sustained)
    return 0


if __name__ == "__main__":
    sys.exit(main())
