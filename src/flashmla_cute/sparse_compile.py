"""Compiled variants of the sparse decode kernel, in the form of ``compile.py``'s
registry (``Variant``), so that they are compiled on first use, kept in the same disk
cache, and written out as cubins for inspection (``sparse_variants``)."""

from __future__ import annotations

from . import compile as compile_mod
from .compile import Variant, _fake, _i32, _s16, _stream, _stride
from .fp8_cache import BYTES_PER_TOKEN, HEAD_DIM, LATENT_DIM


def sparse_decode_variant() -> Variant:
    def build():
        import cutlass
        from cutlass import Float32, Int32

        from .kernels.sparse_decode_sm90 import SparseDecodeSm90

        b, s_q, h_q = (_i32() for _ in range(3))
        args = (
            _fake(cutlass.BFloat16, (b, s_q, h_q, HEAD_DIM), (_s16(), _s16(), _s16(), 1), 16),  # q
            _fake(cutlass.Uint8, (_i32(), _i32(), BYTES_PER_TOKEN), (_stride(16), BYTES_PER_TOKEN, 1), 16),  # k_cache
            _fake(cutlass.Int32, (b, s_q, _i32()), (_stride(), _stride(), 1)),  # indices
            _fake(cutlass.Int32, (_i32(),), (1,)),  # topk_length
            _fake(cutlass.Float32, (_i32(),), (1,)),  # attn_sink
            _fake(cutlass.BFloat16, (b, s_q, h_q, LATENT_DIM), (_s16(), _s16(), _s16(), 1), 16),  # out
            _fake(cutlass.Float32, (b, h_q, s_q), (_stride(), _stride(), _stride())),  # lse
            Float32(1.0),  # softmax_scale
            Int32(0),  # has_topk_length
            Int32(0),  # has_sink
            _stream(),
        )
        return SparseDecodeSm90(), args

    return Variant(f"sparse_decode_sm90_v32_d{HEAD_DIM}_dv{LATENT_DIM}", build)


def sparse_variants() -> list[Variant]:
    """Every variant of the sparse decode kernel (one: all options are runtime values)."""
    return [sparse_decode_variant()]


def get_sparse_decode():
    """The compiled sparse decode kernel (from this process, the disk cache, or compiled now)."""
    return compile_mod.get(sparse_decode_variant())
