"""How many CTAs share one query token's top-k in the sparse decode kernel.

The kernel's work is ``jobs = b * s_q * ceil(h_q / 64)`` query-token tiles of ``steps =
ceil(topk / 64)`` steps each, and a CTA fills an SM. Cutting each job into ``k``
fragments gives ``jobs * k`` CTAs of ``ceil(steps / k)`` steps and a fixed cost each
(``CTA_COST_STEPS``: loading Q, writing the result), which run in ``ceil(jobs * k /
num_sms)`` waves; split jobs also cost a merge (the combine kernel): a fixed part and one
proportional to the partials written and read. ``topk_splits`` picks the ``k`` that
finishes soonest under that model. It depends on shapes only, so a plan needs no look at
the indices and no host synchronization (CUDA graphs replay it as it is).
"""

from __future__ import annotations

import functools

HEAD_TILE = 64
"""Query heads per CTA (the WGMMA's M); fewer heads are padded."""

STEP_TOKENS = 64
"""Indices a CTA takes per step (the WGMMA's N of the scores)."""

CTA_COST_STEPS = 1.0
"""A CTA's cost besides its steps, in steps (a step is about 4 us on an H100)."""

MERGE_COST_STEPS = 2.0
"""The combine kernel's fixed cost, in steps."""

MERGE_STEPS_PER_FRAGMENT = 1 / 32
"""The combine kernel's cost per fragment, in steps: a fragment's 64 x 512 fp32 partial
(128 KB) written and read again, at about 3 TB/s over the whole GPU."""


def num_jobs(b: int, s_q: int, h_q: int) -> int:
    """Query-token tiles of a call: ``b * s_q * ceil(h_q / HEAD_TILE)``."""
    return b * s_q * -(-h_q // HEAD_TILE)


@functools.lru_cache(maxsize=1024)
def topk_splits(jobs: int, topk: int, num_sms: int) -> int:
    """Fragments per query-token tile: the ``k`` in ``1 .. steps`` with the least
    modelled time (see the module docstring), the smallest on ties."""
    steps = max(-(-topk // STEP_TOKENS), 1)
    jobs = max(jobs, 1)

    def cost(k: int) -> float:
        waves = -(-jobs * k // num_sms)
        merge = MERGE_COST_STEPS + jobs * k * MERGE_STEPS_PER_FRAGMENT if k > 1 else 0.0
        return waves * (-(-steps // k) + CTA_COST_STEPS) + merge

    return min(range(1, steps + 1), key=lambda k: (cost(k), k))
