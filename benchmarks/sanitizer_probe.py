"""Two minimal kernels with the barrier patterns the decode kernel's two consumer
warpgroups use, to tell what compute-sanitizer reports for the patterns alone:

- ``python benchmarks/sanitizer_probe.py sync``, for ``--tool synccheck``: both
  warpgroups wait on one named barrier (``bar.sync id, 256``), each from its own code
  (the decode kernel's consumers are two specializations of one function, so every
  barrier they share is reached from two places);
- ``python benchmarks/sanitizer_probe.py race``, for ``--tool racecheck``: warpgroup 1
  writes shared memory and arrives on a named barrier (``bar.arrive``); warpgroup 0
  waits on it (``bar.sync``) and reads. Then the other way round for the next round:
  warpgroup 0 reads, arrives; warpgroup 1 waits and overwrites. PTX's memory model
  orders both (a ``bar.arrive`` synchronizes with the ``bar.sync`` of the same barrier
  phase).

Each prints the values it read, so a wrong order would also show as a wrong number.
"""

import sys

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32, pipeline
from cutlass.cute.runtime import from_dlpack

ROUNDS = 4


class BarrierProbe:
    def __init__(self, pattern: str):
        self.pattern = pattern

    @cute.jit
    def __call__(self, mOut: cute.Tensor):
        self.kernel(mOut).launch(grid=[1, 1, 1], block=[256, 1, 1])

    @cute.kernel
    def kernel(self, mOut: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()

        @cute.struct
        class Storage:
            cells: cute.struct.MemRange[Float32, 128]

        storage = cutlass.utils.SmemAllocator().allocate(Storage)
        cells = storage.cells.get_tensor(cute.make_layout((128,)))
        lane = tidx % 128
        both = pipeline.NamedBarrier(barrier_id=1, num_threads=256)
        written = pipeline.NamedBarrier(barrier_id=2, num_threads=256)
        read = pipeline.NamedBarrier(barrier_id=3, num_threads=256)
        total = Float32(0.0)
        if tidx < 128:
            if cutlass.const_expr(self.pattern == "sync"):
                total = total + Float32(1.0)
                both.arrive_and_wait()
            else:
                for r in cutlass.range(ROUNDS, unroll=1):
                    written.arrive_and_wait()  # warpgroup 1's values are there
                    total = total + cells[lane]
                    if r < ROUNDS - 1:
                        read.arrive()  # warpgroup 1 may overwrite them
        else:
            if cutlass.const_expr(self.pattern == "sync"):
                total = total + Float32(2.0)
                both.arrive_and_wait()
            else:
                for r in cutlass.range(ROUNDS, unroll=1):
                    if r > 0:
                        read.arrive_and_wait()  # warpgroup 0 is done with the last values
                    cells[lane] = Float32(r + 1) + Float32(lane)
                    written.arrive()
        mOut[tidx] = total


def main():
    pattern = sys.argv[1] if len(sys.argv) > 1 else "sync"
    out = torch.zeros(256, dtype=torch.float32, device="cuda")
    fn = cute.compile(BarrierProbe(pattern), from_dlpack(out))
    fn(from_dlpack(out))
    torch.cuda.synchronize()
    if pattern == "race":
        lane = torch.arange(128, dtype=torch.float32)
        expected = sum(r + 1 for r in range(ROUNDS)) + ROUNDS * lane
        ok = torch.equal(out[:128].cpu(), expected)
        print(f"race probe: warpgroup 0 read {'the expected values' if ok else 'WRONG values'}")
    else:
        print(f"sync probe: {out[:2].tolist()} ... {out[-2:].tolist()}")


if __name__ == "__main__":
    main()
