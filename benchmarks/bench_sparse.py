"""Sparse (top-k) decoding benchmark over the FP8 KV caches of DeepSeek-V3.2 and of MODEL1
(with its extra cache), on FlashMLA's production and peak cases, with FlashMLA's current
kernel timed on the same inputs when it imports, and the bf16 matmul ceiling measured in
the same run.

    python benchmarks/bench_sparse.py [--cases production|peak|model1|all] [--check] [--json PATH] [--no-peers]

Each case calls ``flashmla_cute.api.flash_mla_with_kvcache(q, k_cache, None, None, 512, plan,
None, is_fp8_kvcache=True, indices=indices, extra_k_cache=..., extra_indices_in_kvcache=...,
extra_topk_length=...)`` (the extra arguments None without an extra cache) and, when
``import flash_mla_head`` works (FlashMLA's current version, built from source under that
name), the same call of ``flash_mla_head``: the cache bytes are FlashMLA's layouts, so the
same inputs serve both. Inputs: q bf16 ``[b, s_q, h_q, d_qk]`` (576 for V3.2, 512 for
MODEL1); a cache of the case's page size in its layout (``fp8_cache``'s quantization of
random bf16 values), each sequence's pages in random places; indices int32 ``[b, s_q,
topk]``, each query token's ``topk`` distinct random positions of its sequence, all valid
(every sequence holds at least ``topk`` tokens). An extra cache is made the same way, with
its own sequence lengths, page size and ``extra_topk`` indices, and with ``extra_topk_length``
its int32 ``[b]`` lengths drawn uniformly from ``[0, extra_topk]``, once per case.

Cases (``--cases``, default ``all``), from FlashMLA's sparse decoding test:

- ``production``: V3.2, h_q 128, s_q 2, topk 2048, b 2 / 64 / 74 / 128, sequence lengths
  drawn from Normal(32768, 16384) and clamped to at least topk;
- ``peak``: V3.2, b 148, h_q 64 / 128, topk 16384, s_q 1, every sequence 32768 tokens;
- ``model1``: FlashMLA's four MODEL1 production configurations, each at b 2 / 64 / 74 /
  128 / 148: s_q 2, lengths from Normal(16384, 8192) in both caches, topk 128 in pages of
  256 tokens, and (1) h_q 64, extra_topk 512 in pages of 64; (2) h_q 128, extra_topk 1024
  in pages of 64; (3) h_q 64 and (4) h_q 128, extra_topk 1024 in pages of 2, with
  extra_topk_length.

Each implementation is planned once per case (a fresh ``get_mla_metadata()`` plan, filled
by a first call outside the timed region) and then timed by bench_decode's method:
``triton.testing.do_bench`` median with an L2 flush before each call (CUDA events without
triton), the median of ``--rounds`` rounds in turned orders; cases that move less than 4x
L2 per call cycle through several input sets.
TFLOPS count ``2 * b * s_q * h_q * (topk + extra_topk) * (d_qk + 512)`` (scores and values;
every extra entry, whatever extra_topk_length); ``ratio`` = FlashMLA's time / ours (above 1:
ours is faster). ``--check`` compares ours with the float32 reference (``sparse_reference``)
and FlashMLA's ``out`` and ``lse`` with ours (cosine distance). ``--json`` writes every number.
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
from bench_decode import DV, OURS, column  # noqa: E402

PAGE_SIZE = 64
"""Tokens per page of the V3.2 cases."""
PEER = "flash_mla_head"
"""FlashMLA's current version, the one with sparse decoding."""

CACHE_CHUNK_TOKENS = 2048 * PAGE_SIZE
"""Tokens drawn and quantized at a time (whole pages, at least one): the float temporaries
of quantizing a whole multi-GB cache at once would not fit beside it."""

V32, MODEL1 = "V3.2", "MODEL1"
"""The layouts' names (``fp8_cache.Fp8Layout.name``), as a case records them."""


