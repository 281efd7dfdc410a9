"""Where a call's time goes under other split plans. For each case, the plan the package
picks (``get_mla_metadata``) is timed first, then, by the option given:

- ``--payloads`` (the default): ``scheduler.plan_torch`` with ``payload_of`` replaced by a
  fixed payload, on the case's own number of SM parts and on one part, so that the cost
  of a block on a lone CTA and the cost of merging more fragments show apart;
- ``--overheads``: the package's plan rule under other fixed costs of a fragment;
- ``--largest``: balanced plans (every sequence in ``ceil(n / m)`` nearly equal
  fragments, one a part) of the largest fragments ``m`` given, where they fit the parts;
- ``--kinds``: the balanced, packed and walked plans the host builds for the case, each
  where it can be built;
- ``--tails``: the package plan with the last ``T`` blocks of every part's last fragment
  cut off into parts of their own, ``piece`` blocks each, launched after the others
  (``tailed_plan``): the GPU's block scheduler hands those to whichever SMs finish
  first, so that SMs that stream slower do less. Each piece is a fragment more, and
  every sequence that gives up a tail is merged.

Cases are named as ``bench_decode.py`` names them; with ``var`` (``"b64 sk2048 h32 s2
var"``) the lengths are drawn as the benchmark draws them, from ``--seed`` (the benchmark's
seed for a case is its ``--seed`` + 1000 x the case's position in its set). ``--timing
flushed`` times with the benchmark's timer (an L2 flush before each call) instead of
CUDA-graph replays, whose inputs may stay in L2; ``--rounds`` times every plan in turn
that many times and keeps each plan's best.

    python benchmarks/plan_probe.py "b1 sk1024 h16 s1" [more cases] [--payloads 2,4,8]
    python benchmarks/plan_probe.py "b32 sk1024 h16 s1" --largest 4,5 --timing flushed --rounds 3
    python benchmarks/plan_probe.py "b128 sk8192 h128 s1" --kinds --timing flushed --rounds 3
    python benchmarks/plan_probe.py "b128 sk4096 h16 s1" --kinds --kinds-overhead 0 --timing flushed
    python benchmarks/plan_probe.py "b128 sk8192 h16 s1" --tails 8:4,16:4 --timing flushed --rounds 3
"""

import argparse
import contextlib
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from flashmla_cute import scheduler  # noqa: E402

PARTS = 132  # an H100's SMs (divided by the query tiles below)
PAYLOADS = (2, 3, 4, 6, 8, 12)
KIND_SLACK_BLOCKS = 8  # how far past the payload --kinds looks for a balanced plan that fits


def parse_case(name: str) -> tuple[int, int, int, int, bool]:
    """``"b1 sk1024 h16 s1"`` -> (b, seqlen, h_q, s_q, varlen); ``s1`` may be left out,
    ``var`` marks varied lengths."""
    fields = {}
    words = name.split()
    for word in words:
        if word == "var":
            continue
        key = "sk" if word.startswith("sk") else word[0]
        fields[key] = int(word[len(key):])
    return fields["b"], fields["sk"], fields["h"], fields.get("s", 1), "var" in words


