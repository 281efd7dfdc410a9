"""One decode call of a grid case, for a profiler to count what the kernel asks of shared
memory (``ncu --launch-skip`` past the warm-up call).

    python benchmarks/smem_probe.py --case 128,4096,128,1
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_decode, pair_timeline
from bench_decode import positive_int  # noqa: E402
from pair_timeline import CASE_METAVAR, case_call, parse_case  # noqa: E402


def main():
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=parse_case, default="128,4096,128,1", metavar=CASE_METAVAR,
                        help="a decode case (bf16, causal, h_kv 1; var: varied lengths)")
    parser.add_argument("--calls", type=positive_int, default=2, help="calls in all (the first warms up)")
    args = parser.parse_args()
    call = case_call(*args.case).call
    for _ in range(args.calls):
        out, lse = call()
    torch.cuda.synchronize()
    print(f"case {args.case}: out finite {bool(torch.isfinite(out).all())}")


if __name__ == "__main__":
    main()
