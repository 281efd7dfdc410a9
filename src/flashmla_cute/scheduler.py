"""Split-KV work plan: which SM part decodes which (batch, kv-block) range.

All the decode work of one KV head and one 64-row query tile is the ordered list of
(batch, block) pairs, batch-major, where sequence ``i`` has
``n_i = max(ceil(seqlen_i / 64), 1)`` blocks (a sequence of length 0 still gets one
block slot, so that some CTA writes its output). The plan cuts that list into
``num_sm_parts`` contiguous ranges of balanced cost; the decode kernel launches one CTA
per (part, KV head, query tile) and each CTA walks its range.

Cost model
----------
A block costs 1 and every sequence fragment costs ``FIXED_OVERHEAD_BLOCKS`` (F) more (its
Q load, epilogue and, when split, its merge). With total cost ``T = sum(n_i + F)``,
``payload`` from ``payload_of`` (at least ``ceil(T / P)``; more for small batches) and
the budget ``payload + F`` a part, the plan is the first of three that fits the ``P``
parts: a balanced plan, a packed plan (both below), else the walk:

- the parts are filled in order, each from where the previous one stopped;
- a part takes the rest of the current sequence and then whole sequences while each,
  with its F, fits in what is left of its budget;
- then, if more than F is left, it takes that many blocks minus F of the next sequence
  (which is split there), else it stops at the sequence boundary;
- the last part takes whatever is left.

So a part that starts a sequence and can hold it whole never splits it (FlashMLA's
rule, and its whole plan). Every part of the walk does at most ``payload`` blocks, and at most
``payload + F`` units counting one F per fragment it touches: the last one too, since
each part before it ends with a split or less than F of its budget unused, so together
they leave at most ``T - (P - 1) payload <= payload`` units of T to it. A part's whole
sequences are found with prefix sums of the sequences' costs, so the GPU version plans a
part in one or two warp-wide steps.

Balanced plans
--------------
Where there are parts enough: if cutting every sequence into
``k_i = ceil(n_i / m)`` fragments needs no more than ``P`` parts for ``m = payload`` (or,
failing that, ``payload + BALANCED_SLACK_BLOCKS``), each sequence is cut into ``k_i``
fragments of nearly equal size (``n_i // k_i``, the first ``n_i % k_i`` of them one block
more), one a part, in order; the parts past them stay empty. The decode kernel takes a
part's blocks two at a time, so the walk's cut of a sequence of 16 blocks at a payload
of 5 (5 + 5 + 5 + 1: three pairs on the longest part) costs a pair more than 4 + 4 + 4 + 4;
and where the walk's parts hold pieces of two or three sequences, one fragment of ``m``
blocks a part is shorter (``benchmarks/NOTES.md``, "A part's blocks in pairs"). Such a
part does at most ``m`` blocks.

Packed plans
------------
Where the balanced plan does not fit, the parts may still hold every sequence whole:
filled in order, each takes whole sequences while their costs fit its budget and one
more ``F`` (what a split would have cost it anyway). If that needs no more than ``P``
parts, the plan is that, and nothing is merged: b = 128 sequences of 8192 tokens on 66
parts go two a part (256 blocks) instead of the walk's parts of 252 blocks over three
fragments, 62 sequences split, 3% faster on an H100 (``benchmarks/NOTES.md``, "Whole
sequences packed"). Such a part costs at most ``payload + 2 F`` units. Packing is tried
only for batches of at most ``PACKED_MAX_BATCH`` sequences.

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
fragments (>= 1), whose partial results live at rows ``num_splits[i] + k`` of the
accumulators (``k`` the fragment number). A sequence with one fragment is written to
the output directly by the decode kernel; the others are merged by the combine kernel.
There are at most ``b + num_sm_parts - 1`` fragments in all: a part splits at most one
sequence.
"""

from __future__ import annotations

import bisect
import itertools
import math

import torch

BLOCK_SIZE = 64
"""Tokens per page of the paged KV cache, and per KV tile of the kernel."""

ROWS_PER_TILE = 64
"""Query rows (s_q * h_q / h_kv of them per KV head) handled by one CTA: the MMA's M."""

FIXED_OVERHEAD_BLOCKS = 4
"""Cost of one sequence fragment beyond its blocks, in units of one block. FlashMLA's
planner charges 5; on an H100, 4 was 6.5% faster at b = 32, 1024 tokens, h_q 128 (more
parts used, one block less on the longest) and 1-2% on some b = 128 h_q 128 cases, the
rest level (``benchmarks/NOTES.md``)."""

MIN_PAYLOAD = 2
"""Least cost a part is given: with a batch of one, parts of 2 blocks finished soonest
(an H100, ``benchmarks/plan_probe.py``)."""

SHORT_SEQUENCE_BLOCKS = 2
MIN_PAYLOAD_SHORT = 4
"""Least cost a part is given when the sequences average at most ``SHORT_SEQUENCE_BLOCKS``
blocks: with the first ``FIXED_OVERHEAD_BLOCKS`` units of every sequence being overhead,
such a sequence then lands whole in one part (merging two one-block fragments of a
100-token sequence took 13 us against 10 us for the whole sequence on one CTA)."""

