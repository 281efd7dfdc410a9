"""What the host spends on the pieces of a call, each timed alone in a tight loop.

    python benchmarks/host_costs.py

The per-call host time of ``flash_mla_with_kvcache`` and ``get_mla_metadata``
(``bench_overhead.py``) is a sum of torch allocations, tensor metadata reads, argument
checks and TVM-FFI calls that launch kernels. This prints each piece on its own, plus
trivial CuTe DSL kernels launched through TVM-FFI with 1 and 9 tensor arguments and with
one and two launches per call, so that the floor of a call is known on this host, and
the pieces of a sparse call on its fast path (FlashMLA's V3.2 b = 2 shape).
Each piece is called in batches of 200 (fewer than the launch queue holds, so a batch
is never held up by the GPU), synchronized after each batch; printed are the medians
over 50 batches of the time per call before the synchronization ("enqueue", the host's
cost) and with it ("wall").
"""

import statistics
import sys

import torch

from bench_overhead import import_package, time_batch


def per_call_us(fn, calls: int = 200, batches: int = 50) -> tuple[float, float]:
    """(enqueue, wall) microseconds per call, medians over batches."""
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    enqueue, wall = zip(*(time_batch(fn, calls) for _ in range(batches)))
    return statistics.median(enqueue), statistics.median(wall)


