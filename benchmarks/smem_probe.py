"""One decode call of a grid case, for a profiler to count what the kernel asks of shared
memory (``ncu --launch-skip`` past the warm-up call).

    python benchmarks/smem_probe.py --case 128,4096,128,1
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import flashmla_cute  # noqa: E402
from flashmla_cute.testing import make_decode_inputs  # noqa: E402


def parse_case(text: str) -> tuple[int, int, int, int]:
    """``b,seqlen,h_q,s_q``: four positive integers."""
    values = text.split(",")
    if len(values) != 4 or not all(v.strip().isdigit() and int(v) > 0 for v in values):
        raise argparse.ArgumentTypeError(f"--case {text!r}: expected b,seqlen,h_q,s_q, four positive integers")
    b, seqlen, h_q, s_q = (int(v) for v in values)
    return b, seqlen, h_q, s_q


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=parse_case, default="128,4096,128,1", help="b,seqlen,h_q,s_q (causal, bf16)")
    parser.add_argument("--calls", type=int, default=2, help="calls in all (the first warms up)")
    args = parser.parse_args()
    b, seqlen, h_q, s_q = args.case
    x = make_decode_inputs(b, s_q, h_q, seqlen=seqlen, device="cuda", seed=0)
    meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, s_q * h_q, 1)
    for _ in range(args.calls):
        out, lse = flashmla_cute.flash_mla_with_kvcache(
            x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits, causal=True)
    torch.cuda.synchronize()
    print(f"case b{b} sk{seqlen} h{h_q} s{s_q}: out finite {bool(torch.isfinite(out).all())}")


if __name__ == "__main__":
    main()
