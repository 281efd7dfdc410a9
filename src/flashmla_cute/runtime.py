"""Launches the compiled kernels on torch's current CUDA stream.

Argument checking happens in ``interface.py``; these functions take validated tensors,
allocate outputs and workspaces with torch (so they work under CUDA-graph capture), and
call the compiled functions from ``compile.py``.
"""

from __future__ import annotations

import functools

import torch

from . import compile as compile_mod
from .scheduler import METADATA_INTS, accumulator_elems

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Multiprocessor count of a CUDA device."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _decode_fn(dtype: torch.dtype, causal: bool, d: int, dv: int):
    return compile_mod.get(compile_mod.decode_variant(_DTYPE_NAMES[dtype], causal, d, dv))


@functools.lru_cache(maxsize=None)
def _combine_fn(dtype: torch.dtype, dv: int):
    return compile_mod.get(compile_mod.combine_variant(_DTYPE_NAMES[dtype], dv))


@functools.lru_cache(maxsize=None)
def _metadata_fn():
    return compile_mod.get(compile_mod.metadata_variant())


def gpu_metadata(cache_seqlens: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-KV plan for ``cache_seqlens`` computed on its GPU (no host sync)."""
    b = cache_seqlens.shape[0]
    meta = torch.empty(num_parts, METADATA_INTS, dtype=torch.int32, device=cache_seqlens.device)
    num_splits = torch.empty(b + 1, dtype=torch.int32, device=cache_seqlens.device)
    _metadata_fn()(cache_seqlens, meta, num_splits)
    return meta, num_splits


def query_rows(q: torch.Tensor, h_kv: int) -> torch.Tensor:
    """``q [b, s_q, h_q, d]`` as ``[b, h_kv, s_q * h_q / h_kv, d]``: the query rows that
    share each KV head, row ``s * heads_per_kv + h``. A view when ``s_q == 1``."""
    b, s_q, h_q, d = q.shape
    if s_q == 1:
        return q.view(b, h_kv, h_q // h_kv, d)
    rows = q.view(b, s_q, h_kv, h_q // h_kv, d).transpose(1, 2)
    return rows.reshape(b, h_kv, s_q * (h_q // h_kv), d)


_INT32_MAX = 2**31 - 1


def gpu_decode(problem, q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits):
    """Run the decode kernel and the combine kernel; returns ``(out, lse)``."""
    p = problem
    q_rows = query_rows(q, p.h_kv)
    out = torch.empty(p.b, p.s_q, p.h_q, p.dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(p.b, p.h_q, p.s_q, dtype=torch.float32, device=q.device)
    accum_elems = accumulator_elems(p.b + p.num_parts, p.h_kv, p.rows_per_kv, p.dv)
    if accum_elems > _INT32_MAX:
        raise ValueError(
            f"the split-KV workspace for b={p.b}, {p.num_parts} SM parts and s_q * h_q = {p.s_q * p.h_q} "
            f"would hold {accum_elems} floats, more than the kernels index (2**31 - 1): split the batch"
        )
    accum = torch.empty(accum_elems, dtype=torch.float32, device=q.device)
    _decode_fn(q.dtype, p.causal, p.d, p.dv)(
        q_rows, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
        out, lse, accum, p.softmax_scale, p.heads_per_kv,
    )
    _combine_fn(q.dtype, p.dv)(accum, num_splits, out, lse, p.heads_per_kv)
    return out, lse
