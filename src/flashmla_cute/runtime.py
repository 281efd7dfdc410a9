"""Launches the compiled kernels on torch's current CUDA stream.

Two ways in, for each public function:

- the *checked* path (``gpu_metadata``, ``gpu_decode``) takes arguments that
  ``checks.py`` has validated, and works for every valid call;
- the *fast* path (``fast_metadata``, ``fast_decode``) is tried first on every CUDA
  call. It reads only the few sizes it needs to allocate the outputs and leaves the
  rest of the validation to the compiled function itself: its TVM-FFI entry checks, in
  C, every tensor's type, dtype, rank, device, 16-byte alignment, the static extents
  (576, 64, 8, ...), the strides it was compiled for (unit and multiples of 8) and that
  extents with one name (``b``, ``h_kv``, ...) agree across tensors, before it launches
  anything. The fast path raises on anything it does not handle itself, and the caller
  then takes the checked path, whose checks say what is wrong in our own words. So the
  fast path never changes what a call computes or which calls fail, only what a valid
  call costs on the host.

Outputs and workspaces are allocated with torch, so both paths work under CUDA-graph
capture.
"""

from __future__ import annotations

import functools
import math

import torch

from . import compile as compile_mod
from .scheduler import METADATA_INTS, split_workspace_elems

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
_INT32_MAX = 2**31 - 1


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Multiprocessor count of a CUDA device."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# The fast path's tables, filled by the checked path: a key is present only once a
# call with it has passed every check (including "this device is an sm_90 GPU").
_decode_fns: dict[tuple, object] = {}  # (dtype, causal, d, dv) -> compiled decode step
_metadata_parts: dict[tuple, int] = {}  # (device index, num_heads_per_head_k, num_heads_k) -> parts
_hopper_devices: set[int] = set()


def decode_fn(dtype: torch.dtype, causal: bool, d: int, dv: int):
    """The compiled decode kernel of a variant (it merges split sequences itself)."""
    key = (dtype, causal, d, dv)
    fn = _decode_fns.get(key)
    if fn is None:
        fn = compile_mod.get(compile_mod.decode_variant(_DTYPE_NAMES[dtype], causal, d, dv))
        _decode_fns[key] = fn
    return fn


@functools.lru_cache(maxsize=None)
def combine_fn(dtype: torch.dtype, dv: int):
    """The merge of split partials as a kernel of its own (the decode kernel merges
    in-kernel; this tests the merge alone)."""
    return compile_mod.get(compile_mod.combine_variant(_DTYPE_NAMES[dtype], dv))


@functools.lru_cache(maxsize=None)
def metadata_fn():
    return compile_mod.get(compile_mod.metadata_variant())


