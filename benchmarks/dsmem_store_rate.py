"""How fast an SM can store into shared memory: its own (``st.shared.v4``) against the
other CTA's of a cluster of two, by ``st.shared::cluster.v4`` (distributed shared memory),
by ``st.async`` (counted on the peer's mbarrier, as FlashMLA's crossover stores), or by
bulk copies of its own shared memory into the peer's (``cp.async.bulk.shared::cluster``,
the copy engine's path: no thread's stores, so the SM's load/store pipeline stays free).

    python benchmarks/dsmem_store_rate.py
    python benchmarks/dsmem_store_rate.py --compile-only   # no GPU needed

A sparse kernel that shares dequantized K tiles between the two head tiles of a query
token (FlashMLA's "crossover") sends half of each tile to the other CTA; this rate says
how much of a step those stores need at the least. Each CTA (256 threads, one an SM,
four waves) stores 16 bytes a thread per round into a 64 KB buffer; both CTAs of a
cluster store at once, as in the crossover; the ``st.async`` rounds come in phases of
``PHASE_ROUNDS``, each waited for on the receiving CTA's mbarrier (its transaction count
holds under 1 MB) and closed by a cluster barrier. Rates are per SM, from CUDA-event
medians.

A bulk round is one 4 KB copy (a round's bytes), issued by the CTA's first thread; its
patterns are not stores' and it runs once (``patterns_of``). Each store pattern is run
three ways (``PATTERNS``): a warp's 32 stores side by side (512 contiguous bytes); a
thread's 16 bytes every 32 bytes (each 32-byte sector half written by one instruction,
as the sparse pair kernel's gatherer first wrote its K tiles' swizzled rows); and four
threads' 64 bytes every 128 (each 128-byte line half written, as the gatherer's 8 rows
of a store instruction were while its threads stored into the peer), to tell whether the
path between SMs moves whole sectors, or whole lines.
"""

import os
import sys

import torch

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr
from cutlass._mlir import ir
from cutlass._mlir.dialects import llvm, vector
from cutlass.cutlass_dsl import T

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from flashmla_cute.kernels import dsmem  # noqa: E402

THREADS = 256
BUFFER_WORDS = 16384  # 64 KB of int32
VECTOR_WORDS = 4  # 16 bytes a store
WAVES = 4
SHARED_ADDRESS_SPACE = 3
PHASE_ROUNDS = 128  # st.async rounds counted on one mbarrier phase: 512 KB
ROUND_BYTES = THREADS * VECTOR_WORDS * 4  # 4 KB: what a round of every thread's stores moves
OWN, PEER, PEER_ASYNC, PEER_BULK = "own", "peer", "peer st.async", "peer bulk copy"
# (name, contiguous 16-byte vectors a run, runs spaced by this many run lengths)
PATTERNS = (("512 B", 1, 1), ("16 B / 32", 1, 2), ("64 B / 128", 4, 2))
TARGETS = (OWN, PEER, PEER_ASYNC, PEER_BULK)


def patterns_of(target: str) -> tuple:
    """The store patterns run for ``target``: all of them, or for bulk copies (whose
    bytes no thread stores) the first alone."""
    return PATTERNS[:1] if target == PEER_BULK else PATTERNS


