"""Where a small batch's time goes: the GPU time per call (CUDA-graph replays) for one case
under plans of fixed payloads (blocks per SM part; ``scheduler.plan_torch`` with
``scheduler.payload_of`` replaced), on the case's own number of SM parts and on one part, so
that the cost of a block on a lone CTA and the cost of merging more fragments show apart.
The plan the package picks (``get_mla_metadata``) is timed first.

    python benchmarks/plan_probe.py "b1 sk1024 h16 s1" [more cases] [--payloads 2,4,8]
"""

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import flashmla_cute  # noqa: E402
from flashmla_cute import scheduler  # noqa: E402
from flashmla_cute.testing import make_decode_inputs  # noqa: E402
from kernel_times import graph_time  # noqa: E402

PARTS = 132  # an H100's SMs (divided by the query tiles below)
PAYLOADS = (2, 3, 4, 6, 8, 12)


def parse_case(name: str) -> tuple[int, int, int, int]:
    """``"b1 sk1024 h16 s1"`` -> (b, seqlen, h_q, s_q)."""
    fields = {}
    for word in name.split():
        key = "sk" if word.startswith("sk") else word[0]
        fields[key] = int(word[len(key):])
    return fields["b"], fields["sk"], fields["h"], fields.get("s", 1)


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
    """``scheduler.plan_torch`` on ``parts`` parts under ``overrides``, as CUDA tensors."""
    with scheduler_overridden(**overrides):
        meta, splits = scheduler.plan_torch(cache_seqlens.cpu(), parts)
    return meta.cuda(), splits.cuda()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--payloads", default=",".join(map(str, PAYLOADS)))
    parser.add_argument("--overheads", default=None, help="fixed costs of a fragment to time, e.g. 2,3,4,5,6")
    args = parser.parse_args()
    payloads = [int(p) for p in args.payloads.split(",")]
    overheads = [int(f) for f in args.overheads.split(",")] if args.overheads else []
    for name in args.cases:
        b, seqlen, h_q, s_q = parse_case(name)
        x = make_decode_inputs(b, s_q, h_q, seqlens=[seqlen] * b, device="cuda", seed=0)

        def call(meta, splits):
            return lambda: flashmla_cute.flash_mla_with_kvcache(
                x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits, causal=s_q > 1)

        meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, s_q * h_q, 1)
        frags = int(splits[1] - splits[0])
        rows = [f"  package plan: {frags:3d} fragments of seq 0, {graph_time(call(meta, splits)):6.1f} us"]
        parts_all = max(PARTS // scheduler.num_query_tiles(s_q * h_q), 1)
        if overheads:
            for overhead in overheads:
                meta, splits = host_plan(x.cache_seqlens, parts_all, FIXED_OVERHEAD_BLOCKS=overhead)
                used = int((meta[:, scheduler.BEGIN_BATCH] <= meta[:, scheduler.END_BATCH]).sum())
                rows.append(f"  overhead {overhead}: {used:3d} of {parts_all} parts used, "
                            f"{int(splits[1] - splits[0]):3d} fragments of seq 0, "
                            f"{graph_time(call(meta, splits)):6.1f} us")
        else:
            for payload in payloads:
                fixed = lambda total, parts, batch, payload=payload: max(payload, -(-total // parts))
                for parts in (parts_all, 1):
                    meta, splits = host_plan(x.cache_seqlens, parts, payload_of=fixed)
                    frags = int(splits[1] - splits[0])
                    rows.append(f"  payload {payload:2d} parts {parts:3d}: {frags:3d} fragments of seq 0, "
                                f"{graph_time(call(meta, splits)):6.1f} us")
        print(name, *rows, sep="\n", flush=True)


if __name__ == "__main__":
    main()
