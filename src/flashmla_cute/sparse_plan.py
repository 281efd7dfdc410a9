"""How the sparse decode kernel's work is cut over SMs, from shapes alone.

The work is ``jobs = b * s_q * ceil(h_q / 64)`` query-token tiles of ``steps = ceil(topk /
64)`` steps each, and a CTA fills an SM. A plan keeps the first ``whole_batches``
sequences' tiles whole (one CTA each, ``steps`` steps) and cuts every tile of the other
sequences into ``splits`` fragments of ``ceil(steps / splits)`` steps, whose partial
results the combine kernel merges. The kernel launches the whole tiles' CTAs first, so
the short ones fill the SMs that the last wave of long ones leaves idle.

``plan_splits`` picks the plan that finishes soonest under a simple model: a CTA costs its
steps plus ``CTA_COST_STEPS``; CTAs run ``num_sms`` at a time, the long ones first; split
sequences add the merge, a fixed part and one proportional to the partials written and
read. Plans depend on shapes only, so they need no look at the indices and no host
synchronization (CUDA graphs replay them as they are).

The kernels index the split workspace with 32-bit integers, so a split plan whose
partials would pass ``scheduler.MAX_PARTIAL_VALUES`` is no candidate
(``SparsePlan.workspace_values``). A split plan has more than ``b`` fragments, each with
``s_q * h_q`` rows of 512 values (the whole sequences' slots, unused, included): at s_q 4
and h_q 128, 8191 fragments fit, so from b = 8191 on every tile is kept whole. That plan
writes no partials, so the sparse checks refuse no shape for the workspace, whatever the
SM count (the dense checks refuse such batches: the dense workspace is sized by the
caller's plan).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from . import scheduler
from .fp8_cache import VALUE_DIM

HEAD_TILE = 64
"""Query heads per CTA (the WGMMA's M); fewer heads are padded."""

STEP_TOKENS = 64
"""Indices a CTA takes per step (the WGMMA's N of the scores)."""

CTA_COST_STEPS = 1.0
"""A CTA's cost besides its steps, in steps (a step is about 4 us on an H100)."""

MERGE_COST_STEPS = 2.0
"""The combine kernel's fixed cost, in steps."""

MERGE_STEPS_PER_FRAGMENT = 1 / 32
"""The combine kernel's cost per fragment, in steps: a fragment's 64 x 512 partial
written and read again, at about 3 TB/s over the whole GPU. Measured with fp32 partials
(128 KB); the 16-bit ones (``scheduler.PARTIAL_VALUE_BYTES``) take half, and the plans
were left as measured."""

MAX_SPLITS = 64
"""The most fragments a tile is cut into."""


class SparsePlan(NamedTuple):
    """The first ``whole_batches`` sequences whole, the others' tiles in ``splits`` fragments."""

    whole_batches: int
    splits: int

    def num_fragments(self, b: int) -> int:
        """Fragments of partial results per (query token, head tile) slot of the workspace."""
        return self.whole_batches + (b - self.whole_batches) * self.splits

    def workspace_fragments(self, b: int) -> int:
        """Fragments the split workspace holds: all of them where tiles are split, else
        one (the kernel then writes no partial, but takes a workspace all the same)."""
        return self.num_fragments(b) if self.splits > 1 else 1

    def workspace_values(self, b: int, s_q: int, h_q: int) -> int:
        """Partial output values of the split workspace (``scheduler.partial_values``):
        a fragment's ``s_q * h_q`` rows of 512, one KV head's (``utils.accumulators``)."""
        return scheduler.partial_values(self.workspace_fragments(b), 1, s_q * h_q, VALUE_DIM)

    def workspace_elems(self, b: int, s_q: int, h_q: int) -> int:
        """The split workspace's size in fp32 elements (``scheduler.accumulator_elems``)."""
        return scheduler.accumulator_elems(self.workspace_fragments(b), 1, s_q * h_q, VALUE_DIM)

    def fragment_offsets(self, b: int) -> list[int]:
        """``num_splits`` of the combine kernel: sequence ``i``'s fragments start at
        entry ``i`` (a whole sequence has one, written to the output directly)."""
        w, k = self.whole_batches, self.splits
        return [i if i <= w else w + (i - w) * k for i in range(b + 1)]


def jobs_per_batch(s_q: int, h_q: int) -> int:
    """Query-token tiles of one sequence: ``s_q * ceil(h_q / HEAD_TILE)``."""
    return s_q * -(-h_q // HEAD_TILE)


def modelled_time(plan: SparsePlan, b: int, jobs: int, steps: int, num_sms: int) -> float:
    """The plan's time in steps under the module's model (``jobs`` tiles per sequence)."""
    long_ctas = plan.whole_batches * jobs
    long_cost = steps + CTA_COST_STEPS
    short_ctas = (b - plan.whole_batches) * jobs * plan.splits
    short_cost = -(-steps // plan.splits) + CTA_COST_STEPS
    full_waves, left = divmod(long_ctas, num_sms)
    time = full_waves * long_cost
    if short_ctas == 0:
        return time + (long_cost if left else 0.0)
    # The last long CTAs and the short ones share the SMs; the short ones pack in
    # units of their length.
    rest = (left * long_cost + short_ctas * short_cost) / num_sms
    tail = -(-rest // short_cost) * short_cost
    if left:
        tail = max(tail, long_cost)
    merge = MERGE_COST_STEPS + short_ctas * MERGE_STEPS_PER_FRAGMENT if plan.splits > 1 else 0.0
    return time + tail + merge


@functools.lru_cache(maxsize=1024)
def plan_splits(b: int, s_q: int, h_q: int, topk: int, num_sms: int) -> SparsePlan:
    """The plan with the least modelled time; on ties, fewer splits, then more whole
    sequences. Whole-sequence counts tried: all, none, and those that fill whole waves;
    split plans only where the kernels can index their partials (the module's docstring)."""
    jobs = jobs_per_batch(s_q, h_q)
    steps = max(-(-topk // STEP_TOKENS), 1)
    wholes = {0, b} | {min(m * num_sms // jobs, b) for m in range(1, b * jobs // num_sms + 1)}
    split_plans = (SparsePlan(w, k) for w in sorted(wholes) if w < b for k in range(2, min(steps, MAX_SPLITS) + 1))
    candidates = [SparsePlan(b, 1)] + [
        p for p in split_plans if p.workspace_values(b, s_q, h_q) <= scheduler.MAX_PARTIAL_VALUES
    ]
    return min(candidates, key=lambda p: (modelled_time(p, b, jobs, steps, num_sms), p.splits, -p.whole_batches))