class StoreRate:
    """Rounds of 16-byte stores into this CTA's shared memory (``OWN``) or the cluster
    peer's (``PEER``, ``PEER_ASYNC``)."""

    def __init__(self, target: str, run: int, spread: int):
        self.to_peer = target != OWN
        self.by_async = target == PEER_ASYNC
        self.by_bulk = target == PEER_BULK
        self.run = run  # threads whose 16-byte vectors lie side by side
        self.spread = spread  # such runs every ``spread`` run lengths

    @cute.jit
    def __call__(self, out: cute.Tensor, rounds: Int32, ctas: Int32, stream):
        @cute.struct
        class Storage:
            landed: cute.struct.MemRange[cutlass.Int64, 1]  # the peer's st.async bytes of a phase
            buffer: cute.struct.Align[cute.struct.MemRange[Int32, BUFFER_WORDS], 128]

        self.storage = Storage
        self.kernel(out, rounds).launch(grid=[ctas, 1, 1], block=[THREADS, 1, 1], cluster=[2, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, out: cute.Tensor, rounds: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        cta, _, _ = cute.arch.block_idx()
        storage = cutlass.memory.SmemAllocator().allocate(self.storage)
        buffer = storage.buffer.get_tensor(cute.make_layout(BUFFER_WORDS))
        landed = storage.landed.data_ptr()
        if tidx == 0:
            cute.arch.mbarrier_init(landed, 1)
        cute.arch.mbarrier_init_fence()
        cute.arch.cluster_arrive()
        cute.arch.cluster_wait()  # the peer has started: its shared memory and mbarrier exist
        if const_expr(self.by_async):
            self.async_rounds(buffer, landed, rounds, tidx)
        elif const_expr(self.by_bulk):
            self.bulk_rounds(buffer, landed, rounds, tidx)
        else:
            self.store_rounds(buffer, rounds, tidx)
        cute.arch.cluster_arrive()
        cute.arch.cluster_wait()  # the peer's stores into this CTA have landed
        out[cta * THREADS + tidx] = buffer[tidx * VECTOR_WORDS]

    @cute.jit
    def word_of(self, tidx, r):
        """The first word of thread ``tidx``'s store of round ``r``: rounds fill the
        buffer in turn, a spread pattern's rounds the gaps that the ones before left."""
        vector = ((tidx // self.run) * self.run * self.spread + (r % self.spread) * self.run + tidx % self.run
                  + (r // self.spread) * THREADS * self.spread)
        return (vector * VECTOR_WORDS) % BUFFER_WORDS

    @cute.jit
    def store_rounds(self, buffer, rounds, tidx):
        base = buffer.iterator
        if const_expr(self.to_peer):
            base = cute.arch.map_dsmem_ptr(buffer.iterator, cute.arch.block_idx_in_cluster() ^ 1)
        for r in cutlass.range(rounds, unroll=1):
            word = self.word_of(tidx, r)
            words = vector.from_elements(ir.VectorType.get([VECTOR_WORDS], Int32.mlir_type),
                                         [Int32(r + k).ir_value() for k in range(VECTOR_WORDS)])
            address = (base + word).to_llvm_ptr()
            if const_expr(self.to_peer):
                # st.shared::cluster takes the peer's address as a 32-bit shared-space pointer.
                address = llvm.inttoptr(llvm.PointerType.get(SHARED_ADDRESS_SPACE), llvm.ptrtoint(T.i32(), address))
            cute.arch.store(address, words, ss="cluster" if const_expr(self.to_peer) else "cta")

    @cute.jit
    def async_rounds(self, buffer, landed, rounds, tidx):
        peer = cute.arch.block_idx_in_cluster() ^ 1
        for phase in cutlass.range(rounds // PHASE_ROUNDS, unroll=1):
            if tidx == 0:
                cute.arch.mbarrier_arrive_and_expect_tx(landed, PHASE_ROUNDS * ROUND_BYTES)
            for r in cutlass.range(PHASE_ROUNDS, unroll=1):
                word = cute.assume(self.word_of(tidx, r), divby=VECTOR_WORDS)
                cute.arch.store_async_dsmem(buffer.iterator + word, tuple(Int32(r + k) for k in range(VECTOR_WORDS)),
                                            landed, peer)
            cute.arch.mbarrier_wait(landed, phase % 2)  # this phase's bytes from the peer have landed
            cute.arch.cluster_arrive()
            cute.arch.cluster_wait()  # neither sends the next phase before both have received this one

    @cute.jit
    def bulk_rounds(self, buffer, landed, rounds, tidx):
        """As ``async_rounds``, each round one 4 KB bulk copy of this CTA's buffer into
        the same place of the peer's, from the first thread."""
        own = buffer.iterator.toint()
        shift = dsmem.peer_shift(own, cute.arch.block_idx_in_cluster() ^ 1)
        for phase in cutlass.range(rounds // PHASE_ROUNDS, unroll=1):
            if tidx == 0:
                cute.arch.mbarrier_arrive_and_expect_tx(landed, PHASE_ROUNDS * ROUND_BYTES)
                for r in cutlass.range(PHASE_ROUNDS, unroll=1):
                    source = own + (r * ROUND_BYTES) % (BUFFER_WORDS * 4)
                    dsmem.copy_bulk(source + shift, source, ROUND_BYTES, landed.toint() + shift)
            cute.arch.mbarrier_wait(landed, phase % 2)
            cute.arch.cluster_arrive()
            cute.arch.cluster_wait()


def median_seconds(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return sorted(times)[len(times) // 2]


def compile_only(targets=TARGETS, options: str = "--gpu-arch=sm_90a") -> None:
    """Compile the ``targets``' modes, every pattern, for sm_90a (no GPU needed)."""
    from cutlass.cute.runtime import make_fake_stream, make_fake_tensor

    out = make_fake_tensor(Int32, (THREADS,), (1,))
    for target in targets:
        for pattern, run, spread in patterns_of(target):
            cute.compile(StoreRate(target, run, spread), out, Int32(PHASE_ROUNDS), Int32(2),
                         make_fake_stream(use_tvm_ffi_env_stream=False), options=options)
            print(f"compiled {target}, {pattern}", flush=True)


def main() -> int:
    if "--compile-only" in sys.argv[1:]:
        os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
        compile_only()
        return 0
    if not torch.cuda.is_available():
        print("needs a GPU")
        return 1
    from cuda.bindings import driver
    from cutlass.cute.runtime import from_dlpack

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ctas = 2 * (sms // 2) * WAVES
    out = torch.empty(ctas * THREADS, dtype=torch.int32, device="cuda")
    stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
    print(f"{'stores':<14} {'pattern':>11} {'rounds':>7} {'us':>10} {'GB/s per SM':>12}")
    for target in TARGETS:
        for pattern, run, spread in patterns_of(target):
            compiled = cute.compile(StoreRate(target, run, spread), from_dlpack(out), Int32(PHASE_ROUNDS),
                                    Int32(ctas), stream)
            for rounds in (1024, 16384):
                seconds = median_seconds(lambda: compiled(from_dlpack(out), Int32(rounds), Int32(ctas), stream))
                bytes_per_sm = ROUND_BYTES * rounds * ctas / sms
                print(f"{target:<14} {pattern:>11} {rounds:>7} {seconds * 1e6:>10.1f} "
                      f"{bytes_per_sm / seconds / 1e9:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
