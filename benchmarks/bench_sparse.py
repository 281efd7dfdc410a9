"""Sparse (top-k) decoding benchmark over DeepSeek-V3.2's FP8 KV cache, on FlashMLA's
production and peak cases, with FlashMLA's current kernel timed on the same inputs when it
imports, and the bf16 matmul ceiling measured in the same run.

    python benchmarks/bench_sparse.py [--cases production|peak|all] [--check] [--json PATH] [--no-peers]

Each case calls ``flashmla_cute.api.flash_mla_with_kvcache(q, k_cache, None, None, 512, plan,
None, is_fp8_kvcache=True, indices=indices)`` and, when ``import flash_mla_head`` works
(FlashMLA's current version, built from source under that name), the same call of
``flash_mla_head``. Inputs: q bf16 ``[b, s_q, h_q, 576]``; a cache of 64-token pages in the
V3.2 layout (656 bytes a token, ``fp8_cache.quantize_v32_kv_cache`` of random bf16 values),
each sequence's pages in random places; indices int32 ``[b, s_q, topk]``, each query token's
``topk`` distinct random positions of its sequence, all valid (every sequence holds at
least ``topk`` tokens).

Cases (``--cases``, default ``all``), from FlashMLA's sparse decoding test:

- ``production``: h_q 128, s_q 2, topk 2048, b 2 / 64 / 74 / 128, sequence lengths drawn from
  Normal(32768, 16384) and clamped to at least topk;
- ``peak``: b 148, h_q 64 / 128, topk 16384, s_q 1, every sequence 32768 tokens.

Each implementation is planned once per case (a fresh ``get_mla_metadata()`` plan, filled
by a first call outside the timed region) and then timed by bench_decode's method:
``triton.testing.do_bench`` median with an L2 flush before each call (CUDA events without
triton); cases that move less than 4x L2 per call cycle through several input sets.
TFLOPS count ``2 * b * s_q * h_q * topk * (576 + 512)`` (scores and values); ``ratio`` =
FlashMLA's time / ours (above 1: ours is faster). ``--check`` compares ours with the float32
reference (``sparse_reference``) and FlashMLA's ``out`` and ``lse`` with ours (cosine
distance). ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple

# The timing method, the ceilings and the report helpers are bench_decode's, beside this file.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import bench_decode  # noqa: E402
from bench_decode import D, DV, OURS, column  # noqa: E402

PAGE_SIZE = 64
PEER = "flash_mla_head"
"""FlashMLA's current version, the one with sparse decoding."""

CACHE_CHUNK_BLOCKS = 2048
"""Pages drawn and quantized at a time: the float temporaries of quantizing a whole
multi-GB cache at once would not fit beside it."""


class Case(NamedTuple):
    """``b`` sequences of ``seqlen`` cache tokens (the mean, with ``varlen``), ``s_q`` query
    tokens of ``h_q`` heads each, every query token attending to ``topk`` cache tokens."""

    b: int
    s_q: int
    h_q: int
    topk: int
    seqlen: int
    varlen: bool

    @property
    def name(self) -> str:
        return f"b{self.b} s{self.s_q} h{self.h_q} topk{self.topk} sk{self.seqlen}" + (" var" if self.varlen else "")

    @classmethod
    def of_row(cls, row: dict) -> "Case":
        """The case a result row (of this script's JSON) was measured on."""
        return cls(*(row[field] for field in cls._fields))


CASE_SETS = {
    # FlashMLA's V3.2 production cases.
    "production": [Case(b, 2, 128, 2048, 32768, True) for b in (2, 64, 74, 128)],
    # FlashMLA's peak cases (b = 148), at s_q 1 with every sequence 32768 tokens long.
    "peak": [Case(148, 1, h_q, 16384, 32768, False) for h_q in (64, 128)],
}
CASE_SETS["all"] = CASE_SETS["production"] + CASE_SETS["peak"]


def sparse_flops(case: Case) -> int:
    """FLOPs of one call: per query head and token, ``topk`` dot products of width 576
    (scores) and ``topk`` value rows of width 512 accumulated."""
    return 2 * case.b * case.s_q * case.h_q * case.topk * (D + DV)


def sparse_bytes(case: Case, bytes_per_token: int) -> int:
    """Bytes one call reads and writes: q, the indices, the ``topk`` cache tokens of each
    query token, out (bf16) and lse (float32)."""
    rows = case.b * case.s_q
    return rows * (case.h_q * D * 2 + case.topk * (4 + bytes_per_token) + case.h_q * (DV * 2 + 4))


class SparseInputs(NamedTuple):
    q: object  # [b, s_q, h_q, 576] bf16
    k_cache: object  # [num_blocks, 64, 1, 656] float8_e4m3fn
    indices: object  # [b, s_q, topk] int32


