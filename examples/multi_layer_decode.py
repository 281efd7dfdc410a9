"""A DeepSeek-V3-shaped decode loop: many layers, a growing paged KV cache, one plan per step.

    python examples/multi_layer_decode.py                              # 61 layers, batch 32, ~4k context, 128 heads
    python examples/multi_layer_decode.py --tp 8 --mtp --cuda-graph    # 16 heads per GPU, 2 tokens per step, CUDA graph
    python examples/multi_layer_decode.py --layers 2 --batch 2 --context 200 --steps 2   # small (runs on a CPU too)

The attention of a model's decode loop, in the absorbed MLA form DeepSeek-V3 uses (one
latent KV head of 576 = 512 + 64 columns, values the first 512; 128 query heads, divided
by ``--tp``). Each layer has its own paged KV cache; all layers share one page table, as
in a serving engine. A small page allocator hands out the cache's pages in shuffled
order, so every sequence's pages are scattered.

Before the first step every sequence holds a context of between 3/4 of ``--context``
and ``--context`` tokens. Each step then:

1. appends the new token's latent (random numbers; ``--mtp``: two tokens) to every
   layer's cache, taking a new page from the allocator when a sequence's last page is full;
2. plans the split of the work once with ``get_mla_metadata``;
3. calls ``flash_mla_with_kvcache`` once per layer (causal), with fresh queries.

With ``--cuda-graph`` steps 2 and 3 are captured once into a CUDA graph over static
buffers (lengths, page table, queries, outputs) and replayed every step with the new
lengths and pages; step 1 runs before each replay and writes into those buffers.

It prints, per step, the mean sequence length and the attention time (whole step and per
layer), then the median over the steps and the tokens per second the attention alone
would allow. Finally it compares one layer of the last step with the float32 reference
``flashmla_cute.reference.flash_mla_reference`` by cosine distance and prints PASS (both
out and lse under 1e-5) or FAIL; it exits with status 1 on FAIL.

Without a Hopper GPU the same calls run through the package's CPU path (which computes
with the reference) on a small configuration unless sizes are given; it says so first.
The check then compares the reference with itself and only shows that the loop runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import flashmla_cute
from flashmla_cute.reference import flash_mla_reference
from flashmla_cute.testing import reference_verdict, time_ms

PAGE_SIZE = 64  # tokens per page of the KV cache
D, DV = 576, 512  # q/k head dim (512 latent + 64 rope), v head dim (the latent part)
MODEL_HEADS = 128  # DeepSeek-V3's query heads, before tensor parallelism
H_KV = 1  # one latent KV head

GPU_DEFAULTS = {"layers": 61, "batch": 32, "context": 4096, "steps": 16}  # DeepSeek-V3 has 61 layers
CPU_DEFAULTS = {"layers": 2, "batch": 2, "context": 200, "steps": 2}


class PageAllocator:
    """Hands out the free pages of the KV caches, in shuffled order (as an engine's free
    list is after requests have come and gone)."""

    def __init__(self, num_pages: int, generator: torch.Generator):
        self._free = torch.randperm(num_pages, generator=generator).tolist()

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("the KV cache has no free page left")
        return self._free.pop()


class PagedBatch:
    """Lengths and page table of a batch of sequences, kept on the host and grown token by
    token; page ``p`` of sequence ``i`` is ``table[i, p]``."""

    def __init__(self, lengths: list[int], max_pages: int, allocator: PageAllocator):
        self.allocator = allocator
        self.lengths = [0] * len(lengths)
        self.table = torch.zeros(len(lengths), max_pages, dtype=torch.int32)
        self.num_pages = [0] * len(lengths)
        self.first_slots = self.append_tokens(lengths)

    def append_tokens(self, counts: list[int]) -> torch.Tensor:
        """Adds ``counts[i]`` tokens to sequence ``i``, taking new pages as needed; returns the
        cache slots (``page * 64 + offset``) of the new tokens, sequence by sequence."""
        slots = []
        for i, count in enumerate(counts):
            start = self.lengths[i]
            self.lengths[i] += count
            while self.num_pages[i] * PAGE_SIZE < self.lengths[i]:
                self.table[i, self.num_pages[i]] = self.allocator.allocate()
                self.num_pages[i] += 1
            positions = torch.arange(start, self.lengths[i])
            slots.append(self.table[i, positions // PAGE_SIZE].long() * PAGE_SIZE + positions % PAGE_SIZE)
        return torch.cat(slots)


def random_latents(n: int, dtype, device, generator=None) -> torch.Tensor:
    """``n`` cache rows (latent + rope) of small random numbers."""
    return (torch.randn(n, D, generator=generator, device=device) / 10).clamp_(-1, 1).to(dtype)


def parse_args(argv, on_gpu: bool):
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=defaults["layers"], help="attention layers (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=defaults["batch"], help="sequences decoded together (default: %(default)s)")
    parser.add_argument("--context", type=int, default=defaults["context"],
                        help="longest starting context in tokens; each starts with 3/4 to all of it (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults["steps"], help="decode steps timed (default: %(default)s)")
    parser.add_argument("--tp", type=int, default=1,
                        help=f"tensor-parallel degree: {MODEL_HEADS} query heads / tp per GPU (default: 1)")
    parser.add_argument("--mtp", action="store_true", help="multi-token prediction: 2 query tokens per step (s_q = 2), causal")
    parser.add_argument("--cuda-graph", action="store_true", help="capture the plan and all layers in one CUDA graph")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data (default: 0)")
    args = parser.parse_args(argv)
    if args.tp < 1 or MODEL_HEADS % args.tp:
        parser.error(f"--tp must divide {MODEL_HEADS}, got {args.tp}")
    for name in ("layers", "batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.context < 4:
        parser.error(f"--context must be >= 4, got {args.context}")
    return args


def main(argv=None) -> int:
    on_gpu = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    args = parse_args(argv, on_gpu)
    if on_gpu:
        device = torch.device("cuda")
        print(f"device: {torch.cuda.get_device_name()}")
    else:
        device = torch.device("cpu")
        print("No Hopper (sm_90) GPU found: running through the CPU path (the float32 reference), "
              "by default on a small configuration")
        if args.cuda_graph:
            print("--cuda-graph needs a GPU: ignored")
            args.cuda_graph = False

    dtype = torch.bfloat16
    s_q = 2 if args.mtp else 1
    h_q = MODEL_HEADS // args.tp
    b, layers = args.batch, args.layers
    gen = torch.Generator().manual_seed(args.seed)

    # Sizes: room for every sequence's final length, plus a few spare pages.
    start_lengths = torch.randint(args.context - args.context // 4, args.context + 1, (b,), generator=gen).tolist()
    final_pages = [-(-(n + args.steps * s_q) // PAGE_SIZE) for n in start_lengths]
    num_pages = sum(final_pages) + 8
    allocator = PageAllocator(num_pages, gen)
    batch = PagedBatch(start_lengths, max(final_pages), allocator)

    # One cache per layer, [num_pages, 64, h_kv, 576], in one allocation. Slots never
    # written hold NaN: a read of one would show in the check.
    kv = torch.full((layers, num_pages, PAGE_SIZE, H_KV, D), float("nan"), dtype=dtype, device=device)
    kv_rows = kv.view(layers, num_pages * PAGE_SIZE, D)
    first_slots = batch.first_slots.to(device)
    for layer in range(layers):  # the context, written layer by layer to bound the temporaries
        kv_rows[layer, first_slots] = random_latents(first_slots.numel(), dtype, device)

    # Static buffers: what the step reads (and a CUDA graph replays with).
    cache_seqlens = torch.tensor(batch.lengths, dtype=torch.int32, device=device)
    block_table = batch.table.to(device)
    q = torch.empty(layers, b, s_q, h_q, D, dtype=dtype, device=device).normal_(std=0.1)

    print(f"layers {layers}, batch {b}, s_q {s_q}{' (MTP, causal)' if args.mtp else ''}, h_q {h_q} (tp {args.tp}), "
          f"h_kv {H_KV}, d {D}, dv {DV}, context {min(start_lengths)}..{max(start_lengths)} tokens, "
          f"{num_pages} pages of {PAGE_SIZE} per layer ({kv.numel() * kv.element_size() / 2**30:.2f} GiB of caches)")

    def attention_step():
        # Once per step: the plan depends on the lengths, not on the layer.
        meta, splits = flashmla_cute.get_mla_metadata(cache_seqlens, s_q * h_q // H_KV, H_KV)
        return [
            flashmla_cute.flash_mla_with_kvcache(
                q[layer], kv[layer], block_table, cache_seqlens, DV, meta, splits, causal=True
            )
            for layer in range(layers)
        ]

    def append_new_tokens():
        slots = batch.append_tokens([s_q] * b).to(device)
        kv_rows[:, slots] = random_latents(layers * slots.numel(), dtype, device).view(layers, -1, D)
        cache_seqlens.copy_(torch.tensor(batch.lengths, dtype=torch.int32))
        block_table.copy_(batch.table)
        q.normal_(std=0.1)

    # Compile (first use) and warm up outside the timed steps and the capture.
    outputs = attention_step()
    if args.cuda_graph:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = attention_step()  # static outputs, rewritten by every replay
        run_step = graph.replay
        print("captured get_mla_metadata and every layer's flash_mla_with_kvcache in one CUDA graph")
    else:
        def run_step():
            nonlocal outputs
            outputs = attention_step()

    step_ms = []
    for step in range(args.steps):
        append_new_tokens()
        ms = time_ms(run_step, device)
        step_ms.append(ms)
        mean_len = sum(batch.lengths) / b
        print(f"step {step:3d}: mean length {mean_len:8.1f}, attention {ms:8.3f} ms, {ms / layers:7.3f} ms per layer",
              flush=True)

    median = statistics.median(step_ms)
    print(f"median over {args.steps} steps: {median:.3f} ms per step, {median / layers:.3f} ms per layer, "
          f"{b * s_q / (median * 1e-3):,.0f} tokens/s (attention only)")

    check_layer = layers - 1
    out, lse = outputs[check_layer]
    ref_out, ref_lse = flash_mla_reference(q[check_layer], kv[check_layer], block_table, cache_seqlens, DV, causal=True)
    passed, verdict = reference_verdict(out, lse, ref_out, ref_lse)
    print(f"check: layer {check_layer} of step {args.steps - 1} against the float32 reference: {verdict}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