def trivial_kernels():
    """Compiled no-op kernels: (1 tensor, 1 launch), (9 tensors, 1 launch), (9 tensors, 2 launches)."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_stream, make_fake_tensor

    @cute.kernel
    def touch(x: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        if tidx == 0:
            x[0] = x[0] + 1

    @cute.jit
    def one(x: cute.Tensor, stream):
        touch(x).launch(grid=[1, 1, 1], block=[32, 1, 1], stream=stream)

    @cute.jit
    def nine(a, b, c, d, e, f, g, h, i, stream):
        touch(a).launch(grid=[1, 1, 1], block=[32, 1, 1], stream=stream)

    @cute.jit
    def nine_two(a, b, c, d, e, f, g, h, i, stream):
        touch(a).launch(grid=[1, 1, 1], block=[32, 1, 1], stream=stream)
        touch(b).launch(grid=[1, 1, 1], block=[32, 1, 1], stream=stream, use_pdl=True)

    def fake():
        return make_fake_tensor(cutlass.Float32, (cute.sym_int32(),), (1,), assumed_align=16)

    stream = make_fake_stream(use_tvm_ffi_env_stream=True)
    opts = "--enable-tvm-ffi"
    compiled = (
        cute.compile(one, fake(), stream, options=opts),
        cute.compile(nine, *[fake() for _ in range(9)], stream, options=opts),
        cute.compile(nine_two, *[fake() for _ in range(9)], stream, options=opts),
    )
    # The bare tvm_ffi.Function, as the package's disk cache loads it (no Python wrapper).
    return tuple(getattr(c, "__tvm_ffi_object__", lambda c=c: c)() for c in compiled)


def sparse_rows() -> list:
    """The pieces of a sparse call (V3.2, FlashMLA's b = 2 production shape) on its fast
    path, as ``api.flash_mla_with_kvcache`` and ``sparse_runtime.launch_sparse`` run them."""
    from flashmla_cute import api, runtime, sparse_runtime
    from flashmla_cute.launch_args import SparseDecodeArgs
    from flashmla_cute.sparse_testing import make_sparse_decode_inputs

    x = make_sparse_decode_inputs(2, 2, 128, 32768, 2048, 64, device="cuda")
    sched, _ = api.get_mla_metadata()
    sparse_args = (x.q, x.k_cache, x.indices, x.topk_length, x.attn_sink, None, None, None, 512, False, True)

    def call():
        return api.flash_mla_with_kvcache(x.q, x.k_cache, None, None, 512, sched, None,
                                          softmax_scale=x.softmax_scale, is_fp8_kvcache=True, indices=x.indices,
                                          topk_length=x.topk_length, attn_sink=x.attn_sink)

    call()  # the fast path now knows this configuration
    launch, _ = api._known_sparse[api._sparse_key(*sparse_args)]
    k_bytes = x.k_cache.view(torch.uint8)
    device_index = x.q.device.index
    accum = runtime.split_workspace(sched, launch.accum_elems, device_index)
    out = x.q.new_empty(launch.out_shape)
    lse = accum.new_empty(launch.lse_shape)
    no_length, no_sink = sparse_runtime._absent(x.q.device)

    def args():
        return SparseDecodeArgs(
            q=x.q, k_cache=k_bytes, indices=x.indices, topk_length=no_length, extra_k_cache=k_bytes,
            extra_indices=x.indices, extra_topk_length=no_length, sink=no_sink, o=out, lse=lse, accum=accum,
            num_splits=launch.num_splits, softmax_scale=x.softmax_scale, has_topk_length=0, has_sink=0,
            extra_topk=0, has_extra_topk_length=0, whole_batches=launch.plan.whole_batches,
            topk_splits=launch.plan.splits, num_sms=launch.num_sms)

    def workspace_and_outputs():
        workspace = runtime.split_workspace(sched, launch.accum_elems, device_index)
        return workspace, x.q.new_empty(launch.out_shape), workspace.new_empty(launch.lse_shape)

    built = args()
    return [
        ("sparse: _sparse_key", lambda: api._sparse_key(*sparse_args)),
        ("sparse: cache bytes (view as uint8)", lambda: x.k_cache.view(torch.uint8)),
        ("sparse: kept workspace, out, lse", workspace_and_outputs),
        ("sparse: SparseDecodeArgs(...)", args),
        ("sparse: compiled call (%d arguments)" % len(built), lambda: launch.fn(*built)),
        ("sparse: launch_sparse", lambda: sparse_runtime.launch_sparse(launch, sched, x.q, x.k_cache, x.indices, None,
                                                                       None, None, None, None, x.softmax_scale)),
        ("sparse: flash_mla_with_kvcache (V3.2 b2)", call),
    ]


def main() -> int:
    if not torch.cuda.is_available():
        print("host_costs.py needs a CUDA GPU.", file=sys.stderr)
        return 2
    fm = import_package()
    import tvm_ffi

    from flashmla_cute import checks, runtime
    from flashmla_cute.testing import make_decode_inputs

    dev = torch.device("cuda")
    inp = make_decode_inputs(1, 1, 16, h_kv=1, seqlen=100, d=576, dtype=torch.bfloat16, device="cuda", seed=0)
    meta, num_splits = fm.get_mla_metadata(inp.cache_seqlens, 16, 1)
    x = torch.zeros(16, device=dev)
    ts = [torch.zeros(64, device=dev) for _ in range(9)]
    nop = tvm_ffi.get_global_func("testing.nop")
    k_one, k_nine, k_nine_two = trivial_kernels()
    fm.flash_mla_with_kvcache(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512, meta, num_splits,
                              causal=True)  # the fast path now knows this configuration
    problem = checks.check_decode_args(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512, meta,
                                       num_splits, None, True)
    launch = runtime.decode_launch(problem, inp.q.dtype, inp.q.get_device())
    q_rows = runtime.query_rows(inp.q, 1)
    out = torch.empty(1, 1, 16, 512, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(1, 16, 1, dtype=torch.float32, device=dev)
    accum = torch.empty(1 << 20, dtype=torch.float32, device=dev)  # the split workspace
    decode_fn = runtime.decode_fn(torch.bfloat16, False, 576, 512)
    metadata_fn = runtime.metadata_fn()
    buf = torch.empty(1000, dtype=torch.int32, device=dev)
    size4 = torch.Size((1, 1, 16, 512))

    rows = [
        ("torch x.add_(1)", lambda: x.add_(1)),
        ("torch.empty(n, dtype, device)", lambda: torch.empty(100, dtype=torch.int32, device=dev)),
        ("torch.empty(4-tuple, dtype, device)", lambda: torch.empty((1, 1, 16, 512), dtype=torch.bfloat16, device=dev)),
        ("x.new_empty(n)", lambda: x.new_empty(100)),
        ("x.new_empty(4-tuple)", lambda: x.new_empty((1, 1, 16, 512))),
        ("x.new_empty(n, dtype=float32)", lambda: inp.q.new_empty(100, dtype=torch.float32)),
        ("x.new_empty(a, b)", lambda: x.new_empty(100, 8)),
        ("x.new_empty(cached torch.Size)", lambda: x.new_empty(size4)),
        ("buf[:n].view(p, 8)", lambda: buf[:800].view(100, 8)),
        ("buf.narrow(0, 0, n)", lambda: buf.narrow(0, 0, 800)),
        ("buf.as_strided((p, 8), (8, 1))", lambda: buf.as_strided((100, 8), (8, 1))),
        ("current raw stream", lambda: torch._C._cuda_getCurrentRawStream(0)),
        ("getattr(tensor, name, None)", lambda: getattr(buf, "_no_such_attribute", None)),
        ("buf.split([n, m])", lambda: buf.split([800, 200])),
        ("q.view(b, h_kv, hpk, d)", lambda: inp.q.view(1, 1, 16, 576)),
        ("q.shape; q.stride(); q.dtype", lambda: (inp.q.shape, inp.q.stride(), inp.q.dtype)),
        ("check_metadata_args", lambda: checks.check_metadata_args(inp.cache_seqlens, 16, 1)),
        ("check_decode_args", lambda: checks.check_decode_args(inp.q, inp.k_cache, inp.block_table,
                                                               inp.cache_seqlens, 512, meta, num_splits,
                                                               None, True)),
        ("tvm_ffi nop()", lambda: nop()),
        ("tvm_ffi nop(3 cuda tensors)", lambda: nop(*ts[:3])),
        ("tvm_ffi nop(9 cuda tensors)", lambda: nop(*ts)),
        ("tvm_ffi nop(9 ints)", lambda: nop(1, 2, 3, 4, 5, 6, 7, 8, 9)),
        ("trivial kernel, 1 tensor", lambda: k_one(x)),
        ("trivial kernel, 9 tensors", lambda: k_nine(*ts)),
        ("trivial kernels x2, 9 tensors", lambda: k_nine_two(*ts)),
        ("metadata kernel call", lambda: metadata_fn(inp.cache_seqlens, meta, num_splits)),
        ("decode kernel call", lambda: decode_fn(q_rows, inp.k_cache, inp.block_table, inp.cache_seqlens, meta,
                                                 num_splits, out, lse, accum, problem.softmax_scale, 16)),
        ("runtime.plan_on_gpu", lambda: runtime.plan_on_gpu(inp.cache_seqlens, meta.shape[0])),
        ("runtime.launch_decode", lambda: runtime.launch_decode(launch, inp.q, inp.k_cache, inp.block_table,
                                                                inp.cache_seqlens, meta, num_splits,
                                                                problem.softmax_scale)),
        ("get_mla_metadata", lambda: fm.get_mla_metadata(inp.cache_seqlens, 16, 1)),
        ("flash_mla_with_kvcache", lambda: fm.flash_mla_with_kvcache(inp.q, inp.k_cache, inp.block_table,
                                                                     inp.cache_seqlens, 512, meta, num_splits,
                                                                     causal=True)),
    ]
    rows += sparse_rows()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'piece':<40} {'enqueue us':>10} {'wall us':>8}")
    for name, fn in rows:
        enqueue, wall = per_call_us(fn)
        print(f"{name:<40} {enqueue:>10.2f} {wall:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