def case_seqlens(case: Case, seed: int):
    """Tokens of each sequence (int64, CPU): FlashMLA's Normal(seqlen, seqlen / 2) with
    ``varlen``, clamped to at least ``topk`` so that every index names a token."""
    from flashmla_cute import testing

    return testing.random_seqlens(case.b, case.seqlen, case.s_q, case.varlen, seed).long().clamp(min=case.topk)


def make_inputs(case: Case, seqlens, seed: int, device) -> SparseInputs:
    """Random inputs of ``case`` for sequences of ``seqlens`` tokens (see the module docstring)."""
    import torch

    from flashmla_cute import fp8_cache

    gen = torch.Generator(device=device).manual_seed(seed)
    lengths = seqlens.to(device=device, dtype=torch.int64)
    pages = (lengths + PAGE_SIZE - 1) // PAGE_SIZE
    num_blocks = int(pages.sum())
    # Each sequence owns ceil(length / 64) pages, scattered over the cache in random order:
    # its page p is block page_order[first_page + p].
    first_page = torch.cumsum(pages, 0) - pages
    page_order = torch.randperm(num_blocks, generator=gen, device=device)
    k_cache = torch.empty(num_blocks, PAGE_SIZE, 1, fp8_cache.BYTES_PER_TOKEN, dtype=torch.uint8, device=device)
    for start in range(0, num_blocks, CACHE_CHUNK_BLOCKS):
        stop = min(start + CACHE_CHUNK_BLOCKS, num_blocks)
        kv = torch.randn(stop - start, PAGE_SIZE, 1, D, generator=gen, device=device, dtype=torch.bfloat16)
        k_cache[start:stop] = fp8_cache.quantize_v32_kv_cache(kv).view(torch.uint8)

    # The topk largest of random keys: distinct random positions, all below the length
    # (which is at least topk), in random order, as an indexer's top-k would be.
    keys = torch.rand(case.b, case.s_q, int(lengths.max()), generator=gen, device=device)
    keys.masked_fill_(torch.arange(keys.shape[-1], device=device) >= lengths[:, None, None], -1.0)
    positions = keys.topk(case.topk, dim=-1).indices
    del keys
    blocks = page_order[first_page[:, None, None] + positions // PAGE_SIZE]
    indices = (blocks * PAGE_SIZE + positions % PAGE_SIZE).to(torch.int32)

    q = torch.randn(case.b, case.s_q, case.h_q, D, generator=gen, device=device, dtype=torch.bfloat16)
    return SparseInputs(q, k_cache.view(torch.float8_e4m3fn), indices)


def planned_caller(module, first: SparseInputs):
    """``call(inputs) -> (out, lse)`` through ``module``'s current-API ``flash_mla_with_kvcache``
    (ours: ``flashmla_cute.api``; FlashMLA: ``flash_mla_head``), with one plan, made by a
    call on ``first`` here, outside the timed region, and reused for every input set (same
    shapes, no ``topk_length``)."""
    plan, _ = module.get_mla_metadata()

    def call(inp: SparseInputs):
        return module.flash_mla_with_kvcache(
            inp.q, inp.k_cache, None, None, DV, plan, None, is_fp8_kvcache=True, indices=inp.indices
        )

    call(first)
    return call


def run_case(modules: dict, case: Case, timer, l2: int, check: bool, seed: int, device="cuda") -> dict:
    """Times every implementation in ``modules`` (ours first) on the same inputs."""
    import torch

    from flashmla_cute import fp8_cache

    seqlens = case_seqlens(case, seed)
    first = make_inputs(case, seqlens, seed, device)
    nbytes = sparse_bytes(case, fp8_cache.BYTES_PER_TOKEN)
    flops = sparse_flops(case)
    n_sets = bench_decode.input_sets(nbytes, l2)
    sets = [first] + [make_inputs(case, seqlens, seed + i, device) for i in range(1, n_sets)]

    result = {
        **case._asdict(), "total_kv_tokens": int(seqlens.sum()),
        "cache_bytes": int(first.k_cache.numel()) * n_sets, "input_sets": n_sets,
        "flops": float(flops), "bytes": float(nbytes),
    }
    def reference():
        from flashmla_cute.sparse_reference import sparse_mla_reference

        return sparse_mla_reference(first.q, first.k_cache, first.indices)

    calls = {impl: planned_caller(module, first) for impl, module in modules.items()}  # compiles ours
    bench_decode.time_and_check(calls, sets, reference if check else None, timer, flops, None, result)
    result.update(bench_decode.compare_with_peers(result, [impl for impl in modules if impl != OURS]))
    del sets, first
    torch.cuda.empty_cache()
    return result


def print_table(rows: list[dict], matmul: dict, check: bool, peers: list[str], case_set: str) -> None:
    Column, number = bench_decode.TableColumn, bench_decode.number
    columns = [
        Column("case", 34, lambda r: Case.of_row(r).name, "<"),
        Column("ms", 8, number("ms", ".3f")),
        Column("TFLOPS", 7, number("tflops", ".1f")),
        Column("%mm", 6, bench_decode.percent("tflops_vs_matmul")),
    ]
    for peer in peers:
        columns += [Column(peer + " ms", 18, number(column(peer, "ms"), ".3f")),
                    Column("TFLOPS", 7, number(column(peer, "tflops"), ".1f"))]
    if peers:
        columns.append(Column("ratio", 6, number("ratio", ".2f")))
    if check:
        columns += [Column("cos out", 9, number("cos_out", ".2e")), Column("cos lse", 9, number("cos_lse", ".2e"))]
        for peer in peers:
            columns += [Column(peer + " cos out", 22, number(column(peer, "cos_out"), ".2e")),
                        Column("cos lse", 9, number(column(peer, "cos_lse"), ".2e"))]
    print()
    print(f"ceiling: bf16 matmul {matmul['tflops']:.0f} TFLOPS")
    if peers:
        print("ratio = FlashMLA's ms / ours (above 1: ours is faster)")
    if check:
        print("cos = cosine distance: ours to the float32 reference; FlashMLA's to ours")
    bench_decode.print_columns(rows, columns)
    if peers:
        ratio = bench_decode.geometric_mean(r["ratio"] for r in rows)
        print(f"geometric mean over the {len(rows)} '{case_set}' cases: ratio {ratio:.3f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Time sparse decoding over DeepSeek-V3.2's FP8 cache on FlashMLA's production and peak cases, "
        "beside FlashMLA's current kernel when flash_mla_head imports. Needs a Hopper (sm_90) GPU.",
    )
    parser.add_argument("--cases", choices=tuple(CASE_SETS), default="all",
                        help="production: h_q 128, s_q 2, topk 2048, b 2 / 64 / 74 / 128; "
                        "peak: b 148, topk 16384, h_q 64 / 128; all: both (default: all)")
    bench_decode.add_run_args(parser, check_help="compare ours with the float32 reference and FlashMLA's out and lse "
                              "with ours (cosine distance)",
                              no_peers_help=f"do not time {PEER} even if it imports")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = bench_decode.no_hopper_reason("bench_sparse.py")
    if reason:
        print(reason, file=sys.stderr)
        return 2
    bench_decode.import_package()
    from flashmla_cute import api

    peer_modules = bench_decode.import_peers(not args.no_peers, names=(PEER,))
    modules = {OURS: api, **peer_modules}
    peers = list(peer_modules)
    timer = bench_decode.Timer(args.warmup_ms, args.rep_ms)
    l2 = bench_decode.l2_bytes()
    bench_decode.print_run_setup(api, peer_modules, timer, l2, args)
    matmul = bench_decode.measure_matmul(timer)
    print(f"matmul: bf16 {matmul['n']}^3 in {matmul['ms']:.3f} ms: {matmul['tflops']:.0f} TFLOPS", flush=True)

    cases = CASE_SETS[args.cases]
    rows = []
    for i, case in enumerate(cases):
        start = time.perf_counter()
        r = run_case(modules, case, timer, l2, args.check, args.seed + 1000 * i)
        r["tflops_vs_matmul"] = r["tflops"] / matmul["tflops"]
        rows.append(r)
        extra = f", cos out {r['cos_out']:.2e} lse {r['cos_lse']:.2e}" if args.check else ""
        for peer in peers:
            extra += f", {peer} {r[column(peer, 'ms')]:.3f} ms {r[column(peer, 'tflops')]:.1f} TFLOPS"
            if args.check:
                extra += f" (cos out {r[column(peer, 'cos_out')]:.2e} lse {r[column(peer, 'cos_lse')]:.2e})"
        extra += f", ratio {r['ratio']:.2f}" if peers else ""
        print(f"[{i + 1}/{len(cases)}] {case.name}: {r['ms']:.3f} ms, {r['tflops']:.1f} TFLOPS{extra} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)

    geomean = bench_decode.geometric_mean(r["ratio"] for r in rows) if peers else None
    record = bench_decode.run_record(timer, l2, args, matmul=matmul, peers=peers, geomean_ratio=geomean, cases=rows)
    if args.json:
        bench_decode.write_json(record, args.json)
    print_table(rows, matmul, args.check, peers, args.cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
