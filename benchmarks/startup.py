"""Time from importing the package to the first decode step's results, in a fresh
process: run it twice with an empty FLASHMLA_CUTE_CACHE_DIR to see the compile time
(first run) and the cached start (second run)."""

import time

import torch

x = torch.zeros(1, device="cuda")  # CUDA context, outside the measured time
start = time.perf_counter()
import flashmla_cute  # noqa: E402
from flashmla_cute.testing import make_decode_inputs  # noqa: E402

inputs = make_decode_inputs(4, 1, 16, seqlens=[100, 200, 300, 400], device="cuda", seed=0)
t0 = time.perf_counter()
meta, splits = flashmla_cute.get_mla_metadata(inputs.cache_seqlens, 16, 1)
out, lse = flashmla_cute.flash_mla_with_kvcache(
    inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512, meta, splits
)
torch.cuda.synchronize()
end = time.perf_counter()
print(f"import + first decode step: {end - start:.3f} s (first two calls alone: {end - t0:.3f} s)")
