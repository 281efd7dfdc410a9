"""Per-kernel GPU time (metadata, decode) of the anchor cases, from the torch
profiler: where a case's time goes. The last case is the tiny problem that
``bench_overhead.py`` calls in a loop: its kernel time bounds that loop from below."""

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import flashmla_cute  # noqa: E402
from flashmla_cute.testing import make_decode_inputs  # noqa: E402

CASES = [(128, 8192, 16, 1), (128, 8192, 64, 1), (128, 8192, 128, 1), (128, 8192, 128, 2), (1, 100, 16, 1)]


def main():
    for b, seqlen, h_q, s_q in CASES:
        x = make_decode_inputs(b, s_q, h_q, seqlens=[seqlen] * b, device="cuda", seed=0)
        meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, s_q * h_q, 1)

        def step():
            return flashmla_cute.flash_mla_with_kvcache(
                x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits, causal=s_q > 1
            )

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        times = {}
        for evt in prof.key_averages():
            if evt.device_type.name == "CUDA" or getattr(evt, "device_time_total", 0) > 0:
                t = getattr(evt, "device_time_total", 0) / max(evt.count, 1)
                if t > 0:
                    times[evt.key.replace("kernel_cutlass_kernel_flashmla_cutekernels", "")[:48]] = (t, evt.count)
        parts = ", ".join(f"{k}: {t:.1f} us x{c}" for k, (t, c) in sorted(times.items(), key=lambda kv: -kv[1][0]))
        print(f"b{b} sk{seqlen} h{h_q} s{s_q}: {parts}", flush=True)


if __name__ == "__main__":
    main()
