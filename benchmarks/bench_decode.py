"""Decode benchmark on the FlashMLA grid, with the machine's two ceilings from the same run.

    python benchmarks/bench_decode.py [--cases all|quick] [--check] [--json PATH] [--dtype bfloat16]

Measures, in one process:

1. copy bandwidth: a large device-to-device ``copy_`` (bytes read + written per second);
2. matmul rate: a bf16 8192 x 8192 x 8192 ``torch.matmul``;
3. ``flash_mla_with_kvcache`` on the grid b = 128, h_kv = 1, d = 576, dv = 512, causal,
   seqlen 4096 / 8192, h_q 16 / 32 / 64 / 128, s_q 1 / 2, fixed and varied lengths
   (varied: Normal(seqlen, seqlen / 2), clamped to >= s_q).

Each case reports its median time, GB/s (``decode_bytes`` / time), TFLOPS
(``decode_flops`` / time) and both as fractions of the same run's ceilings: timings on one
machine drift by several percent between runs, ratios taken in one run drift much less.
Metadata is computed once per case, outside the timed region. Times come from
``triton.testing.do_bench`` (median; it flushes L2 before each run) or, without triton,
from CUDA events around single calls after an L2 flush. Cases whose inputs are smaller
than 4x L2 rotate between several input sets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

BATCH = 128
H_KV = 1
D, DV = 576, 512
BLOCK_SIZE = 64
SEQLENS = (4096, 8192)
HEADS = (16, 32, 64, 128)
S_QS = (1, 2)

# (seqlen, h_q, s_q, varlen): the cases DESIGN.md's anchor table has numbers for.
QUICK = [
    (8192, 16, 1, False),
    (8192, 64, 1, False),
    (8192, 128, 1, False),
    (8192, 128, 2, False),
    (4096, 16, 1, True),
]

# The anchors measured with FlashMLA (Feb 2025 build) on this project's H100, for reference
# in the printed table: (ms, GB/s, TFLOPS) where known. Same run: copy 3020 GB/s, cuBLAS 715.
ANCHORS = {
    (8192, 16, 1, False): "0.414 ms 2931 GB/s",
    (8192, 64, 1, False): "0.421 ms 347 TF",
    (8192, 128, 1, False): "0.561 ms 521 TF",
    (8192, 128, 2, False): "1.048 ms 557 TF",
    (4096, 16, 1, True): "0.233 ms 2621 GB/s",
}

DEFAULT_L2_BYTES = 50 * 1024 * 1024
COPY_BYTES = 2 * 1024**3
MATMUL_N = 8192
MAX_INPUT_SETS = 32


def all_cases():
    return [
        (seqlen, h_q, s_q, varlen)
        for seqlen in SEQLENS
        for h_q in HEADS
        for s_q in S_QS
        for varlen in (False, True)
    ]


def import_package():
    """Import flashmla_cute from this checkout's src/ when there is one (the code being
    measured), else from wherever it is installed."""
    src = Path(__file__).resolve().parent.parent / "src"
    if (src / "flashmla_cute" / "__init__.py").exists() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    import flashmla_cute

    return flashmla_cute


# --------------------------------------------------------------------------- timing


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

        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
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


# --------------------------------------------------------------------------- decode grid


def case_seqlens(seqlen: int, s_q: int, varlen: bool, seed: int):
    import torch

    if not varlen:
        return torch.full((BATCH,), seqlen, dtype=torch.int32)
    gen = torch.Generator().manual_seed(seed)
    lens = torch.normal(float(seqlen), seqlen / 2, (BATCH,), generator=gen)
    return lens.round().clamp(min=s_q).to(torch.int32)


def case_name(case) -> str:
    seqlen, h_q, s_q, varlen = case
    return f"sk{seqlen} h{h_q} s{s_q}" + (" var" if varlen else "")


def run_case(fm, testing, case, dtype, timer: Timer, l2: int, check: bool, seed: int) -> dict:
    import torch

    seqlen, h_q, s_q, varlen = case
    seqlens = case_seqlens(seqlen, s_q, varlen, seed)
    first = testing.make_decode_inputs(
        BATCH, s_q, h_q, h_kv=H_KV, seqlen=seqlen, varlen=varlen, d=D, dtype=dtype,
        device="cuda", seed=seed, seqlens=seqlens,
    )
    # Bytes one call reads and writes. Under 4x L2, a repeated call could find part of its
    # inputs still in L2, so such cases cycle through several input sets.
    per_set = testing.decode_bytes(seqlens, s_q, h_q, H_KV, D, DV, element_size=first.q.element_size())
    n_sets = 1 if per_set >= 4 * l2 else min(MAX_INPUT_SETS, max(2, math.ceil(4 * l2 / per_set)))
    sets = [first] + [
        testing.make_decode_inputs(
            BATCH, s_q, h_q, h_kv=H_KV, seqlen=seqlen, varlen=varlen, d=D, dtype=dtype,
            device="cuda", seed=seed + i, seqlens=seqlens,
        )
        for i in range(1, n_sets)
    ]
    cache_seqlens = first.cache_seqlens
    meta, num_splits = fm.get_mla_metadata(cache_seqlens, s_q * h_q // H_KV, H_KV)

    def call(inp):
        return fm.flash_mla_with_kvcache(
            inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, DV, meta, num_splits, causal=True
        )

    # Compile (first use) and check outside the timed region.
    out, lse = call(first)
    torch.cuda.synchronize()
    result = {
        "seqlen": seqlen, "h_q": h_q, "s_q": s_q, "varlen": varlen, "b": BATCH, "h_kv": H_KV,
        "total_kv_tokens": int(seqlens.sum()), "input_sets": n_sets,
    }
    if check:
        from flashmla_cute.reference import flash_mla_reference

        ref_out, ref_lse = flash_mla_reference(
            first.q, first.k_cache, first.block_table, first.cache_seqlens, DV, causal=True
        )
        result["cos_out"] = float(testing.cosine_distance(out.float(), ref_out.float()))
        result["cos_lse"] = float(testing.cosine_distance(lse, ref_lse))
        del ref_out, ref_lse
    del out, lse

    counter = [0]

    def fn():
        inp = sets[counter[0] % n_sets]
        counter[0] += 1
        call(inp)

    ms = timer(fn)
    flops = float(testing.decode_flops(seqlens, s_q, h_q, D, DV))
    nbytes = float(testing.decode_bytes(seqlens, s_q, h_q, H_KV, D, DV, element_size=first.q.element_size()))
    result.update(ms=ms, flops=flops, bytes=nbytes, gbps=nbytes / (ms * 1e-3) / 1e9, tflops=flops / (ms * 1e-3) / 1e12)
    del sets, first, meta, num_splits
    torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------- report


def print_table(rows, copy, matmul, check: bool) -> None:
    head = f"{'case':<20} {'ms':>8} {'GB/s':>7} {'TFLOPS':>7} {'%copy':>6} {'%mm':>6}"
    if check:
        head += f" {'cos out':>9} {'cos lse':>9}"
    head += "  FlashMLA anchor"
    print()
    print(f"ceilings: copy {copy['gbps']:.0f} GB/s, bf16 matmul {matmul['tflops']:.0f} TFLOPS")
    print(head)
    print("-" * len(head))
    for r in rows:
        case = (r["seqlen"], r["h_q"], r["s_q"], r["varlen"])
        line = (
            f"{case_name(case):<20} {r['ms']:>8.3f} {r['gbps']:>7.0f} {r['tflops']:>7.1f}"
            f" {100 * r['gbps_vs_copy']:>5.1f}% {100 * r['tflops_vs_matmul']:>5.1f}%"
        )
        if check:
            line += f" {r.get('cos_out', float('nan')):>9.2e} {r.get('cos_lse', float('nan')):>9.2e}"
        line += "  " + ANCHORS.get(case, "")
        print(line)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Time flash_mla_with_kvcache on the FlashMLA grid, with copy and matmul ceilings "
        "from the same run. Needs a Hopper (sm_90) GPU.",
    )
    parser.add_argument("--cases", choices=("all", "quick"), default="all",
                        help="all: the 32-case grid; quick: the 5 cases with FlashMLA anchors (default: all)")
    parser.add_argument("--check", action="store_true",
                        help="compare each case once with the float32 reference (cosine distance)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write every number to this JSON file")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                        help="dtype of q and the KV cache (default: bfloat16)")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up time per measurement (default: 25)")
    parser.add_argument("--rep-ms", type=float, default=200.0, help="timed time per measurement (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    parser.add_argument("--no-ceilings", action="store_true", help="skip the copy and matmul measurements")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_decode.py needs a CUDA GPU (Hopper, sm_90): torch.cuda.is_available() is False.",
              file=sys.stderr)
        return 2
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0):
        print(f"bench_decode.py needs a Hopper (sm_90) GPU; found {torch.cuda.get_device_name()} "
              f"(compute capability {cap[0]}.{cap[1]}).", file=sys.stderr)
        return 2

    fm = import_package()
    from flashmla_cute import testing

    dtype = getattr(torch, args.dtype)
    timer = Timer(args.warmup_ms, args.rep_ms)
    l2 = l2_bytes()
    device_name = torch.cuda.get_device_name()
    print(f"device: {device_name}, L2 {l2 / 2**20:.0f} MiB, torch {torch.__version__}, "
          f"flashmla_cute from {Path(fm.__file__).parent}")
    print(f"timing: {timer.name}, warmup {args.warmup_ms} ms, rep {args.rep_ms} ms")

    if args.no_ceilings:
        copy = {"gbps": float("nan")}
        matmul = {"tflops": float("nan")}
    else:
        copy = measure_copy(timer)
        print(f"copy: {copy['bytes'] / 2**30:.0f} GiB moved (read + write) in {copy['ms']:.3f} ms: "
              f"{copy['gbps']:.0f} GB/s", flush=True)
        matmul = measure_matmul(timer)
        print(f"matmul: bf16 {MATMUL_N}^3 in {matmul['ms']:.3f} ms: {matmul['tflops']:.0f} TFLOPS", flush=True)

    cases = QUICK if args.cases == "quick" else all_cases()
    rows = []
    for i, case in enumerate(cases):
        start = time.perf_counter()
        r = run_case(fm, testing, case, dtype, timer, l2, args.check, args.seed + 1000 * i)
        r["gbps_vs_copy"] = r["gbps"] / copy["gbps"]
        r["tflops_vs_matmul"] = r["tflops"] / matmul["tflops"]
        rows.append(r)
        extra = f", cos out {r['cos_out']:.2e} lse {r['cos_lse']:.2e}" if args.check else ""
        print(f"[{i + 1}/{len(cases)}] {case_name(case)}: {r['ms']:.3f} ms, {r['gbps']:.0f} GB/s, "
              f"{r['tflops']:.1f} TFLOPS{extra} ({time.perf_counter() - start:.1f} s)", flush=True)

    if args.json:
        record = {
            "device": device_name,
            "capability": list(cap),
            "l2_bytes": l2,
            "torch": torch.__version__,
            "host": platform.node(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "dtype": args.dtype,
            "timing": timer.name,
            "warmup_ms": args.warmup_ms,
            "rep_ms": args.rep_ms,
            "copy": copy,
            "matmul": matmul,
            "cases": rows,
        }
        path = Path(args.json)
        if path.parent != Path(""):
            os.makedirs(path.parent, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
        print(f"wrote {path}")

    print_table(rows, copy, matmul, args.check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