def gpu_metadata(cache_seqlens: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-KV plan for ``cache_seqlens`` computed on its GPU (no host sync);
    checked path."""
    b = cache_seqlens.shape[0]
    meta = cache_seqlens.new_empty((num_parts, METADATA_INTS))
    num_splits = cache_seqlens.new_empty(b + 1)
    metadata_fn()(cache_seqlens, meta, num_splits)
    return meta, num_splits


def remember_metadata_call(device_index: int, num_heads_per_head_k: int, num_heads_k: int, num_parts: int) -> None:
    """Let ``fast_metadata`` serve calls like this checked one."""
    _hopper_devices.add(device_index)
    _metadata_parts[(device_index, num_heads_per_head_k, num_heads_k)] = num_parts


def fast_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_mla_metadata`` for a configuration the checked path has seen; raises
    (anything) where the checked path must decide."""
    num_parts = _metadata_parts[(cache_seqlens.get_device(), num_heads_per_head_k, num_heads_k)]
    if type(num_heads_per_head_k) is not int or type(num_heads_k) is not int:
        raise TypeError  # 16.0 hashes like 16: let the checks reject it
    b = cache_seqlens.shape[0]
    if b < 1:
        raise ValueError
    # new_empty keeps cache_seqlens' dtype and device; the compiled function rejects
    # a cache_seqlens that is not int32 before it writes anything.
    meta = cache_seqlens.new_empty((num_parts, METADATA_INTS))
    num_splits = cache_seqlens.new_empty(b + 1)
    metadata_fn()(cache_seqlens, meta, num_splits)
    return meta, num_splits


def query_rows(q: torch.Tensor, h_kv: int) -> torch.Tensor:
    """``q [b, s_q, h_q, d]`` as the decode kernel takes it, ``[b, 1, h_kv * rows, d]``
    with ``rows = s_q * h_q / h_kv``: for each KV head in turn, its query rows, row
    ``s * heads_per_kv + h``. That is ``q`` itself when ``s_q == 1``, a view when
    ``h_kv == 1``, and a copy otherwise."""
    b, s_q, h_q, d = q.shape
    if s_q == 1:
        return q
    heads_per_kv = h_q // h_kv
    rows = q.view(b, s_q, h_kv, heads_per_kv, d).transpose(1, 2)
    return rows.reshape(b, 1, h_kv * s_q * heads_per_kv, d)


_WORKSPACE_ATTR = "_flashmla_cute_split_workspace"


def _split_workspace(tile_scheduler_metadata: torch.Tensor, elems: int, counters_at: int,
                     device_index: int) -> torch.Tensor:
    """The decode kernel's split workspace (``scheduler.split_workspace_elems``): the
    split sequences' partial results, then arrival counters that must be zero.

    All layers of a decoding step share one plan and run one after another on one
    stream, so the workspace is allocated (and its counters zeroed) by the first call
    with a plan and kept on the plan's tensor for the next calls: the kernel leaves the
    counters zero, and the next calls save an allocation and a memset. It is reused
    only by calls on the stream it was made for, with the same size: work on one stream
    runs in order, so no two kernels ever use it at once, and the caching allocator
    hands its memory to nothing else while the plan lives. A call on another stream or
    of another size makes its own (and keeps that instead).
    """
    stream = torch._C._cuda_getCurrentRawStream(device_index)
    kept = getattr(tile_scheduler_metadata, _WORKSPACE_ATTR, None)
    if kept is not None and kept[0] == stream and kept[1].numel() == elems:
        return kept[1]
    workspace = tile_scheduler_metadata.new_empty(elems, dtype=torch.float32)
    workspace[counters_at:].zero_()
    try:
        setattr(tile_scheduler_metadata, _WORKSPACE_ATTR, (stream, workspace))
    except (AttributeError, RuntimeError):  # a tensor type without attributes: not kept
        pass
    return workspace


def _launch_decode(fn, q, k_cache, block_table, cache_seqlens, meta, num_splits, b, s_q, h_q, h_kv, dv, scale):
    """Allocate the outputs, find the split workspace, and run the compiled decode step."""
    heads_per_kv = h_q // h_kv
    elems, counters_at = split_workspace_elems(b, meta.shape[0], h_kv, s_q * heads_per_kv, dv)
    if elems > _INT32_MAX:
        raise ValueError(
            f"the split-KV workspace for b={b}, {meta.shape[0]} SM parts and s_q * h_q = {s_q * h_q} "
            f"would hold {elems} values, more than the kernels index (2**31 - 1): split the batch"
        )
    accum = _split_workspace(meta, elems, counters_at, q.get_device())
    out = q.new_empty((b, s_q, h_q, dv))
    lse = accum.new_empty((b, h_q, s_q))
    fn(query_rows(q, h_kv), k_cache, block_table, cache_seqlens, meta, num_splits, out, lse, accum, scale,
       heads_per_kv)
    return out, lse


def gpu_decode(problem, q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits):
    """Run the decode step for validated arguments (checked path); returns ``(out, lse)``."""
    p = problem
    fn = decode_fn(q.dtype, p.causal, p.d, p.dv)
    _hopper_devices.add(q.get_device())
    return _launch_decode(fn, q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                          p.b, p.s_q, p.h_q, p.h_kv, p.dv, p.softmax_scale)


def fast_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                softmax_scale, causal):
    """``flash_mla_with_kvcache`` on CUDA tensors with the compiled function's own
    argument checks; raises (anything) where the checked path must decide.

    What the compiled function cannot check is checked here: the sizes the outputs are
    allocated with and the grids launched with (``b``, ``s_q``, ``h_q``, SM parts >= 1,
    a non-empty cache, ``h_kv`` dividing ``h_q``),
    ``num_splits``' length (``b + 1``: the kernels index it by batch) and the Python
    scalars.
    """
    if q.get_device() not in _hopper_devices or type(causal) is not bool or type(head_dim_v) is not int:
        raise TypeError
    b, s_q, h_q, d = q.shape
    num_blocks, _, h_kv, _ = k_cache.shape
    fn = _decode_fns[(q.dtype, causal and s_q > 1, d, head_dim_v)]
    # (An empty grid would fail at launch; CUDA then keeps that error for the next call
    # that asks, so sizes that make one are refused here.)
    if (b < 1 or s_q < 1 or h_q < 1 or h_q % h_kv or num_blocks < 1 or tile_scheduler_metadata.shape[0] < 1
            or num_splits.shape[0] != b + 1):
        raise ValueError
    if softmax_scale is None:
        scale = d**-0.5
    elif type(softmax_scale) is float and 0.0 < softmax_scale < math.inf:
        scale = softmax_scale
    else:
        raise TypeError
    return _launch_decode(fn, q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                          b, s_q, h_q, h_kv, head_dim_v, scale)
