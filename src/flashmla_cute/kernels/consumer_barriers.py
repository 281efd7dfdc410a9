"""The named barriers the decode kernel's two consumer warpgroups share (0 is the CTA's
``__syncthreads``). Each pair barrier counts both warpgroups (256 threads): in the
row-statistics exchanges one side arrives and the other waits; the row sums make both
wait."""

from __future__ import annotations

from dataclasses import dataclass

from cutlass import pipeline

from .utils import WARPGROUP_THREADS

CONSUMER_THREADS = 2 * WARPGROUP_THREADS  # the two consumer warpgroups

LEFT_STATS = 1  # left -> right: m0, s0 and P0 are in shared memory
RIGHT_STATS = 2  # right -> left: m1 and s1 are in shared memory
SUMS = 3  # both: a batch's row sums
WARPGROUP_BASE = 4  # + consumer index: one consumer warpgroup alone
P1_SHARED = 6  # right -> left: P1 is in shared memory (after RIGHT_STATS)


@dataclass(frozen=True)  # frozen: the DSL's loops read it without carrying it
class ConsumerBarriers:
    mine: pipeline.NamedBarrier  # this consumer warpgroup alone
    left_stats: pipeline.NamedBarrier
    right_stats: pipeline.NamedBarrier
    p1_shared: pipeline.NamedBarrier
    sums: pipeline.NamedBarrier

    @staticmethod
    def create(consumer: int) -> "ConsumerBarriers":
        """The barriers as consumer ``consumer`` (0 left, 1 right) uses them."""
        return ConsumerBarriers(
            mine=pipeline.NamedBarrier(barrier_id=WARPGROUP_BASE + consumer, num_threads=WARPGROUP_THREADS),
            left_stats=pipeline.NamedBarrier(barrier_id=LEFT_STATS, num_threads=CONSUMER_THREADS),
            right_stats=pipeline.NamedBarrier(barrier_id=RIGHT_STATS, num_threads=CONSUMER_THREADS),
            p1_shared=pipeline.NamedBarrier(barrier_id=P1_SHARED, num_threads=CONSUMER_THREADS),
            sums=pipeline.NamedBarrier(barrier_id=SUMS, num_threads=CONSUMER_THREADS),
        )