BALANCED_SLACK_BLOCKS = 1
"""How many blocks a balanced plan's fragments may exceed ``payload`` by, where that
saves the walk: b = 32 sequences of 16384 tokens on 66 parts (payload 127) then go in
two fragments of 128 blocks, one a part, instead of parts of 127 blocks over two or
three fragments (2% faster on an H100, ``benchmarks/NOTES.md``)."""

PACKED_MAX_BATCH = 256
"""Most sequences a packed plan is tried for. It paid where it was measured (b = 128 on
33-66 parts, 3% on an H100); with hundreds of sequences the walk splits at most one a
part, few of them, and the packed attempt, which walks the parts once before the walk
does, doubled the planner's time at b >= 512 (``benchmarks/NOTES.md``, "The plan's own
time")."""

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


PARTIAL_VALUE_BYTES = 2
"""Bytes of one value of a split fragment's partial output: partials are stored in the
output's 16-bit dtype (bf16 or fp16), their log-sum-exps in fp32. The partials' bytes,
written by the decode kernel and read back by the merge, are what a split call pays for
splitting; at 16 bits they are half of fp32's, for a second rounding of each partial
(benchmarks/NOTES.md, "Partials in the output's dtype")."""


def accumulator_elems(num_acc: int, h_kv: int, rows_per_kv: int, dv: int) -> int:
    """fp32 elements that hold the split fragments' partial results: ``num_acc = b +
    num_parts`` rows of partial outputs ``[h_kv, rows_per_kv, dv]`` of
    ``PARTIAL_VALUE_BYTES`` each, then as many rows of their fp32 log-sum-exps ``[h_kv,
    rows_per_kv]`` (``kernels/utils.accumulators`` makes the two views)."""
    return num_acc * h_kv * rows_per_kv * (dv * PARTIAL_VALUE_BYTES // 4 + 1)


MAX_PARTIAL_VALUES = 2**31 - 1
"""The most partial output values a split workspace may hold: the kernels index the
partials (``kernels/utils.accumulators``) with 32-bit integers."""


def partial_values(num_acc: int, h_kv: int, rows_per_kv: int, dv: int) -> int:
    """The partial output values of ``num_acc`` rows of accumulators (``accumulator_elems``):
    what the kernels index, at most ``MAX_PARTIAL_VALUES``."""
    return num_acc * h_kv * rows_per_kv * dv


def split_workspace_values(b: int, num_parts: int, h_kv: int, rows_per_kv: int, dv: int) -> int:
    """The partial output values of the decode kernel's split workspace (``partial_values``
    of its ``b + num_parts`` rows)."""
    return partial_values(b + num_parts, h_kv, rows_per_kv, dv)


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


def empty_rows(b: int, num_parts: int) -> list[list[int]]:
    """A plan's rows for ``b`` sequences with every one of ``num_parts`` parts empty."""
    return [[b, 0, b - 1, 0, 0, 0, 0, 0] for _ in range(num_parts)]


def balanced_fragments(blocks: list[int], largest: int) -> list[int]:
    """Each sequence's fragment count in a balanced plan of largest fragment ``largest``:
    ``ceil(n_i / largest)``."""
    return [-(-n // largest) for n in blocks]


def balanced_fragment_blocks(blocks: list[int], num_parts: int, payload: int) -> int:
    """The largest fragment ``m`` of the balanced plan (the module's docstring), or 0
    where there is none: the least ``m`` in ``payload .. payload + BALANCED_SLACK_BLOCKS``
    for which ``sum(ceil(n_i / m))`` fragments fit in ``num_parts`` parts. None does with
    more sequences than parts (each needs a fragment), which is decided without a count."""
    if len(blocks) > num_parts:
        return 0
    for m in range(payload, payload + BALANCED_SLACK_BLOCKS + 1):
        if sum(balanced_fragments(blocks, m)) <= num_parts:
            return m
    return 0


def fragment_blocks(n: int, k: int, j: int) -> tuple[int, int]:
    """(first block, one past the last) of fragment ``j`` of a sequence of ``n`` blocks
    cut into ``k`` nearly equal fragments: ``n // k`` blocks each, the first ``n % k``
    one more."""
    size, extra = divmod(n, k)
    begin = j * size + min(j, extra)
    return begin, begin + size + (1 if j < extra else 0)


def plan_blocks(seqlens) -> list[int]:
    """``n_i``: the blocks each sequence of ``seqlens`` (lengths) counts for in the plan;
    an empty sequence counts for one (its fragment, with nothing to load)."""
    return [max(-(-int(x) // BLOCK_SIZE), 1) for x in seqlens]


def part_fragments(row, blocks: list[int]) -> list[tuple[int, int, int]]:
    """The fragments of one part's plan ``row``, in order, as (batch, first block, one
    past the last block), for sequences of ``plan_blocks`` ``blocks``: the rest of the
    first batch from ``BEGIN_BLOCK``, the batches in between whole, the last one up to
    ``END_BLOCK``. An empty part has none."""
    bb, bk, eb, ek = (int(row[c]) for c in (BEGIN_BATCH, BEGIN_BLOCK, END_BATCH, END_BLOCK))
    if bb > eb:
        return []
    if bb == eb:
        return [(bb, bk, ek)]
    return [(bb, bk, blocks[bb])] + [(i, 0, blocks[i]) for i in range(bb + 1, eb)] + [(eb, 0, ek)]


def plan_torch(cache_seqlens: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the plan on the host from ``cache_seqlens`` (a CUDA tensor is copied to
    the host); the results are on ``cache_seqlens``' device.

    Returns ``(tile_scheduler_metadata, num_splits)`` in the format described in this
    module's docstring. This is the specification of the plan: the GPU kernel in
    ``kernels/metadata.py`` computes the same numbers.
    """
    blocks = plan_blocks(cache_seqlens.tolist())  # n_i
    b = len(blocks)
    total = sum(blocks) + FIXED_OVERHEAD_BLOCKS * b
    payload = payload_of(total, num_parts, b)
    meta = empty_rows(b, num_parts)
    budget = payload + FIXED_OVERHEAD_BLOCKS
    largest = balanced_fragment_blocks(blocks, num_parts, payload)
    fragments = None
    if largest:
        fragments = balanced_parts(blocks, largest, meta)
    elif b <= PACKED_MAX_BATCH:
        fragments = packed_parts(blocks, budget, meta)
    if fragments is None:
        fragments = walked_parts(blocks, total, budget, meta)
    num_splits = [0] + list(itertools.accumulate(fragments))
    device = cache_seqlens.device
    return (torch.tensor(meta, dtype=torch.int32, device=device).reshape(num_parts, METADATA_INTS),
            torch.tensor(num_splits, dtype=torch.int32, device=device))


def balanced_parts(blocks: list[int], largest: int, meta: list[list[int]]) -> list[int]:
    """The balanced plan's rows into ``meta``; returns each sequence's fragment count."""
    fragments = balanced_fragments(blocks, largest)
    p = 0
    for i, (n, k) in enumerate(zip(blocks, fragments)):
        for j in range(k):
            begin, end = fragment_blocks(n, k, j)
            meta[p][:BEGIN_SPLIT + 1] = [i, begin, i, end, j]
            p += 1
    return fragments


def packed_parts(blocks: list[int], budget: int, meta: list[list[int]]) -> list[int] | None:
    """The packed plan's rows into ``meta``; returns each sequence's fragment count (one),
    or None, leaving ``meta`` as it was, where it needs more parts than ``meta`` has or a
    sequence does not fit an empty part."""
    limit = budget + FIXED_OVERHEAD_BLOCKS
    rows = []
    batch = 0
    while batch < len(blocks):
        cost, end = 0, batch
        while end < len(blocks) and cost + blocks[end] + FIXED_OVERHEAD_BLOCKS <= limit:
            cost += blocks[end] + FIXED_OVERHEAD_BLOCKS
            end += 1
        if end == batch or len(rows) == len(meta):
            return None
        rows.append([batch, 0, end - 1, blocks[end - 1], 0, 0, 0, 0])
        batch = end
    meta[:len(rows)] = rows
    return [1] * len(blocks)


def walked_parts(blocks: list[int], total: int, budget: int, meta: list[list[int]]) -> list[int]:
    """The walk's rows into ``meta`` (parts filled in order, ``budget`` each, the last
    the rest); returns each sequence's fragment count."""
    b, num_parts, F = len(blocks), len(meta), FIXED_OVERHEAD_BLOCKS
    cost_end = list(itertools.accumulate(n + F for n in blocks))  # C_i + n_i + F
    fragments = [0] * b
    batch, block = 0, 0  # where the next part begins
    for p in range(num_parts):
        if batch == b:
            break
        row = meta[p]
        row[BEGIN_BATCH], row[BEGIN_BLOCK], row[BEGIN_SPLIT] = batch, block, fragments[batch]
        left = budget if p < num_parts - 1 else total + F  # the last part takes the rest
        # The rest of the current sequence, then whole sequences, while they fit: the
        # costs from here are prefix sums of cost_end, offset by the blocks already done.
        done_before = (cost_end[batch - 1] if batch > 0 else 0) + block
        whole_end = bisect.bisect_right(cost_end, done_before + left, lo=batch)
        for i in range(batch, whole_end):
            fragments[i] += 1
        if whole_end > batch:
            left -= cost_end[whole_end - 1] - done_before
            batch, block = whole_end, 0
        row[END_BATCH], row[END_BLOCK] = batch - 1, blocks[batch - 1] if batch > 0 else 0
        if batch < b and left > F:
            # Split the next sequence after ``left - F`` of its blocks.
            block += left - F
            fragments[batch] += 1
            row[END_BATCH], row[END_BLOCK] = batch, block
    return fragments