class Case(NamedTuple):
    """``b`` sequences of ``seqlen`` cache tokens (the mean, with ``varlen``) in pages of
    ``page_size`` tokens of the ``layout`` FP8 cache, ``s_q`` query tokens of ``h_q`` heads
    each, every query token attending to ``topk`` cache tokens; with ``extra_topk``, also to
    that many tokens of an extra cache of ``extra_seqlen``-token sequences in pages of
    ``extra_page_size``, the first ``extra_topk_length[i]`` of them with ``extra_topk_length``."""

    b: int
    s_q: int
    h_q: int
    topk: int
    seqlen: int
    varlen: bool
    layout: str = V32
    page_size: int = PAGE_SIZE
    extra_topk: int = 0  # 0: no extra cache
    extra_seqlen: int = 0
    extra_page_size: int = 0
    extra_topk_length: bool = False

    @property
    def name(self) -> str:
        topk, seqlen, page = f"{self.topk}", f"{self.seqlen}", ""
        if self.extra_topk:
            topk += f"+{self.extra_topk}"
            seqlen += f"+{self.extra_seqlen}"
            page = f" page{self.page_size}+{self.extra_page_size}"
        elif self.page_size != PAGE_SIZE:
            page = f" page{self.page_size}"
        name = f"b{self.b} s{self.s_q} h{self.h_q} topk{topk} sk{seqlen}{page}" + (" var" if self.varlen else "")
        name += " extralen" if self.extra_topk_length else ""
        return name if self.layout == V32 else f"{self.layout} {name}"

    @property
    def fp8_layout(self):
        """The ``fp8_cache.Fp8Layout`` named by ``layout``."""
        from flashmla_cute import fp8_cache

        return next(layout for layout in fp8_cache.LAYOUTS if layout.name == self.layout)

    @classmethod
    def of_row(cls, row: dict) -> "Case":
        """The case a result row (of this script's JSON) was measured on; rows written
        before the MODEL1 fields existed are V3.2 cases."""
        return cls(**{field: row[field] for field in cls._fields if field in row})


MODEL1_CONFIGS = [(64, 512, 64, False), (128, 1024, 64, False), (64, 1024, 2, True), (128, 1024, 2, True)]
"""FlashMLA's MODEL1 production configurations 1 to 4: (h_q, extra_topk, extra page size,
extra_topk_length)."""

CASE_SETS = {
    # FlashMLA's V3.2 production cases.
    "production": [Case(b, 2, 128, 2048, 32768, True) for b in (2, 64, 74, 128)],
    # FlashMLA's peak cases (b = 148), at s_q 1 with every sequence 32768 tokens long.
    "peak": [Case(148, 1, h_q, 16384, 32768, False) for h_q in (64, 128)],
    # FlashMLA's MODEL1 production cases (its batch sizes up to 148 of 256).
    "model1": [
        Case(b, 2, h_q, 128, 16384, True, layout=MODEL1, page_size=256, extra_topk=extra_topk, extra_seqlen=16384,
             extra_page_size=extra_page_size, extra_topk_length=extra_topk_length)
        for h_q, extra_topk, extra_page_size, extra_topk_length in MODEL1_CONFIGS
        for b in (2, 64, 74, 128, 148)
    ],
}
CASE_SETS["all"] = CASE_SETS["production"] + CASE_SETS["peak"] + CASE_SETS["model1"]


def sparse_flops(case: Case) -> int:
    """FLOPs of one call: per query head and token, ``topk + extra_topk`` dot products of
    width d_qk (scores: 576 for V3.2, 512 for MODEL1) and as many value rows of width 512
    accumulated; every extra entry counts, whatever ``extra_topk_length``."""
    return 2 * case.b * case.s_q * case.h_q * (case.topk + case.extra_topk) * (case.fp8_layout.head_dim + DV)


def sparse_bytes(case: Case) -> int:
    """Bytes one call reads and writes: q, the indices, the ``topk + extra_topk`` cache
    tokens of each query token, out (bf16) and lse (float32)."""
    layout = case.fp8_layout
    rows = case.b * case.s_q
    entries = case.topk + case.extra_topk
    return rows * (case.h_q * layout.head_dim * 2 + entries * (4 + layout.bytes_per_token) + case.h_q * (DV * 2 + 4))


class SparseInputs(NamedTuple):
    q: object  # [b, s_q, h_q, d_qk] bf16
    k_cache: object  # [num_blocks, page_size, 1, bytes per token] float8_e4m3fn
    indices: object  # [b, s_q, topk] int32
    extra_k_cache: object = None  # as k_cache, its own num_blocks and page size
    extra_indices: object = None  # [b, s_q, extra_topk] int32
    extra_topk_length: object = None  # [b] int32


