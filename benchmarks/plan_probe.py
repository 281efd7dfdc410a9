"""Where a small batch's time goes: the GPU time per call (CUDA-graph replays) for one case under plans
with different numbers of SM parts and least payloads (``scheduler.plan_torch``), so that
the cost of a block on a lone CTA and the cost of merging more fragments show apart.

    python benchmarks/plan_probe.py "b1 sk1024 h16 s1" [more cases]
"""

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import flashmla_cute  # noqa: E402
from flashmla_cute import scheduler  # noqa: E402
from flashmla_cute.testing import make_decode_inputs  # noqa: E402
from kernel_times import graph_time  # noqa: E402

PARTS = (1, 132)  # one lone CTA; the plan of an H100 (divided by the query tiles)
MIN_PAYLOADS = (4, 5, 6, 7, 10)


def main():
    for name in sys.argv[1:]:
        b, seqlen, h_q, s_q = (int(w[1:] if w[0] == "b" else w[2:] if w[:2] == "sk" else w[1:]) for w in name.split())
        x = make_decode_inputs(b, s_q, h_q, seqlens=[seqlen] * b, device="cuda", seed=0)
        rows = []
        for min_payload in MIN_PAYLOADS:
            scheduler.MIN_PAYLOAD = min_payload
            for parts in sorted({max(p // -(-s_q * h_q // 64), 1) for p in PARTS}):
                meta, splits = scheduler.plan_torch(x.cache_seqlens.cpu(), parts)
                meta, splits = meta.cuda(), splits.cuda()
                frags = int(splits[1] - splits[0])
                wall = graph_time(lambda: flashmla_cute.flash_mla_with_kvcache(
                    x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits, causal=s_q > 1))
                rows.append(f"  min_payload {min_payload:2d} parts {parts:3d}: {frags:3d} fragments of seq 0, "
                            f"{wall:6.1f} us")
        print(name, *rows, sep="\n", flush=True)


if __name__ == "__main__":
    main()
