"""Split-KV work plan: which SM part decodes which (batch, kv-block) range.

All the decode work of one KV head and one 64-row query tile is the ordered list of
(batch, block) pairs, batch-major, where sequence ``i`` has
``n_i = max(ceil(seqlen_i / 64), 1)`` blocks (a sequence of length 0 still gets one
block slot, so that some CTA writes its output). The plan cuts that list into
``num_sm_parts`` contiguous ranges of balanced cost; the decode kernel launches one CTA
per (part, KV head, query tile) and each CTA walks its range.

Cost model
----------
A block costs 1 and every sequence costs ``FIXED_OVERHEAD_BLOCKS`` more (its Q load,
epilogue and, when split, its combine). Sequence ``i`` occupies the cost interval
``[C_i, C_i + F + n_i)`` where ``C_i`` is the exclusive prefix sum of ``F + n_j`` and the
first ``F`` units are its overhead. With total cost ``T`` and ``payload`` from
``payload_of`` (at least ``ceil(T / P)``; more for small batches), part ``p`` covers cost ``[p * payload, (p + 1) * payload)``; a cost point ``x`` inside
sequence ``i`` maps to block ``clamp(x - C_i - F, 0, n_i)`` of it. Every part therefore
does at most ``payload`` blocks, and at most ``payload + F`` units of work counting one
overhead per sequence fragment it touches. Each part is computed independently in closed
form (no sequential pass), which is what lets the GPU version run one thread per
sequence.

Format
------
``tile_scheduler_metadata``: int32 ``[num_sm_parts, METADATA_INTS]``, one row per part:

====  ==================  ===========================================================
col   name                meaning
====  ==================  ===========================================================
0     BEGIN_BATCH         first batch index of the part's range
1     BEGIN_BLOCK         first block (64-token) index inside ``BEGIN_BATCH``
2     END_BATCH           last batch index of the range (inclusive)
3     END_BLOCK           block index one past the last block inside ``END_BATCH``
4     BEGIN_SPLIT         split (fragment) number of ``BEGIN_BATCH``'s first fragment
5..7  (reserved, 0)
====  ==================  ===========================================================

A part with nothing to do has ``BEGIN_BATCH > END_BATCH`` (it is written as
``(b, 0, b - 1, 0, 0)``). Batches strictly between ``BEGIN_BATCH`` and ``END_BATCH`` are
covered whole; the fragment of every batch after the first starts at split number 0.

``num_splits``: int32 ``[b + 1]``, the exclusive prefix sum of the number of fragments
of each sequence: sequence ``i`` is cut into ``num_splits[i + 1] - num_splits[i]``
fragments (>= 1), whose partial results live at rows ``num_splits[i] + k`` of the fp32
accumulators (``k`` the fragment number). A sequence with one fragment is written to
the output directly by the decode kernel; the others are merged by the combine kernel. There are at most ``b + num_sm_parts - 1``
fragments in all.
"""

from __future__ import annotations

import math

import torch

BLOCK_SIZE = 64
"""Tokens per page of the paged KV cache, and per KV tile of the kernel."""

ROWS_PER_TILE = 64
"""Query rows (s_q * h_q / h_kv of them per KV head) handled by one CTA: the MMA's M."""

FIXED_OVERHEAD_BLOCKS = 5
"""Cost of one sequence fragment beyond its blocks, in units of one block."""

MIN_PAYLOAD = 2
"""Least cost a part is given: with a batch of one, parts of 2 blocks finished soonest
(an H100, ``benchmarks/plan_probe.py``)."""

SHORT_SEQUENCE_BLOCKS = 2
MIN_PAYLOAD_SHORT = 4
"""Least cost a part is given when the sequences average at most ``SHORT_SEQUENCE_BLOCKS``
blocks: with the first ``FIXED_OVERHEAD_BLOCKS`` units of every sequence being overhead,
such a sequence then lands whole in one part (merging two one-block fragments of a
100-token sequence took 13 us against 10 us for the whole sequence on one CTA)."""

BLOCKS_PER_FRAGMENT_MERGE = 32
"""Merging 32 more fragments of a sequence costs about as much as one more block on a
part's critical path (a lone CTA streams a block in about 1.5 us; the combine kernel
reads 32 fragments of a row at once, with four thread groups of a CTA side by side)."""


def isqrt_ceil(x: int) -> int:
    """``ceil(sqrt(x))`` for ``x >= 0``, exactly."""
    s = math.isqrt(x)
    return s if s * s == x else s + 1