def case_seqlens(case: Case, seed: int, extra: bool = False):
    """Tokens of each sequence (int64, CPU) of the cache, or with ``extra`` of the extra
    cache: FlashMLA's Normal(seqlen, seqlen / 2) with ``varlen``, clamped to at least the
    cache's topk so that every index names a token."""
    from flashmla_cute import testing

    seqlen, topk = (case.extra_seqlen, case.extra_topk) if extra else (case.seqlen, case.topk)
    # The extra cache's lengths are drawn apart from the main cache's, as FlashMLA does.
    seed = seed + 1 if extra else seed
    return testing.random_seqlens(case.b, seqlen, case.s_q, case.varlen, seed).long().clamp(min=topk)


def case_extra_topk_length(case: Case, seed: int):
    """``extra_topk_length`` (int32 ``[b]``, CPU) uniform in ``[0, extra_topk]``, or None
    when the case has none. Drawn once per case: a plan holds only for its values."""
    import torch

    if not case.extra_topk_length:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, case.extra_topk + 1, (case.b,), generator=gen, dtype=torch.int32)


def make_inputs(case: Case, seqlens, seed: int, device, extra_seqlens=None, extra_topk_length=None) -> SparseInputs:
    """Random inputs of ``case`` for sequences of ``seqlens`` tokens (and ``extra_seqlens``
    in the extra cache, ``extra_topk_length`` its lengths; see the module docstring)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    k_cache, indices = make_paged_cache(case, case.topk, case.page_size, seqlens, gen, device)
    extra = {}
    if case.extra_topk:
        extra_k_cache, extra_indices = make_paged_cache(case, case.extra_topk, case.extra_page_size, extra_seqlens,
                                                        gen, device)
        extra = dict(extra_k_cache=extra_k_cache, extra_indices=extra_indices,
                     extra_topk_length=None if extra_topk_length is None else extra_topk_length.to(device))
    q = torch.randn(case.b, case.s_q, case.h_q, case.fp8_layout.head_dim, generator=gen, device=device,
                    dtype=torch.bfloat16)
    return SparseInputs(q, k_cache, indices, **extra)


def make_paged_cache(case: Case, topk: int, page_size: int, seqlens, gen, device):
    """``(k_cache, indices)``: a cache of the case's layout holding sequences of
    ``seqlens`` tokens in pages of ``page_size``, and each query token's ``topk`` indices
    into it, drawn from ``gen``."""
    import torch

    from flashmla_cute.fp8_cache import quantize_kv_cache
    from flashmla_cute.sparse_testing import page_bytes

    layout = case.fp8_layout
    lengths = seqlens.to(device=device, dtype=torch.int64)
    pages = (lengths + page_size - 1) // page_size
    num_blocks = int(pages.sum())
    # Each sequence owns ceil(length / page_size) pages, scattered over the cache in random
    # order: its page p is block page_order[first_page + p].
    first_page = torch.cumsum(pages, 0) - pages
    page_order = torch.randperm(num_blocks, generator=gen, device=device)
    k_cache = empty_cache(num_blocks, page_size, layout, device)
    chunk = max(1, CACHE_CHUNK_TOKENS // page_size)
    for start in range(0, num_blocks, chunk):
        stop = min(start + chunk, num_blocks)
        kv = torch.randn(stop - start, page_size, 1, layout.head_dim, generator=gen, device=device,
                         dtype=torch.bfloat16)
        page_bytes(k_cache[start:stop]).copy_(page_bytes(quantize_kv_cache(kv, layout)))

    # The topk largest of random keys: distinct random positions, all below the length
    # (which is at least topk), in random order, as an indexer's top-k would be.
    keys = torch.rand(case.b, case.s_q, int(lengths.max()), generator=gen, device=device)
    keys.masked_fill_(torch.arange(keys.shape[-1], device=device) >= lengths[:, None, None], -1.0)
    positions = keys.topk(topk, dim=-1).indices
    del keys
    blocks = page_order[first_page[:, None, None] + positions // page_size]
    indices = (blocks * page_size + positions % page_size).to(torch.int32)
    return k_cache, indices


def empty_cache(num_blocks: int, page_size: int, layout, device):
    """An uninitialised float8_e4m3fn cache of ``layout`` with the page stride its
    quantizer gives (MODEL1's pages padded as ``fp8_cache.model1_page_bytes`` says)."""
    import torch

    from flashmla_cute import fp8_cache

    page = page_size * layout.bytes_per_token
    page_stride = fp8_cache.model1_page_bytes(page_size) if layout is fp8_cache.MODEL1 else page
    storage = torch.empty(num_blocks, page_stride, dtype=torch.uint8, device=device)
    return storage[:, :page].view(num_blocks, page_size, 1, layout.bytes_per_token).view(torch.float8_e4m3fn)


def planned_caller(module, first: SparseInputs):
    """``call(inputs) -> (out, lse)`` through ``module``'s current-API ``flash_mla_with_kvcache``
    (ours: ``flashmla_cute.api``; FlashMLA: ``flash_mla_head``), with one plan, made by a
    call on ``first`` here, outside the timed region, and reused for every input set (same
    shapes, the same ``extra_topk_length``)."""
    plan, _ = module.get_mla_metadata()

    def call(inp: SparseInputs):
        return module.flash_mla_with_kvcache(
            inp.q, inp.k_cache, None, None, DV, plan, None, is_fp8_kvcache=True, indices=inp.indices,
            extra_k_cache=inp.extra_k_cache, extra_indices_in_kvcache=inp.extra_indices,
            extra_topk_length=inp.extra_topk_length,
        )

    call(first)
    return call


def case_inputs(case: Case, seed: int, l2: int, device="cuda", n_sets: int | None = None):
    """(the main cache's lengths, the extra cache's or None, the input sets): as many
    sets, alike but for their values, as keep consecutive calls from sharing L2
    (``bench_decode.input_sets``), or ``n_sets``."""
    seqlens = case_seqlens(case, seed)
    extra_seqlens = case_seqlens(case, seed, extra=True) if case.extra_topk else None
    extra_topk_length = case_extra_topk_length(case, seed)
    if n_sets is None:
        n_sets = bench_decode.input_sets(sparse_bytes(case), l2)
    sets = [make_inputs(case, seqlens, seed + i, device, extra_seqlens, extra_topk_length) for i in range(n_sets)]
    return seqlens, extra_seqlens, sets


def run_case(modules: dict, case: Case, timer, l2: int, check: bool, seed: int, device="cuda", rounds: int = 1) -> dict:
    """Times every implementation in ``modules`` (ours first) on the same inputs."""
    import torch

    seqlens, extra_seqlens, sets = case_inputs(case, seed, l2, device)
    first, n_sets = sets[0], len(sets)
    nbytes = sparse_bytes(case)
    flops = sparse_flops(case)

    cache_bytes = int(first.k_cache.numel()) + (0 if first.extra_k_cache is None else int(first.extra_k_cache.numel()))
    result = {
        **case._asdict(), "total_kv_tokens": int(seqlens.sum()),
        "total_extra_kv_tokens": 0 if extra_seqlens is None else int(extra_seqlens.sum()),
        "cache_bytes": cache_bytes * n_sets, "input_sets": n_sets,
        "flops": float(flops), "bytes": float(nbytes),
    }
    def reference():
        from flashmla_cute.sparse_reference import sparse_mla_reference

        return sparse_mla_reference(first.q, first.k_cache, first.indices, extra_k_cache=first.extra_k_cache,
                                    extra_indices=first.extra_indices, extra_topk_length=first.extra_topk_length)

    calls = {impl: planned_caller(module, first) for impl, module in modules.items()}  # compiles ours
    bench_decode.time_and_check(calls, sets, reference if check else None, timer, flops, None, result, rounds)
    result.update(bench_decode.compare_with_peers(result, [impl for impl in modules if impl != OURS]))
    del sets, first
    torch.cuda.empty_cache()
    return result


def print_table(rows: list[dict], matmul: dict, check: bool, peers: list[str], case_set: str) -> None:
    Column, number = bench_decode.TableColumn, bench_decode.number
    columns = [
        Column("case", max(len(Case.of_row(r).name) for r in rows), lambda r: Case.of_row(r).name, "<"),
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
        description="Time sparse decoding over DeepSeek-V3.2's and MODEL1's FP8 caches on FlashMLA's production and "
        "peak cases, beside FlashMLA's current kernel when flash_mla_head imports. Needs a Hopper (sm_90) GPU.",
    )
    parser.add_argument("--cases", choices=tuple(CASE_SETS), default="all",
                        help="production: V3.2, h_q 128, s_q 2, topk 2048, b 2 / 64 / 74 / 128; "
                        "peak: V3.2, b 148, topk 16384, h_q 64 / 128; "
                        "model1: FlashMLA's 4 MODEL1 configurations (topk 128 + extra_topk 512 or 1024), "
                        "b 2 / 64 / 74 / 128 / 148; all: the three (default: all)")
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
        r = run_case(modules, case, timer, l2, args.check, args.seed + 1000 * i, rounds=args.rounds)
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
