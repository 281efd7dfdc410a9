"""The ring of K tiles in shared memory, with barriers per group of 64-column chunks
(the decode kernel loads Q through a ring of one stage with the same groups).

A stage holds one 64-token block of K (V is its first 512 columns), loaded by one TMA
copy per 64-column chunk (a 128-byte swizzle atom). The chunks are cut into groups, and
each group of each stage has its own pair of mbarriers ("full": its copies landed;
"empty": both consumers are done with it):

- ``S = Q K^T`` issues a chunk's k-steps as soon as that chunk's group has landed;
- the consumers release groups (the left consumer's value columns, the right one's, the
  rope chunk) as soon as they are done with them, and the producer refills a group as
  soon as it is free.

With one chunk per group, the first MMAs of a block start after 8 KB have arrived
(FlashMLA's 2025-04 kernel waits per chunk: "fine-grained TMA copy - GEMM pipelining" in
its deep-dive); with the left consumer's value columns and the rest as two groups, there
are fewer barrier operations per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass.cute as cute
from cutlass import pipeline

NUM_STAGES = 2  # K tiles in flight (Q and two stages fill the shared memory)
BARRIERS_PER_PIPELINE_STAGE = 2  # full and empty


@dataclass(frozen=True)  # frozen: the DSL's loops read it without carrying it
class KvStages:
    """The K ring of one CTA: one pipeline of ``NUM_STAGES`` stages per chunk group.

    ``chunks`` arguments are Python ranges (compile-time). ``wait`` waits for every
    group that holds one of them; ``release`` must name whole groups (each group is
    released once per block by every consumer warp). A ``pipeline.PipelineState`` names
    the stage and phase, the same for every group of a block.
    """

    groups: tuple  # (first chunk, one past the last) of each group, in order
    pipes: tuple
    num_stages: int

    @staticmethod
    def barrier_count(groups: tuple, num_stages: int = NUM_STAGES) -> int:
        """Int64 mbarriers the ring needs in shared memory."""
        return len(groups) * num_stages * BARRIERS_PER_PIPELINE_STAGE

    @staticmethod
    def create(barrier_storage, groups: tuple, chunk_bytes: int, consumer_group,
               num_stages: int = NUM_STAGES) -> "KvStages":
        """The ring over ``barrier_count(groups, num_stages)`` mbarriers at
        ``barrier_storage`` (initialized here; the caller fences and synchronizes before
        first use). The decode kernel's Q is a ring of one stage with the K ring's
        groups, so that S starts on Q's first chunks too."""
        pipes = tuple(
            pipeline.PipelineTmaAsync.create(
                num_stages=num_stages,
                producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1),
                consumer_group=consumer_group,
                tx_count=(end - begin) * chunk_bytes,
                barrier_storage=barrier_storage + g * num_stages * BARRIERS_PER_PIPELINE_STAGE,
                defer_sync=True,
            )
            for g, (begin, end) in enumerate(groups)
        )
        return KvStages(groups, pipes, num_stages)

    # The methods hold no data-dependent control flow: plain Python, traced inline.
    def _groups_of(self, chunks: range) -> list:
        return [g for g, (begin, end) in enumerate(self.groups) if begin < chunks.stop and chunks.start < end]

    def wait(self, state: pipeline.PipelineState, chunks: range):
        """Consumer: wait until ``chunks`` of the stage have landed."""
        for g in self._groups_of(chunks):
            self.pipes[g].consumer_wait(state)

    def group_starts(self) -> tuple:
        """The first chunk of each group: where a reader taking the chunks in order waits."""
        return tuple(begin for begin, _ in self.groups)

    def _whole_groups(self, chunks: range) -> list:
        groups = self._groups_of(chunks)
        assert all(chunks.start <= self.groups[g][0] and self.groups[g][1] <= chunks.stop for g in groups), (
            f"chunks {chunks} do not cover whole groups of {self.groups}"
        )
        return groups

    def release(self, state: pipeline.PipelineState, chunks: range):
        """Consumer: this warp is done with ``chunks`` (whole groups) of the stage."""
        for g in self._whole_groups(chunks):
            self.pipes[g].consumer_release(state)

    def load(self, state: pipeline.PipelineState, tma_atom, src: cute.Tensor, dst: cute.Tensor, cache_policy,
             chunks: range):
        """Producer: copy chunk ``c`` of ``src`` (``(TMA, chunk)``) into chunk ``c`` of
        ``dst`` (``(TMA, chunk)``, the stage's) with ``tma_atom`` (and the L2
        ``cache_policy``, None for the default) for the groups of ``chunks`` (whole
        groups), each group as soon as it is free."""
        for g in self._whole_groups(chunks):
            begin, end = self.groups[g]
            self.pipes[g].producer_acquire(state)
            for c in range(begin, end):
                cute.copy(tma_atom, src[None, c], dst[None, c], tma_bar_ptr=self.pipes[g].producer_get_barrier(state),
                          cache_policy=cache_policy)
