"""Context-parallel MLA decoding: each GPU holds part of every sequence's KV cache.

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 examples/context_parallel_decode.py
    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 examples/context_parallel_decode.py --mtp
    torchrun --standalone --nproc-per-node 2 examples/context_parallel_decode.py --backend gloo   # CPU only

A batch of long sequences (``--context`` tokens each by default: 32768 with NCCL, 1000 with
gloo) is split by pages over the ranks: rank 0 holds the first part of every sequence's
tokens, rank 1 the next, the last rank the rest. Each rank plans and runs
``flash_mla_with_kvcache`` over its own pages only, which gives its ``(out, lse)``; the
ranks exchange them with ``all_gather`` and merge them with
``flashmla_cute.merge_attention_states`` into the attention over the whole context.

Causal masking (``--mtp``: two query tokens, where the first must not see the last cache
token) only touches the last ``s_q - 1`` tokens of a sequence. The split keeps those on
the last rank, which runs causal; the other ranks' tokens are visible to every query
token, so they run non-causal.

Rank 0 then computes the same attention on one device over the whole context and prints
the cosine distance of the merged result to it, with PASS (out and lse under 1e-5) or
FAIL; every rank exits with status 1 on FAIL. It also prints the median time over
``--iters`` calls of each rank's attention, of the exchange (``all_gather``), of the merge,
and of the single-device attention over the whole context. At these sizes (a few hundred
kilobytes a rank) the exchange takes far longer than moving its bytes would: its time is
mostly the host's. The merge is one kernel a pair of ranks on Hopper GPUs (float32
results: the merge rounds once, at the end).

``--backend nccl`` (the default) puts rank ``r`` on GPU ``LOCAL_RANK`` (a Hopper GPU);
``--backend gloo`` runs on the CPU through the package's CPU path (the float32
reference), as a smoke test of the data flow. ``NCCL_NVLS_ENABLE=0`` keeps NCCL's NVLink
multicast off, which some machines do not allow.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

import flashmla_cute
from flashmla_cute.testing import PAGE_SIZE, DecodeInputs, make_decode_inputs, reference_verdict, time_ms

D, DV = 576, 512  # q/k head dim (512 latent + 64 rope), v head dim (the latent part)
MODEL_HEADS = 128  # DeepSeek-V3's query heads, before tensor parallelism
H_KV = 1
DEFAULTS = {  # per backend: (batch, context, timing iterations)
    "nccl": {"batch": 4, "context": 32768, "iters": 20},
    "gloo": {"batch": 2, "context": 1000, "iters": 1},
}


def shard(x: DecodeInputs, rank: int, world: int, s_q: int) -> tuple[DecodeInputs, bool]:
    """This rank's part of every sequence, as its own paged cache, and whether it needs the
    causal mask.

    Ranks before the last get ``floor(visible pages / world)`` whole pages of each
    sequence, where the visible pages are those every query token sees (before the last
    ``s_q - 1`` tokens); the last rank gets the rest, including the tokens that causal
    masking hides from some query tokens.
    """
    lengths = x.cache_seqlens.tolist()
    table = x.block_table.cpu()
    pages, local_lengths = [], []
    for i, length in enumerate(lengths):
        pages_each = max(length - (s_q - 1), 0) // PAGE_SIZE // world
        first = rank * pages_each
        if rank < world - 1:
            last, tokens = first + pages_each, pages_each * PAGE_SIZE
        else:
            last, tokens = -(-length // PAGE_SIZE), length - first * PAGE_SIZE
        pages.append(table[i, first:last].long())
        local_lengths.append(tokens)

    # The rank's pages, gathered into a cache of its own (plus one page so that it is never
    # empty); its page table points into that cache.
    owned = torch.cat(pages)
    k_cache = torch.cat([x.k_cache[owned.to(x.k_cache.device)], x.k_cache[:1]])
    width = max(1, max(p.numel() for p in pages))
    local_table = torch.zeros(len(lengths), width, dtype=torch.int32)
    offset = 0
    for i, p in enumerate(pages):
        local_table[i, : p.numel()] = torch.arange(offset, offset + p.numel(), dtype=torch.int32)
        offset += p.numel()
    device = x.q.device
    local = DecodeInputs(
        q=x.q,
        k_cache=k_cache,
        block_table=local_table.to(device),
        cache_seqlens=torch.tensor(local_lengths, dtype=torch.int32, device=device),
    )
    return local, rank == world - 1


def attention(x: DecodeInputs, s_q: int, h_q: int, causal: bool):
    meta, splits = flashmla_cute.get_mla_metadata(x.cache_seqlens, s_q * h_q // H_KV, H_KV)
    return flashmla_cute.flash_mla_with_kvcache(
        x.q, x.k_cache, x.block_table, x.cache_seqlens, DV, meta, splits, causal=causal
    )


def gather(out: torch.Tensor, lse: torch.Tensor, world: int):
    """Every rank's (out, lse), in rank order."""
    outs = [torch.empty_like(out) for _ in range(world)]
    lses = [torch.empty_like(lse) for _ in range(world)]
    dist.all_gather(outs, out)
    dist.all_gather(lses, lse)
    return outs, lses


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor]):
    """The ranks' (out, lse) merged in rank order into the attention over all keys
    (``out`` float32)."""
    # Merged in float32 and rounded once, by the caller, rather than after every merge.
    outs = [o.float() for o in outs]
    merged_out, merged_lse = outs[0], lses[0]
    for other_out, other_lse in zip(outs[1:], lses[1:]):
        merged_out, merged_lse = flashmla_cute.merge_attention_states(merged_out, merged_lse, other_out, other_lse)
    return merged_out, merged_lse


