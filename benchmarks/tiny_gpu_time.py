"""GPU time of the tiny decode problem that ``bench_overhead.py`` calls in a loop
(b = 1, 100 tokens, h_q 16): where do its microseconds go?

    python benchmarks/tiny_gpu_time.py

Each variant is captured 100 times in one CUDA graph and replayed; the time per call is
pure GPU time (kernel plus the gap to the next), with no host work in between.
"""

import sys

import torch

from bench_overhead import graph_us, import_package


def main() -> int:
    fm = import_package()
    from flashmla_cute import scheduler
    from flashmla_cute.testing import make_decode_inputs

    x = make_decode_inputs(1, 1, 16, seqlens=[100], device="cuda", seed=0)
    meta, splits = fm.get_mla_metadata(x.cache_seqlens, 16, 1)
    rows = []

    def decode_with(meta, splits):
        return lambda: fm.flash_mla_with_kvcache(x.q, x.k_cache, x.block_table, x.cache_seqlens, 512, meta, splits)

    rows.append(("get_mla_metadata", lambda: fm.get_mla_metadata(x.cache_seqlens, 16, 1)))
    rows.append((f"decode, {meta.shape[0]} parts (2 fragments)", decode_with(meta, splits)))
    for parts in (1, 2, 8, 32):
        m, s = scheduler.plan_torch(x.cache_seqlens, parts)
        rows.append((f"decode, {parts} parts (plan_torch)", decode_with(m.cuda(), s.cuda())))
    longer = make_decode_inputs(1, 1, 16, seqlens=[64 * 40], device="cuda", seed=0)
    m, s = scheduler.plan_torch(longer.cache_seqlens, 1)
    rows.append(("decode, 1 part, 40 blocks", lambda: fm.flash_mla_with_kvcache(
        longer.q, longer.k_cache, longer.block_table, longer.cache_seqlens, 512, m.cuda(), s.cuda())))
    y = torch.zeros(16, device="cuda")
    rows.append(("torch y.add_(1)", lambda: y.add_(1)))
    print(f"{'variant':<40} {'GPU us/call':>12}")
    for name, fn in rows:
        print(f"{name:<40} {graph_us(fn):>12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
