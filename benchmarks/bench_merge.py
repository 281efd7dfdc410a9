"""``merge_attention_states`` on a GPU: the merge kernel against the tensor operations it
replaced (``merge._merge_with_tensor_operations``), on the results of decode-sized calls.

    python benchmarks/bench_merge.py

For each case (batch, query tokens, heads, dtype; dv 512, every row seen by both halves),
three figures per path: the host's microseconds a call ("enqueue") and the wall time a
call in a tight loop ("wall": ``host_costs.per_call_us``), which is what an eager
context-parallel step pays, and the GPU's microseconds a call in a CUDA graph of 10
calls ("graph": ``kernel_times.graph_time``), which is what a captured step pays. The
two paths' results are compared first (the largest difference, in units of the dtype's
epsilon).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_decode, host_costs, kernel_times
from bench_decode import no_hopper_reason  # noqa: E402
from flashmla_cute import merge, merge_attention_states  # noqa: E402
from host_costs import per_call_us  # noqa: E402
from kernel_times import graph_time  # noqa: E402

# (b, s_q, h_q, dtype): the serving batches' shapes, and float32 as the context-parallel
# example merges several ranks' results before rounding once.
CASES = [(b, s_q, h_q, dtype) for b in (1, 32, 128) for s_q, h_q in ((1, 16), (1, 128), (2, 64))
         for dtype in (torch.bfloat16,)]
CASES += [(4, 1, 128, torch.float32), (64, 2, 128, torch.float32)]
DV = 512


def halves(b, s_q, h_q, dtype):
    gen = torch.Generator().manual_seed(b * 1000 + h_q)
    out = [torch.randn(b, s_q, h_q, DV, generator=gen).to(dtype).cuda() for _ in range(2)]
    lse = [(torch.randn(b, h_q, s_q, generator=gen) * 3).cuda() for _ in range(2)]
    return out[0], lse[0], out[1], lse[1]


def main(argv=None) -> int:
    # No options: the parser gives --help and refuses arguments the benchmark would ignore.
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    # The merge kernel runs on Hopper GPUs only: elsewhere both paths would be the tensor operations.
    reason = no_hopper_reason("bench_merge.py")
    if reason:
        print(reason, file=sys.stderr)
        return 2
    paths = {"kernel": merge_attention_states, "tensor ops": merge._merge_with_tensor_operations}
    print(f"{'case':28s} {'max diff':>9s}  " + "  ".join(f"{p + ' enqueue/wall/graph us':>34s}" for p in paths))
    for b, s_q, h_q, dtype in CASES:
        args = halves(b, s_q, h_q, dtype)
        assert merge._kernel_merges(args[0], args[2])
        (out_k, lse_k), (out_t, lse_t) = (fn(*args) for fn in paths.values())
        eps = torch.finfo(dtype).eps
        diff = max(((out_k.float() - out_t.float()).abs().max() / eps).item(),
                   ((lse_k - lse_t).abs().max() / torch.finfo(torch.float32).eps).item())
        cells = []
        for fn in paths.values():
            enqueue, wall = per_call_us(lambda fn=fn: fn(*args))
            cells.append(f"{enqueue:10.1f} {wall:10.1f} {graph_time(lambda fn=fn: fn(*args)):10.1f}")
        name = f"b{b} s{s_q} h{h_q} {str(dtype).replace('torch.', '')}"
        print(f"{name:28s} {diff:9.1f}  " + "  ".join(f"{c:>34s}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