def median_ms(fn, iters: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls (after one warm-up call)."""
    fn()
    return statistics.median(time_ms(fn, device) for _ in range(iters))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl",
                        help="nccl: one Hopper GPU per rank (default); gloo: CPU")
    parser.add_argument("--batch", type=int, default=None, help="sequences (default: 4 with nccl, 2 with gloo)")
    parser.add_argument("--context", type=int, default=None,
                        help="tokens per sequence (default: 32768 with nccl, 1000 with gloo)")
    parser.add_argument("--tp", type=int, default=1, help=f"query heads per rank = {MODEL_HEADS} / tp (default: 1)")
    parser.add_argument("--mtp", action="store_true", help="two query tokens per sequence (s_q = 2), causal")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: 20 with nccl, 1 with gloo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.backend].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tp < 1 or MODEL_HEADS % args.tp:
        parser.error(f"--tp must divide {MODEL_HEADS}, got {args.tp}")
    if args.batch < 1 or args.context < 2 or args.iters < 1:
        parser.error("--batch and --iters must be >= 1 and --context >= 2")
    return args


def rank_gpu_problem(local_rank: int) -> str | None:
    """Why GPU ``local_rank`` cannot run a rank with ``--backend nccl``, or None. Checked
    before ``torch.cuda.set_device``, which without that GPU (a CPU-only torch, no GPU,
    fewer GPUs than ranks) fails with torch's own error, not a hint to use gloo."""
    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        return f"cuda:{local_rank} is not there ({torch.cuda.device_count()} CUDA GPUs found)"
    device = torch.device("cuda", local_rank)
    if torch.cuda.get_device_capability(device) != (9, 0):
        return f"cuda:{local_rank} is {torch.cuda.get_device_name(device)}"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        print("run under torchrun, e.g. torchrun --standalone --nproc-per-node 2 "
              "examples/context_parallel_decode.py", file=sys.stderr)
        return 2
    if args.backend == "nccl":
        local_rank = int(os.environ["LOCAL_RANK"])
        problem = rank_gpu_problem(local_rank)
        if problem:
            print(f"--backend nccl needs a Hopper (sm_90) GPU per rank; {problem}. Use --backend gloo to run on "
                  "the CPU.", file=sys.stderr)
            return 2
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend)
    try:
        return run(args, device)
    finally:
        dist.destroy_process_group()


def run(args, device: torch.device) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    s_q = 2 if args.mtp else 1
    h_q = MODEL_HEADS // args.tp

    # Every rank draws the same whole inputs (same seed, on the CPU) and keeps its part.
    whole = make_decode_inputs(args.batch, s_q, h_q, H_KV, seqlens=[args.context] * args.batch,
                               d=D, dtype=torch.bfloat16, seed=args.seed)
    whole = DecodeInputs(*(t.to(device) for t in (whole.q, whole.k_cache, whole.block_table, whole.cache_seqlens)))
    local, causal = shard(whole, rank, world, s_q)
    if rank != 0:
        whole = None  # a rank keeps only its own pages; rank 0 keeps the whole for the check

    out, lse = attention(local, s_q, h_q, causal)
    outs, lses = gather(out, lse, world)
    merged_out, merged_lse = merge(outs, lses)

    local_ms = median_ms(lambda: attention(local, s_q, h_q, causal), args.iters, device)
    gather_ms = median_ms(lambda: gather(out, lse, world), args.iters, device)
    merge_ms = median_ms(lambda: merge(outs, lses), args.iters, device)
    stats = torch.tensor([float(local.cache_seqlens.sum()), local_ms, gather_ms, merge_ms], dtype=torch.float64,
                         device=device)
    all_stats = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(all_stats, stats)

    passed = torch.ones(1, dtype=torch.int32, device=device)
    if rank == 0:
        print(f"{world} ranks ({args.backend}, {device.type}), batch {args.batch}, context {args.context} tokens, "
              f"s_q {s_q}{' (causal)' if s_q > 1 else ''}, h_q {h_q}, d {D}, dv {DV}")
        for r, (tokens, r_local_ms, r_gather_ms, r_merge_ms) in enumerate(t.tolist() for t in all_stats):
            print(f"rank {r}: {int(tokens)} cache tokens ({'causal' if r == world - 1 else 'non-causal'}), "
                  f"attention {r_local_ms:.3f} ms, all_gather {r_gather_ms:.3f} ms, merge {r_merge_ms:.3f} ms")
        ref_out, ref_lse = attention(whole, s_q, h_q, causal=True)
        single_ms = median_ms(lambda: attention(whole, s_q, h_q, causal=True), args.iters, device)
        print(f"one device over the whole context: attention {single_ms:.3f} ms")
        ok, verdict = reference_verdict(merged_out, merged_lse, ref_out, ref_lse)
        print(f"check: merged result against one device over the whole context: {verdict}", flush=True)
        passed.fill_(int(ok))
    dist.broadcast(passed, src=0)
    return 0 if bool(passed.item()) else 1


if __name__ == "__main__":
    sys.exit(main())