def payload_of(total_cost: int, num_parts: int, batch: int) -> int:
    """Cost per part for a total cost ``T`` of ``b`` sequences:
    ``max(ceil(T / P), ceil(sqrt(ceil(T / (32 b)))), least)``, where ``least`` is
    ``MIN_PAYLOAD``, or ``MIN_PAYLOAD_SHORT`` for short sequences (``T <= (F + 2) b``).

    The first term fills the ``P`` parts. When there is less work than that (small
    batches), a part of payload ``p`` takes about ``p`` blocks and leaves each sequence
    about ``(T / b) / p`` fragments to merge; ``p + (T / b) / (32 p)`` is least at
    ``p = sqrt(T / (32 b))`` (``BLOCKS_PER_FRAGMENT_MERGE``). Measured on an H100,
    b = 1 (``benchmarks/plan_probe.py``): 1024 tokens best at 2, 16384 at 3."""
    per_sequence = -(-total_cost // (BLOCKS_PER_FRAGMENT_MERGE * max(batch, 1)))
    short = total_cost <= (FIXED_OVERHEAD_BLOCKS + SHORT_SEQUENCE_BLOCKS) * batch
    least = MIN_PAYLOAD_SHORT if short else MIN_PAYLOAD
    return max(-(-total_cost // num_parts), isqrt_ceil(per_sequence), least)

DEFAULT_NUM_SMS = 132
"""SM count assumed where there is no GPU to ask (an H100 SXM has 132)."""

METADATA_INTS = 8
BEGIN_BATCH, BEGIN_BLOCK, END_BATCH, END_BLOCK, BEGIN_SPLIT = range(5)


def accumulator_elems(num_acc: int, h_kv: int, rows_per_kv: int, dv: int) -> int:
    """fp32 elements that hold the split fragments' partial results: ``num_acc = b +
    num_parts`` rows of partial outputs ``[h_kv, rows_per_kv, dv]``, then as many rows
    of their log-sum-exps ``[h_kv, rows_per_kv]`` (``kernels/utils.accumulators``
    makes the two views)."""
    return num_acc * h_kv * rows_per_kv * (dv + 1)


def split_workspace_elems(b: int, num_parts: int, h_kv: int, rows_per_kv: int, dv: int) -> int:
    """Size of the decode kernel's split workspace in fp32 elements: the partial results
    of up to ``b + num_parts - 1`` fragments (``accumulator_elems``)."""
    return accumulator_elems(b + num_parts, h_kv, rows_per_kv, dv)


def num_query_tiles(num_heads_per_head_k: int) -> int:
    """Number of 64-row query tiles for ``s_q * h_q / h_kv`` rows per KV head."""
    return -(-num_heads_per_head_k // ROWS_PER_TILE)


def num_sm_parts(num_sms: int, num_heads_per_head_k: int, num_heads_k: int) -> int:
    """How many parts the KV work is cut into: one CTA per (part, KV head, query tile)
    so that one wave fills ``num_sms`` SMs (FlashMLA's rule)."""
    return max(num_sms // num_heads_k // num_query_tiles(num_heads_per_head_k), 1)


def plan_torch(cache_seqlens: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the plan with torch tensor ops on ``cache_seqlens``' device.

    Returns ``(tile_scheduler_metadata, num_splits)`` in the format described in this
    module's docstring. This is the specification of the plan: the GPU kernel in
    ``kernels/metadata.py`` computes the same numbers.
    """
    device = cache_seqlens.device
    seqlens = cache_seqlens.to(torch.int64)
    b = seqlens.numel()
    F = FIXED_OVERHEAD_BLOCKS
    blocks = torch.clamp((seqlens + BLOCK_SIZE - 1) // BLOCK_SIZE, min=1)  # n_i
    cost = blocks + F
    cost_end = torch.cumsum(cost, 0)  # C_i + cost_i
    cost_begin = cost_end - cost  # C_i
    total = int(cost_end[-1]) if b > 0 else 0
    payload = payload_of(total, num_parts, b)

    # Fragments of sequence i: 1 + the multiples of payload in [C_i + F + 1, C_i + F + n_i - 1].
    lo = cost_begin + F
    frags = 1 + torch.div(lo + blocks - 1, payload, rounding_mode="floor") - torch.div(lo, payload, rounding_mode="floor")
    num_splits = torch.zeros(b + 1, dtype=torch.int64, device=device)
    num_splits[1:] = torch.cumsum(frags, 0)

    # Where each part begins: the sequence whose cost interval holds p * payload.
    starts = torch.arange(num_parts + 1, dtype=torch.int64, device=device) * payload
    batch = torch.searchsorted(cost_end, starts, right=True)  # == b past the end
    in_range = batch < b
    bidx = torch.clamp(batch, max=max(b - 1, 0))
    block = torch.where(in_range, torch.clamp(starts - cost_begin[bidx] - F, min=0), torch.zeros_like(starts))
    batch = torch.where(in_range, batch, torch.full_like(batch, b))
    # Fragment number of the first fragment: multiples of payload in [lo_i + 1, p * payload].
    split = torch.where(block > 0, torch.div(starts, payload, rounding_mode="floor") - torch.div(lo[bidx], payload, rounding_mode="floor"), torch.zeros_like(starts))

    # A part ends where the next begins: (i, k > 0) -> (i, k); (i, 0) -> (i - 1, n_{i-1}).
    nb, nk = batch[1:], block[1:]
    prev = torch.clamp(nb - 1, min=0)
    end_batch = torch.where(nk > 0, nb, nb - 1)
    end_block = torch.where(nk > 0, nk, blocks[prev] if b > 0 else torch.zeros_like(nk))

    meta = torch.zeros(num_parts, METADATA_INTS, dtype=torch.int64, device=device)
    meta[:, BEGIN_BATCH] = batch[:-1]
    meta[:, BEGIN_BLOCK] = block[:-1]
    meta[:, END_BATCH] = end_batch
    meta[:, END_BLOCK] = end_block
    meta[:, BEGIN_SPLIT] = split[:-1]
    empty = (batch[:-1] == nb) & (block[:-1] == nk)
    meta[empty] = torch.tensor([b, 0, b - 1, 0, 0, 0, 0, 0], dtype=torch.int64, device=device)
    return meta.to(torch.int32), num_splits.to(torch.int32)
