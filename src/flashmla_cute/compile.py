"""Compile-on-first-use for every kernel variant.

A *variant* is one static configuration of a kernel (dtype, causal, head dims). Each is
compiled once per process with ``cute.compile`` against fake tensors whose dynamic
extents and strides are symbolic, so one compiled function serves every batch size,
head count, sequence length and cache size. Compilation needs no GPU: with
``CUTE_DSL_ARCH=sm_90a`` it runs on any machine (``python -m flashmla_cute.precompile``).

The compiled functions use the DSL's TVM-FFI calling convention: they take torch
tensors directly and launch on torch's current CUDA stream.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Callable

DTYPES = ("bfloat16", "float16")
HEAD_DIMS = ((576, 512),)
"""(d, dv) pairs the decode kernel is built for."""

_compiled: dict[str, Any] = {}
_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled kernel: ``name`` doubles as its cubin's file name."""

    name: str
    build: Callable[[], tuple[Any, tuple]]  # -> (jit callable, fake arguments)


def _cutlass_dtype(name: str):
    import cutlass

    return {"bfloat16": cutlass.BFloat16, "float16": cutlass.Float16}[name]


def _fake(dtype, shape, stride, align=None):
    from cutlass.cute.runtime import make_fake_tensor

    return make_fake_tensor(dtype, shape, stride, assumed_align=align)


def _i32():
    import cutlass.cute as cute

    return cute.sym_int32()


def _stride(divisibility: int = 1):
    # Strides of big tensors may pass 2**31 elements. TMA sources and vectorized
    # accesses need theirs in multiples of 8 elements (16 bytes).
    import cutlass.cute as cute

    return cute.sym_int64(divisibility=divisibility)


def _s16():
    return _stride(8)


def _stream():
    from cutlass.cute.runtime import make_fake_stream

    return make_fake_stream(use_tvm_ffi_env_stream=True)


def decode_variant(dtype: str, causal: bool, head_dim: int = 576, head_dim_v: int = 512) -> Variant:
    def build():
        import cutlass
        from cutlass import Float32, Int32

        from .kernels.decode_sm90 import MlaDecodeSm90

        dt = _cutlass_dtype(dtype)
        b, h_kv, rows, s_q, h_q, n_acc = (_i32() for _ in range(6))
        d, dv = head_dim, head_dim_v
        args = (
            _fake(dt, (b, h_kv, rows, d), (_s16(), _s16(), _s16(), 1), 16),  # q rows
            _fake(dt, (_i32(), 64, h_kv, d), (_s16(), _s16(), _s16(), 1), 16),  # k_cache
            _fake(cutlass.Int32, (b, _i32()), (_stride(), 1)),  # block_table
            _fake(cutlass.Int32, (b,), (1,)),  # cache_seqlens
            _fake(cutlass.Int32, (_i32(), 8), (8, 1)),  # tile_scheduler_metadata
            _fake(cutlass.Int32, (_i32(),), (1,)),  # num_splits
            _fake(dt, (b, s_q, h_q, dv), (_s16(), _s16(), _s16(), 1), 16),  # out
            _fake(cutlass.Float32, (b, h_q, s_q), (_stride(), _stride(), _stride())),  # lse
            _fake(cutlass.Float32, (n_acc, h_kv, rows, dv), (_s16(), _s16(), _s16(), 1), 16),
            _fake(cutlass.Float32, (n_acc, h_kv, rows), (_stride(), _stride(), 1)),
            Float32(1.0),  # softmax_scale
            Int32(1),  # heads per KV head
            _stream(),
        )
        return MlaDecodeSm90(dt, head_dim, head_dim_v, causal), args

    name = f"decode_sm90_{dtype}_d{head_dim}_dv{head_dim_v}" + ("_causal" if causal else "")
    return Variant(name, build)


def combine_variant(dtype: str, head_dim_v: int = 512) -> Variant:
    def build():
        import cutlass
        from cutlass import Int32

        from .kernels.combine import MlaCombine

        dt = _cutlass_dtype(dtype)
        b, h_kv, rows, s_q, h_q, n_acc = (_i32() for _ in range(6))
        dv = head_dim_v
        args = (
            _fake(cutlass.Float32, (n_acc, h_kv, rows, dv), (_s16(), _s16(), _s16(), 1), 16),
            _fake(cutlass.Float32, (n_acc, h_kv, rows), (_stride(), _stride(), 1)),
            _fake(cutlass.Int32, (_i32(),), (1,)),
            _fake(dt, (b, s_q, h_q, dv), (_s16(), _s16(), _s16(), 1), 16),
            _fake(cutlass.Float32, (b, h_q, s_q), (_stride(), _stride(), _stride())),
            Int32(1),
            _stream(),
        )
        return MlaCombine(dt, head_dim_v), args

    return Variant(f"combine_{dtype}_dv{head_dim_v}", build)


def metadata_variant() -> Variant:
    def build():
        import cutlass

        from .kernels.metadata import MlaMetadata

        args = (
            _fake(cutlass.Int32, (_i32(),), (1,)),
            _fake(cutlass.Int32, (_i32(), 8), (8, 1)),
            _fake(cutlass.Int32, (_i32(),), (1,)),
            _stream(),
        )
        return MlaMetadata(), args

    return Variant("metadata", build)


def all_variants() -> list[Variant]:
    """Every kernel variant the package ships."""
    variants = [metadata_variant()]
    for dtype in DTYPES:
        variants.append(combine_variant(dtype))
        for d, dv in HEAD_DIMS:
            for causal in (False, True):
                variants.append(decode_variant(dtype, causal, d, dv))
    return variants


def compile_variant(variant: Variant, extra_options: str = "") -> Any:
    """Compile ``variant`` now (no caching). ``extra_options`` go to ``cute.compile``."""
    import cutlass.cute as cute

    fn, args = variant.build()
    return cute.compile(fn, *args, options=("--enable-tvm-ffi " + extra_options).strip())


def get(variant: Variant) -> Any:
    """The compiled function of ``variant``, compiling it on first use in this process."""
    fn = _compiled.get(variant.name)
    if fn is None:
        with _lock:
            fn = _compiled.get(variant.name)
            if fn is None:
                fn = compile_variant(variant)
                _compiled[variant.name] = fn
    return fn


def write_cubin(variant: Variant, out_dir: str, arch: str = "sm_90a") -> str:
    """Compile ``variant`` for ``arch`` and write ``<out_dir>/<variant.name>.cubin``."""
    import glob
    import shutil
    import tempfile

    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        compile_variant(variant, f"--gpu-arch={arch} --keep-cubin --dump-dir={tmp}")
        found = glob.glob(os.path.join(tmp, "*.cubin"))
        if len(found) != 1:
            raise RuntimeError(f"expected one cubin for {variant.name}, found {found}")
        dest = os.path.join(out_dir, f"{variant.name}.cubin")
        shutil.move(found[0], dest)
    return dest
