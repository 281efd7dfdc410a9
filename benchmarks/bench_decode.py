"""Decode benchmark on FlashMLA's case grids, with the machine's two ceilings from the same run
and, when they can be imported, FlashMLA itself timed on the same inputs.

    python benchmarks/bench_decode.py [--cases all|quick|serving] [--check] [--json PATH] [--csv PATH]
                                      [--plot FILE.png] [--dtype bfloat16] [--no-peers]
    python benchmarks/bench_decode.py --cases all --confirm 2   # the cases behind, twice more
    python benchmarks/bench_decode.py --plot-from results.json --plot FILE.png   # no GPU needed

Measures, in one process:

1. copy bandwidth: a large device-to-device ``copy_`` (bytes read + written per second);
2. matmul rate: a bf16 8192 x 8192 x 8192 ``torch.matmul``;
3. ``flash_mla_with_kvcache`` (h_kv = 1, d = 576, dv = 512, causal, 64-token pages) on one
   of three case sets:

   - ``all``: the grid b = 128, seqlen 4096 / 8192, h_q 16 / 32 / 64 / 128, s_q 1 / 2,
     fixed and varied lengths (varied: Normal(seqlen, seqlen / 2), clamped to >= s_q);
   - ``quick``: the 5 cases of that grid with FlashMLA anchors in benchmarks/NOTES.md;
   - ``serving``: small batches, b 1 / 8 / 32 x seqlen 1024 / 16384 x h_q 16 / 128 (s_q 1),
     b 4 at seqlen 32768 with h_q 16, and b 64 at mean seqlen 2048 (varied) with h_q 32, s_q 2.

Peers: FlashMLA's Feb-2025 release (``import flash_mla``) and its current version (``import
flash_mla_head``), built from source, are timed on the same inputs in the same run when they
import (``--no-peers`` leaves them out). Each case then reports ``ratio`` = the faster peer's
time / ours (above 1: ours is faster), and the run the geometric mean of the ratios.

Each case reports its median time, GB/s (``decode_bytes`` / time), TFLOPS
(``decode_flops`` / time) and both as fractions of the same run's ceilings: timings on one
machine drift by several percent between runs, ratios taken in one run drift much less
(benchmarks/NOTES.md describes the method and keeps the measurements).
Metadata is computed once per case, outside the timed region. Times come from
``triton.testing.do_bench`` (median; it flushes L2 before each run) or, without triton,
from CUDA events around single calls after an L2 flush; each implementation is timed in
``--rounds`` rounds (3), the order turned by one place a round, and its time is the median
of its rounds (at the board's power limit, what ran just before a kernel moves its clock).
Cases whose inputs are smaller than 4x L2 rotate between several input sets.

``--confirm RUNS`` times every case behind the faster peer (ratio below 1.00) ``RUNS`` more
times once the table is done, on the same inputs, and reports each one's ratio as the
median of its runs, the table's included: the rule for a case near 1.00, whose ratio one
run cannot settle at the board's power limit.

``--json`` and ``--csv`` write every number (device, date, ceilings, every column of every
case); ``--plot`` draws GB/s and TFLOPS per case and implementation with the ceilings
(needs matplotlib), from this run or, with ``--plot-from``, from a saved JSON.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

H_KV = 1
D, DV = 576, 512
BLOCK_SIZE = 64


class Case(NamedTuple):
    """One benchmark case: ``b`` sequences of ``seqlen`` tokens (mean, with ``varlen``),
    ``h_q`` query heads, ``s_q`` query tokens."""

    b: int
    seqlen: int
    h_q: int
    s_q: int = 1
    varlen: bool = False

    @property
    def name(self) -> str:
        return f"b{self.b} sk{self.seqlen} h{self.h_q} s{self.s_q}" + (" var" if self.varlen else "")

    @classmethod
    def of_row(cls, row: dict) -> "Case":
        """The case a result row (of this script's JSON) was measured on."""
        return cls(*(row[field] for field in cls._fields))


GRID_BATCH = 128
GRID_SEQLENS = (4096, 8192)
GRID_HEADS = (16, 32, 64, 128)
GRID_S_QS = (1, 2)

CASE_SETS = {
    "all": [
        Case(GRID_BATCH, seqlen, h_q, s_q, varlen)
        for seqlen in GRID_SEQLENS
        for h_q in GRID_HEADS
        for s_q in GRID_S_QS
        for varlen in (False, True)
    ],
    # The cases benchmarks/NOTES.md's anchor table has numbers for.
    "quick": [
        Case(GRID_BATCH, 8192, 16),
        Case(GRID_BATCH, 8192, 64),
        Case(GRID_BATCH, 8192, 128),
        Case(GRID_BATCH, 8192, 128, 2),
        Case(GRID_BATCH, 4096, 16, 1, True),
    ],
    # Serving: small batches, as an engine sees them between batch-128 peaks.
    "serving": [
        Case(b, seqlen, h_q) for b in (1, 8, 32) for seqlen in (1024, 16384) for h_q in (16, 128)
    ] + [
        Case(4, 32768, 16),
        Case(64, 2048, 32, 2, True),
    ],
}

# FlashMLA (Feb 2025 build) measured on this project's H100, for reference in the printed
# table (benchmarks/NOTES.md). Same run: copy 3020 GB/s, cuBLAS 715.
ANCHORS = {
    Case(GRID_BATCH, 8192, 16): "0.414 ms 2931 GB/s",
    Case(GRID_BATCH, 8192, 64): "0.421 ms 347 TF",
    Case(GRID_BATCH, 8192, 128): "0.561 ms 521 TF",
    Case(GRID_BATCH, 8192, 128, 2): "1.048 ms 557 TF",
    Case(GRID_BATCH, 4096, 16, 1, True): "0.233 ms 2621 GB/s",
    Case(1, 1024, 16): "0.015 ms",
    Case(1, 16384, 128): "0.031 ms",
    Case(8, 1024, 128): "0.024 ms",
    Case(32, 16384, 128): "0.281 ms",
}

OURS = "flashmla_cute"
PEER_LABELS = {"flash_mla": "FlashMLA Feb 2025", "flash_mla_head": "FlashMLA current"}
"""Importable FlashMLA builds timed beside this package, and how the report names them."""

DEFAULT_L2_BYTES = 50 * 1024 * 1024
COPY_BYTES = 2 * 1024**3
MATMUL_N = 8192
MAX_INPUT_SETS = 32


def import_package():
    """Import flashmla_cute from this checkout's src/ when there is one (the code being
    measured), else from wherever it is installed."""
    src = Path(__file__).resolve().parent.parent / "src"
    if (src / "flashmla_cute" / "__init__.py").exists() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    import flashmla_cute

    return flashmla_cute


def import_peers(wanted: bool, names=tuple(PEER_LABELS)) -> dict:
    """The FlashMLA modules of ``names`` that import here, by name; says which do not and why."""
    peers = {}
    if not wanted:
        return peers
    for name in names:
        try:
            peers[name] = importlib.import_module(name)
        except Exception as error:  # not built, or built for another torch: leave it out
            print(f"peer {name} ({PEER_LABELS[name]}) not timed: {type(error).__name__}: {error}")
    return peers


# --------------------------------------------------------------------------- timing


FLUSH_BYTES = 256 * 1024 * 1024
"""What is zeroed before each timed call to empty L2 (triton's ``do_bench`` zeroes as much)."""


class Timer:
    """Median milliseconds of ``fn()``; ``fn`` may cycle through input sets itself."""

    def __init__(self, warmup_ms: float, rep_ms: float):
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        try:
            import triton.testing

            self._do_bench = triton.testing.do_bench
            self.name = "triton.testing.do_bench (median)"
        except ImportError:
            self._do_bench = None
            self.name = "CUDA events (median)"

    def __call__(self, fn) -> float:
        if self._do_bench is not None:
            return float(self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        return self._events_median(fn)

    def _events_median(self, fn) -> float:
        import torch

        flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
        fn()
        torch.cuda.synchronize()
        # Estimate one call's time to turn the millisecond budgets into counts.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / 5, 1e-3)
        n_warmup = max(1, int(self.warmup_ms / estimate))
        n_rep = max(5, int(self.rep_ms / estimate))
        for _ in range(n_warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for i in range(n_rep):
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def no_hopper_reason(script: str) -> str | None:
    """Why ``script`` cannot run here (no CUDA GPU, or not a Hopper one), or None."""
    import torch

    if not torch.cuda.is_available():
        return f"{script} needs a CUDA GPU (Hopper, sm_90): torch.cuda.is_available() is False."
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0):
        return (f"{script} needs a Hopper (sm_90) GPU; found {torch.cuda.get_device_name()} "
                f"(compute capability {cap[0]}.{cap[1]}).")
    return None


def l2_bytes() -> int:
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


# --------------------------------------------------------------------------- ceilings


def measure_copy(timer: Timer) -> dict:
    import torch

    n = COPY_BYTES // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_(-1, 1)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    moved = 2 * src.numel() * src.element_size()  # read + write
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": moved, "ms": ms, "gbps": moved / (ms * 1e-3) / 1e9}


def measure_matmul(timer: Timer) -> dict:
    import torch

    n = MATMUL_N
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    c = torch.empty(n, n, dtype=torch.bfloat16, device="cuda")
    ms = timer(lambda: torch.matmul(a, b, out=c))
    flops = 2 * n**3
    del a, b, c
    torch.cuda.empty_cache()
    return {"n": n, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}


# --------------------------------------------------------------------------- implementations
# Each returns ``call(inputs) -> (out, lse)`` for one case, its plan made once, outside the
# timed region, and reused for every input set (they share the sequence lengths).


def ours_caller(fm, first, case: Case):
    meta, num_splits = fm.get_mla_metadata(first.cache_seqlens, case.s_q * case.h_q // H_KV, H_KV)
    return lambda inp: fm.flash_mla_with_kvcache(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, DV, meta, num_splits, causal=True
    )


def feb2025_caller(flash_mla, first, case: Case):
    meta, num_splits = flash_mla.get_mla_metadata(first.cache_seqlens, case.s_q * case.h_q // H_KV, H_KV)
    return lambda inp: flash_mla.flash_mla_with_kvcache(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, DV, meta, num_splits, causal=True
    )


def head_caller(flash_mla_head, first, case: Case):
    sched, _ = flash_mla_head.get_mla_metadata()

    def call(inp):
        return flash_mla_head.flash_mla_with_kvcache(
            inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, DV, sched, None, causal=True
        )

    call(first)  # the first call plans into ``sched``; later calls reuse the plan
    return call


CALLERS = {OURS: ours_caller, "flash_mla": feb2025_caller, "flash_mla_head": head_caller}


# --------------------------------------------------------------------------- decode cases


def column(impl: str, key: str) -> str:
    """The result-row key of ``impl``'s ``key`` (``ms``, ``gbps``, ...): ours unprefixed."""
    return key if impl == OURS else f"{impl}_{key}"


def input_sets(nbytes: int, l2: int) -> int:
    """How many input sets a case cycles through: one when a call moves at least 4x L2
    (``nbytes``), else enough that consecutive calls of the cycle cannot share L2."""
    return 1 if nbytes >= 4 * l2 else min(MAX_INPUT_SETS, max(2, math.ceil(4 * l2 / nbytes)))


def case_seqlens(testing, case: Case, seed: int, multiple: int = 1):
    """The sequence lengths of ``case`` drawn from ``seed``, each rounded up to a
    ``multiple`` of tokens (1: as drawn). A multiple of 64 leaves no partial last block, of
    128 no odd count of blocks: timed beside the lengths as drawn, that separates what a
    sequence's last blocks cost from the rest of a varied-length case."""
    seqlens = testing.random_seqlens(case.b, case.seqlen, case.s_q, case.varlen, seed)
    return (seqlens + multiple - 1) // multiple * multiple


def run_case(modules: dict, testing, case: Case, dtype, timer: Timer, l2: int, check: bool, seed: int,
             device: str = "cuda", rounds: int = 1, lengths_multiple: int = 1) -> dict:
    """Times every implementation in ``modules`` (ours first) on the same inputs."""
    import torch

    seqlens = case_seqlens(testing, case, seed, lengths_multiple)

    def inputs(set_seed):
        return testing.make_decode_inputs(
            case.b, case.s_q, case.h_q, h_kv=H_KV, seqlen=case.seqlen, d=D, dtype=dtype,
            device=device, seed=set_seed, seqlens=seqlens,
        )

    first = inputs(seed)
    # Bytes one call reads and writes. Under 4x L2, a repeated call could find part of its
    # inputs still in L2, so such cases cycle through several input sets.
    nbytes = testing.decode_bytes(seqlens, case.s_q, case.h_q, H_KV, D, DV, element_size=first.q.element_size())
    flops = testing.decode_flops(seqlens, case.s_q, case.h_q, D, DV)
    n_sets = input_sets(nbytes, l2)
    sets = [first] + [inputs(seed + i) for i in range(1, n_sets)]

    result = {
        **case._asdict(), "h_kv": H_KV, "total_kv_tokens": int(seqlens.sum()), "lengths_multiple": lengths_multiple,
        "input_sets": n_sets,
        "flops": float(flops), "bytes": float(nbytes),
    }
    def reference():
        from flashmla_cute.reference import flash_mla_reference

        return flash_mla_reference(first.q, first.k_cache, first.block_table, first.cache_seqlens, DV, causal=True)

    calls = {impl: CALLERS[impl](module, first, case) for impl, module in modules.items()}
    time_and_check(calls, sets, reference if check else None, timer, flops, nbytes, result, rounds)
    result.update(compare_with_peers(result, [impl for impl in modules if impl != OURS]))
    del sets, first
    torch.cuda.empty_cache()
    return result


def cycled(call, sets: list):
    """``fn()`` that calls ``call`` on ``sets`` in turn, the next set each time (what a
    ``Timer`` times, so that consecutive calls do not share L2)."""
    counter = [0]

    def fn():
        inp = sets[counter[0] % len(sets)]
        counter[0] += 1
        call(inp)

    return fn


def time_and_check(calls: dict, sets: list, reference, timer: Timer, flops: float, nbytes: float | None,
                   result: dict, rounds: int = 1) -> None:
    """Each implementation of ``calls`` (``impl -> call(inputs) -> (out, lse)``, ours
    first): one call outside the timed region (compiling, planning), then with a
    ``reference`` (``() -> (out, lse)`` on ``sets[0]``) the cosine distance of ours to it
    and of each peer to ours; then ``rounds`` rounds, each timing every implementation
    (the median time over calls cycling through ``sets``), the order turned by one place
    a round; an implementation's time is the median of its rounds. Writes ``result``'s
    columns (``gbps`` only where ``nbytes`` is given; ``ms_rounds``, every round's time).

    Why rounds in turned orders: at the board's power limit a compute-bound kernel's
    clock depends on what ran just before it (the reference, the previous case, the
    implementation before it), so a fixed order favours some implementation by a few
    percent (benchmarks/NOTES.md, "The order of the implementations")."""
    import torch

    from flashmla_cute import testing

    ours_out = ours_lse = None
    for impl, call in calls.items():
        out, lse = call(sets[0])
        torch.cuda.synchronize()
        if impl == OURS:
            ours_out, ours_lse = out, lse
            if reference is not None:
                ref_out, ref_lse = reference()
                result["cos_out"] = float(testing.cosine_distance(out.float(), ref_out.float()))
                result["cos_lse"] = float(testing.cosine_distance(lse, ref_lse))
                del ref_out, ref_lse
        elif reference is not None:  # a peer, against ours
            result[column(impl, "cos_out")] = float(testing.cosine_distance(out.float(), ours_out.float()))
            result[column(impl, "cos_lse")] = float(testing.cosine_distance(lse, ours_lse))
        del out, lse

    impls = list(calls)
    times = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
            times[impl].append(timer(cycled(calls[impl], sets)))
    for impl in impls:
        ms = statistics.median(times[impl])
        result[column(impl, "ms")] = ms
        result[column(impl, "ms_rounds")] = times[impl]
        if nbytes is not None:
            result[column(impl, "gbps")] = nbytes / (ms * 1e-3) / 1e9
        result[column(impl, "tflops")] = flops / (ms * 1e-3) / 1e12


def compare_with_peers(row: dict, peers: list[str]) -> dict:
    """``ratio``: the faster peer's time over ours (above 1: ours is faster), and which
    peer that is; nothing without peers."""
    if not peers:
        return {}
    faster = min(peers, key=lambda peer: row[column(peer, "ms")])
    return {"ratio": row[column(faster, "ms")] / row["ms"], "faster_peer": faster}


def geometric_mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not values:
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def confirm_behind(rows: list[dict], rerun: Callable[[int], float], runs: int) -> list[dict]:
    """The rows behind the faster peer (``ratio`` below 1), each timed ``runs`` more times:
    ``rerun(n)`` times the case of ``rows[n]`` again and returns its ratio. The reruns go
    in passes over those cases, after the whole table, as later runs would. Writes each
    such row's ``ratio_runs`` (the table's ratio first) and ``ratio_median``; returns those
    rows."""
    behind = [n for n, row in enumerate(rows) if row["ratio"] < 1.0]
    for n in behind:
        rows[n]["ratio_runs"] = [rows[n]["ratio"]]
    for _ in range(runs):
        for n in behind:
            rows[n]["ratio_runs"].append(rerun(n))
    for n in behind:
        rows[n]["ratio_median"] = statistics.median(rows[n]["ratio_runs"])
    return [rows[n] for n in behind]


def print_confirmation(behind: list[dict], runs: int) -> None:
    """Each case behind in the table with its ratios over ``runs`` + 1 runs and their
    median, and how many are at or above 1.00 by the median."""
    print(f"cases behind in the table, timed {runs} more times (ratio of each run; median):")
    for row in behind:
        ratios = " / ".join(f"{ratio:.3f}" for ratio in row["ratio_runs"])
        print(f"  {Case.of_row(row).name}: {ratios}; median {row['ratio_median']:.3f}")
    level = sum(1 for row in behind if row["ratio_median"] >= 1.0)
    print(f"by the median: {level} of {len(behind)} at or above 1.00")


def ratio_summary(rows: list[dict], peers: list[str]) -> dict:
    """Geometric means over the cases: of ``ratio`` (the faster peer per case) and of each
    peer's time over ours."""
    if not peers:
        return {}
    summary = {"ratio": geometric_mean(r["ratio"] for r in rows)}
    for peer in peers:
        summary[peer] = geometric_mean(r[column(peer, "ms")] / r["ms"] for r in rows)
    return summary


# --------------------------------------------------------------------------- report


class TableColumn(NamedTuple):
    """One column of a printed table: its title, its width, and its cell's text in a
    result row (``align`` "<" for the case names, else right-aligned)."""

    title: str
    width: int
    cell: Callable[[dict], str]
    align: str = ">"


def number(key: str, spec: str) -> Callable[[dict], str]:
    """A cell showing ``row[key]`` with format ``spec`` (NaN where the row lacks it)."""
    return lambda r: format(r.get(key, float("nan")), spec)


def percent(key: str) -> Callable[[dict], str]:
    """A cell showing the fraction ``row[key]`` as a percentage."""
    return lambda r: f"{100 * r[key]:.1f}%"


def print_columns(rows: list[dict], columns: list[TableColumn]) -> None:
    """The table: a header of the columns' titles, a rule as wide, a line per row; cells
    one space apart."""
    head = " ".join(f"{c.title:{c.align}{c.width}}" for c in columns)
    print(head)
    print("-" * len(head))
    for r in rows:
        print(" ".join(f"{c.cell(r):{c.align}{c.width}}" for c in columns))


def print_table(rows, copy, matmul, check: bool, peers: list[str], summary: dict, case_set: str) -> None:
    columns = [
        TableColumn("case", 24, lambda r: Case.of_row(r).name, "<"),
        TableColumn("ms", 8, number("ms", ".3f")),
        TableColumn("GB/s", 7, number("gbps", ".0f")),
        TableColumn("TFLOPS", 7, number("tflops", ".1f")),
        TableColumn("%copy", 6, percent("gbps_vs_copy")),
        TableColumn("%mm", 6, percent("tflops_vs_matmul")),
    ]
    columns += [TableColumn(peer + " ms", 18, number(column(peer, "ms"), ".3f")) for peer in peers]
    if peers:
        columns.append(TableColumn("ratio", 6, number("ratio", ".2f")))
    if check:
        columns += [TableColumn("cos out", 9, number("cos_out", ".2e")),
                    TableColumn("cos lse", 9, number("cos_lse", ".2e"))]
        columns += [TableColumn(peer + " cos", 20, number(column(peer, "cos_out"), ".2e")) for peer in peers]
    columns.append(TableColumn(" FlashMLA anchor", 0, lambda r: " " + ANCHORS.get(Case.of_row(r), ""), "<"))
    print()
    print(f"ceilings: copy {copy['gbps']:.0f} GB/s, bf16 matmul {matmul['tflops']:.0f} TFLOPS")
    if peers:
        print("ratio = faster peer's ms / ours (above 1: ours is faster); peer cos = cosine distance of its out to ours")
    print_columns(rows, columns)
    if peers:
        per_peer = ", ".join(f"{peer} {summary[peer]:.3f}" for peer in peers)
        print(f"geometric mean over the {len(rows)} '{case_set}' cases: ratio {summary['ratio']:.3f} "
              f"(each peer's ms / ours: {per_peer})")


def write_json(record: dict, path: str) -> None:
    path = Path(path)
    if path.parent != Path(""):
        os.makedirs(path.parent, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


RUN_COLUMNS = ("device", "time", "dtype", "case_set", "copy_gbps", "matmul_tflops")
"""Columns of every CSV row that describe the run rather than the case."""


def write_csv(record: dict, path: str) -> None:
    """One row per case: the run's columns, the case's name, then every column of the case."""
    rows = record["cases"]
    case_columns = []
    for row in rows:
        case_columns += [key for key in row if key not in case_columns]
    run = {
        "device": record["device"], "time": record["time"], "dtype": record["dtype"],
        "case_set": record["case_set"], "copy_gbps": record["copy"]["gbps"],
        "matmul_tflops": record["matmul"]["tflops"],
    }
    path = Path(path)
    if path.parent != Path(""):
        os.makedirs(path.parent, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*RUN_COLUMNS, "case", *case_columns])
        writer.writeheader()
        for row in rows:
            writer.writerow({**run, "case": Case.of_row(row).name, **row})
    print(f"wrote {path}")


def import_pyplot():
    """matplotlib's pyplot on a file-only backend, or SystemExit saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(record: dict, path: str) -> None:
    """Two panels, GB/s and TFLOPS per case, one bar per implementation, the run's copy and
    matmul ceilings as horizontal lines."""
    plt = import_pyplot()
    rows = record["cases"]
    impls = [OURS, *record.get("peers", [])]
    labels = {OURS: "flashmla_cute", **PEER_LABELS}
    width = 0.8 / len(impls)
    fig, (ax_bw, ax_tf) = plt.subplots(2, 1, figsize=(max(9.0, 0.55 * len(rows) + 5), 8.5), sharex=True)
    for k, impl in enumerate(impls):
        xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(rows))]
        label = labels.get(impl, impl)
        ax_bw.bar(xs, [r.get(column(impl, "gbps"), float("nan")) for r in rows], width, label=label)
        ax_tf.bar(xs, [r.get(column(impl, "tflops"), float("nan")) for r in rows], width, label=label)
    for ax, ceiling, unit, what in (
        (ax_bw, record["copy"].get("gbps"), "GB/s", "copy"),
        (ax_tf, record["matmul"].get("tflops"), "TFLOPS", "bf16 matmul"),
    ):
        if ceiling is not None and math.isfinite(ceiling):
            ax.axhline(ceiling, color="black", linestyle="--", linewidth=1, label=f"{what} {ceiling:.0f} {unit}")
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not over, the bars
    ax_tf.set_xticks(range(len(rows)))
    ax_tf.set_xticklabels([Case.of_row(r).name for r in rows], rotation=60, ha="right", fontsize="small")
    fig.suptitle(f"MLA decode ({record.get('dtype', 'bfloat16')}, causal, '{record.get('case_set', '')}' cases) "
                 f"on {record['device']}, {record['time'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def positive_int(text: str) -> int:
    """An argument that must be a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


DENSE_RECORD_KEYS = ("device", "time", "copy", "matmul", "cases")  # what ``plot`` reads of a record


def saved_dense_record(path: str) -> dict:
    """The record of a dense run that this script saved with ``--json`` at ``path``, for
    ``--plot-from``; an argument error for a file that cannot be read or that is not one
    (bench_sparse.py's JSON, say, has no copy ceiling)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e}") from None
    missing = [key for key in DENSE_RECORD_KEYS if not isinstance(record, dict) or key not in record]
    if missing or not isinstance(record["cases"], list):
        raise argparse.ArgumentTypeError(f"{path} is not a dense table this script wrote with --json "
                                         f"(it lacks {', '.join(missing) or 'a list of cases'})")
    return record


def add_run_args(parser: argparse.ArgumentParser, check_help: str, no_peers_help: str) -> None:
    """The flags every benchmark script of this folder takes besides its cases."""
    parser.add_argument("--check", action="store_true", help=check_help)
    parser.add_argument("--no-peers", action="store_true", help=no_peers_help)
    parser.add_argument("--json", metavar="PATH", default=None, help="also write every number to this JSON file")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up time per measurement (default: 25)")
    parser.add_argument("--rep-ms", type=float, default=200.0, help="timed time per measurement (default: 200)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random inputs: a case's are drawn from seed + 1000 x its position in its "
                             "case set (default: 0)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="rounds of timing every implementation, the order turned by one each round; a time is "
                             "the median of its rounds (default: 3)")


def print_run_setup(ours, peer_modules: dict, timer: "Timer", l2: int, args) -> None:
    """What a run measures with: the device, where ours and each peer were imported
    from, and the timing method."""
    import torch

    print(f"device: {torch.cuda.get_device_name()}, L2 {l2 / 2**20:.0f} MiB, torch {torch.__version__}, "
          f"flashmla_cute from {Path(ours.__file__).parent}")
    for peer, module in peer_modules.items():
        print(f"peer: {peer} ({PEER_LABELS[peer]}) from {Path(module.__file__).parent}")
    print(f"timing: {timer.name}, warmup {args.warmup_ms} ms, rep {args.rep_ms} ms, median of {args.rounds} rounds "
          f"in turned orders")


def run_record(timer: "Timer", l2: int, args, **fields) -> dict:
    """A run's JSON record: the device, the software, when, the case set and timing,
    then ``fields`` (ceilings, peers, results)."""
    import torch

    return {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "l2_bytes": l2,
        "torch": torch.__version__,
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "case_set": args.cases,
        "timing": timer.name,
        "warmup_ms": args.warmup_ms,
        "rep_ms": args.rep_ms,
        "rounds": args.rounds,
        **fields,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Time flash_mla_with_kvcache on FlashMLA's case grids, beside FlashMLA when it imports, "
        "with copy and matmul ceilings from the same run. Needs a Hopper (sm_90) GPU, except --plot-from.",
    )
    parser.add_argument("--cases", choices=tuple(CASE_SETS), default="all",
                        help="all: the 32-case b = 128 grid; quick: its 5 cases with FlashMLA anchors; "
                        "serving: 14 small-batch cases (default: all)")
    parser.add_argument("--match", metavar="REGEX", default=None,
                        help="only the cases of the set whose name (e.g. 'b128 sk8192 h128 s1 var') matches")
    add_run_args(parser, check_help="compare each case once with the float32 reference (cosine distance), "
                 "and each peer's output with ours",
                 no_peers_help="do not time flash_mla / flash_mla_head even if they import")
    parser.add_argument("--csv", metavar="PATH", default=None, help="also write every number to this CSV file")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="draw GB/s and TFLOPS per case with the ceilings into this image (needs matplotlib)")
    parser.add_argument("--plot-from", metavar="JSON", type=saved_dense_record, default=None,
                        help="with --plot: draw from a JSON this script wrote, instead of running (no GPU needed)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                        help="dtype of q and the KV cache (default: bfloat16)")
    parser.add_argument("--no-ceilings", action="store_true", help="skip the copy and matmul measurements")
    parser.add_argument("--confirm", type=int, default=0, metavar="RUNS",
                        help="time every case behind the faster peer RUNS more times after the table and report "
                        "its median ratio over the runs (needs a peer; default: 0)")
    parser.add_argument("--lengths-multiple", type=positive_int, default=1, metavar="TOKENS",
                        help="round every sequence length up to a multiple of TOKENS (64: no partial last "
                        "block; 128: no odd block count), to time what a sequence's last blocks cost (default: 1)")
    args = parser.parse_args(argv)
    if args.plot_from is not None and not args.plot:
        parser.error("--plot-from needs --plot FILE.png (where to draw)")
    if args.confirm < 0:
        parser.error(f"--confirm must be >= 0 (more runs of the cases behind), got {args.confirm}")
    if args.confirm and args.no_peers:
        parser.error("--confirm needs the peers' ratios: leave out --no-peers")
    if args.match is not None:
        try:
            re.compile(args.match)
        except re.error as e:
            parser.error(f"--match {args.match!r} is not a regular expression: {e}")
    if not selected_cases(args):
        parser.error(f"--match {args.match!r}: no case of --cases {args.cases} matches "
                     f"(names look like {CASE_SETS[args.cases][0].name!r})")
    return args


def selected_cases(args) -> list[tuple[int, Case]]:
    """The cases of ``--cases`` whose names match ``--match`` (all of them without it),
    each with its position in the whole set: a case's inputs are drawn from a seed of
    that position, so that a case rerun alone with ``--match`` sees the same lengths
    and values as in the whole set's run."""
    return [(i, case) for i, case in enumerate(CASE_SETS[args.cases])
            if not args.match or re.search(args.match, case.name)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_from is not None:
        plot(args.plot_from, args.plot)  # the record, read by the parser
        return 0
    if args.plot:
        import_pyplot()  # fail now, not after the whole run
    import torch

    reason = no_hopper_reason("bench_decode.py")
    if reason:
        print(reason, file=sys.stderr)
        return 2
    fm = import_package()
    from flashmla_cute import testing

    peer_modules = import_peers(not args.no_peers)
    modules = {OURS: fm, **peer_modules}
    peers = list(peer_modules)
    dtype = getattr(torch, args.dtype)
    timer = Timer(args.warmup_ms, args.rep_ms)
    l2 = l2_bytes()
    print_run_setup(fm, peer_modules, timer, l2, args)

    if args.no_ceilings:
        copy = {"gbps": float("nan")}
        matmul = {"tflops": float("nan")}
    else:
        copy = measure_copy(timer)
        print(f"copy: {copy['bytes'] / 2**30:.0f} GiB moved (read + write) in {copy['ms']:.3f} ms: "
              f"{copy['gbps']:.0f} GB/s", flush=True)
        matmul = measure_matmul(timer)
        print(f"matmul: bf16 {MATMUL_N}^3 in {matmul['ms']:.3f} ms: {matmul['tflops']:.0f} TFLOPS", flush=True)

    cases = selected_cases(args)

    def timed(n: int, check: bool) -> dict:
        i, case = cases[n]
        return run_case(modules, testing, case, dtype, timer, l2, check, args.seed + 1000 * i, rounds=args.rounds,
                        lengths_multiple=args.lengths_multiple)

    rows = []
    for n, (i, case) in enumerate(cases):
        start = time.perf_counter()
        r = timed(n, args.check)
        r["gbps_vs_copy"] = r["gbps"] / copy["gbps"]
        r["tflops_vs_matmul"] = r["tflops"] / matmul["tflops"]
        rows.append(r)
        extra = f", cos out {r['cos_out']:.2e} lse {r['cos_lse']:.2e}" if args.check else ""
        extra += "".join(f", {peer} {r[column(peer, 'ms')]:.3f} ms" for peer in peers)
        extra += f", ratio {r['ratio']:.2f}" if peers else ""
        print(f"[{n + 1}/{len(cases)}] {case.name}: {r['ms']:.3f} ms, {r['gbps']:.0f} GB/s, "
              f"{r['tflops']:.1f} TFLOPS{extra} ({time.perf_counter() - start:.1f} s)", flush=True)

    behind = []
    if peers and args.confirm:
        behind = confirm_behind(rows, lambda n: timed(n, False)["ratio"], args.confirm)
    summary = ratio_summary(rows, peers)
    record = run_record(timer, l2, args, dtype=args.dtype, copy=copy, matmul=matmul, peers=peers, geomean=summary,
                        cases=rows)
    if args.json:
        write_json(record, args.json)
    if args.csv:
        write_csv(record, args.csv)
    if args.plot:
        plot(record, args.plot)

    print_table(rows, copy, matmul, args.check, peers, summary, args.cases)
    if peers and args.confirm:
        print_confirmation(behind, args.confirm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