@contextlib.contextmanager
def scheduler_overridden(**values):
    """``scheduler``'s module attributes set to ``values`` inside the block (the planner
    reads them at each call), and restored afterwards."""
    saved = {name: getattr(scheduler, name) for name in values}
    for name, value in values.items():
        setattr(scheduler, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(scheduler, name, value)


def host_plan(cache_seqlens, parts: int, **overrides):
    """``scheduler.plan_torch`` on ``parts`` parts under ``overrides``, as int32 lists."""
    with scheduler_overridden(**overrides):
        meta, splits = scheduler.plan_torch(cache_seqlens.cpu(), parts)
    return meta.tolist(), [b - a for a, b in itertools.pairwise(splits.tolist())]


def balanced_plan(blocks: list[int], parts: int, largest: int):
    """(rows, fragments) of the balanced plan of largest fragment ``largest``
    (``scheduler.balanced_parts``), or None where its fragments do not fit ``parts``."""
    if sum(scheduler.balanced_fragments(blocks, largest)) > parts:
        return None
    meta = scheduler.empty_rows(len(blocks), parts)
    return meta, scheduler.balanced_parts(blocks, largest, meta)


def plan_kinds(blocks: list[int], parts: int) -> dict:
    """{kind: (rows, fragments)}: the balanced plan of the least largest fragment from
    the payload on that fits (within ``KIND_SLACK_BLOCKS``), the packed plan and the
    walk, each where it can be built."""
    b, F = len(blocks), scheduler.FIXED_OVERHEAD_BLOCKS
    total = sum(blocks) + F * b
    payload = scheduler.payload_of(total, parts, b)
    kinds = {}
    for largest in range(payload, payload + KIND_SLACK_BLOCKS + 1):
        plan = balanced_plan(blocks, parts, largest)
        if plan is not None:
            kinds[f"balanced, largest {largest}"] = plan
            break
    meta = scheduler.empty_rows(b, parts)
    fragments = scheduler.packed_parts(blocks, payload + F, meta)
    if fragments is not None:
        kinds["packed"] = (meta, fragments)
    meta = scheduler.empty_rows(b, parts)
    kinds["walk"] = (meta, scheduler.walked_parts(blocks, total, payload + F, meta))
    return kinds


def tailed_plan(rows: list[list[int]], fragments: list[int], blocks: list[int], tail: int, piece: int,
                longest_only: bool = False):
    """(rows, fragments): the plan ``(rows, fragments)`` without its empty parts, and with
    the last ``tail`` blocks of each part's last fragment (where that fragment has at
    least ``tail + 2``; with ``longest_only``, only of the parts within ``tail`` blocks of
    the longest) moved into parts of ``piece`` blocks, appended after the others in the
    order of the parts they came from; each piece is a fragment of its sequence,
    numbered after the plan's own."""
    B_BATCH, B_BLOCK, E_BATCH, E_BLOCK, B_SPLIT = (scheduler.BEGIN_BATCH, scheduler.BEGIN_BLOCK, scheduler.END_BATCH,
                                                   scheduler.END_BLOCK, scheduler.BEGIN_SPLIT)
    owners = [list(row) for row in rows if row[B_BATCH] <= row[E_BATCH]]
    fragments = list(fragments)
    sizes = [sum(last - first for _, first, last in scheduler.part_fragments(row, blocks)) for row in owners]
    pieces = []
    for row, size in zip(owners, sizes):
        if longest_only and size < max(sizes) - tail:
            continue
        batch, end = row[E_BATCH], row[E_BLOCK]
        first = row[B_BLOCK] if row[B_BATCH] == batch else 0
        if end - first < tail + 2:
            continue
        row[E_BLOCK] = end - tail
        for begin in range(end - tail, end, piece):
            pieces.append([0] * scheduler.METADATA_INTS)
            pieces[-1][:B_SPLIT + 1] = [batch, begin, batch, min(begin + piece, end), fragments[batch]]
            fragments[batch] += 1
    return owners + pieces, fragments


def tail_specs(text: str) -> list[tuple[int, int, bool]]:
    """``--tails``'s value, ``TAIL:PIECE[:longest],...``, as (tail, piece, longest only)
    triples; refuses anything else, and counts below 1 (an ``argparse`` type)."""
    specs = []
    for spec in text.split(","):
        fields = spec.split(":")
        if len(fields) not in (2, 3) or not all(f.isdigit() for f in fields[:2]) or fields[2:] not in ([], ["longest"]):
            raise argparse.ArgumentTypeError(f"{spec!r}: expected TAIL:PIECE or TAIL:PIECE:longest, e.g. 8:4")
        tail, piece = int(fields[0]), int(fields[1])
        if tail < 1 or piece < 1:
            raise argparse.ArgumentTypeError(f"{spec!r}: TAIL and PIECE must be at least 1 block")
        specs.append((tail, piece, len(fields) == 3))
    return specs


def plan_call(x, s_q: int, rows: list[list[int]], fragments: list[int]):
    """A decode call of inputs ``x`` (on the GPU) under the plan ``(rows, fragments)``."""
    import torch

    import flashmla_cute

    meta = torch.tensor(rows, dtype=torch.int32, device="cuda")
    splits = torch.tensor([0] + list(itertools.accumulate(fragments)), dtype=torch.int32, device="cuda")
    return lambda: flashmla_cute.flash_mla_with_kvcache(
        x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits, causal=s_q > 1)


def plan_summary(rows: list[list[int]], fragments: list[int], blocks: list[int]) -> str:
    """Parts used, fragments in all, sequences split and the longest part's blocks."""
    parts = [scheduler.part_fragments(row, blocks) for row in rows]
    used = sum(1 for pieces in parts if pieces)
    longest = max((sum(last - first for _, first, last in pieces) for pieces in parts), default=0)
    split = sum(1 for k in fragments if k > 1)
    return f"{used:3d} parts, {sum(fragments):4d} fragments, {split:3d} split, longest {longest:4d} blocks"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--payloads", default=None, help=f"fixed payloads to time (default {PAYLOADS})")
    mode.add_argument("--overheads", default=None, help="fixed costs of a fragment to time, e.g. 2,3,4,5,6")
    mode.add_argument("--largest", default=None, help="largest fragments of balanced plans to time, e.g. 4,5,8")
    mode.add_argument("--kinds", action="store_true", help="time the balanced, packed and walked plans")
    mode.add_argument("--tails", type=tail_specs, default=None,
                      help="TAIL:PIECE[:longest],... : the package plan with each part's last TAIL blocks in parts "
                           "of PIECE (with :longest, only the parts within TAIL blocks of the longest)")
    parser.add_argument("--kinds-overhead", type=int, default=None,
                        help="the fixed cost of a fragment the --kinds plans are built with (default the package's)")
    parser.add_argument("--timing", choices=("graph", "flushed"), default="graph")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of varied lengths and of the inputs")
    args = parser.parse_args()

    import torch

    import flashmla_cute
    from bench_decode import Timer
    from flashmla_cute.testing import make_decode_inputs, random_seqlens
    from kernel_times import graph_time

    timer = Timer(25.0, 200.0) if args.timing == "flushed" else graph_time
    for name in args.cases:
        b, seqlen, h_q, s_q, varlen = parse_case(name)
        seqlens = random_seqlens(b, seqlen, s_q, varlen, args.seed)
        blocks = scheduler.plan_blocks(seqlens.tolist())
        x = make_decode_inputs(b, s_q, h_q, seqlens=seqlens.tolist(), device="cuda", seed=args.seed)
        parts_all = max(PARTS // scheduler.num_query_tiles(s_q * h_q), 1)

        meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, s_q * h_q, 1)
        plans = {"package plan": (meta.tolist(), [q - p for p, q in itertools.pairwise(splits.tolist())])}
        if args.overheads:
            for overhead in map(int, args.overheads.split(",")):
                plans[f"overhead {overhead}"] = host_plan(x.cache_seqlens, parts_all, FIXED_OVERHEAD_BLOCKS=overhead)
        elif args.largest:
            for largest in map(int, args.largest.split(",")):
                plan = balanced_plan(blocks, parts_all, largest)
                if plan is None:
                    print(f"  balanced, largest {largest}: its fragments need more than {parts_all} parts")
                else:
                    plans[f"balanced, largest {largest}"] = plan
        elif args.kinds:
            overhead = scheduler.FIXED_OVERHEAD_BLOCKS if args.kinds_overhead is None else args.kinds_overhead
            with scheduler_overridden(FIXED_OVERHEAD_BLOCKS=overhead):
                plans.update(plan_kinds(blocks, parts_all))
        elif args.tails:
            for tail, piece, longest in args.tails:
                label = f"tails {tail} in pieces of {piece}" + (" of the longest" if longest else "")
                plans[label] = tailed_plan(*plans["package plan"], blocks, tail, piece, longest)
        else:
            for payload in map(int, (args.payloads or ",".join(map(str, PAYLOADS))).split(",")):
                fixed = lambda total, parts, batch, payload=payload: max(payload, -(-total // parts))
                for parts in (parts_all, 1):
                    label = f"payload {payload:2d} parts {parts:3d}"
                    plans[label] = host_plan(x.cache_seqlens, parts, payload_of=fixed)

        calls = {label: plan_call(x, s_q, *plan) for label, plan in plans.items()}
        # Every plan's output against the package plan's: a plan changes only the order
        # of a sum.
        expected = calls["package plan"]()[0].float()
        differs = {label: (fn()[0].float() - expected).abs().max().item() for label, fn in calls.items()}
        best = {label: float("inf") for label in plans}
        for _ in range(args.rounds):
            for label, fn in calls.items():
                us = timer(fn) * 1000 if args.timing == "flushed" else timer(fn)
                best[label] = min(best[label], us)
        print(name)
        for label, (rows, fragments) in plans.items():
            print(f"  {label:40s} {plan_summary(rows, fragments, blocks)}, {best[label]:8.1f} us, "
                  f"max |out - package plan's| {differs[label]:.1e}", flush=True)


if __name__ == "__main__":
    main()
