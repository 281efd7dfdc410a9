"""Argument validation for the public functions.

Every bad argument raises ``TypeError`` (wrong Python type or tensor dtype) or
``ValueError`` (bad value, shape, layout or device) with a message that names the
argument and says what was expected. The checks look only at tensor metadata (shapes,
dtypes, strides, devices, data pointers): they never read tensor contents, so they cause
no host synchronization and work during CUDA-graph capture. The one exception,
``check_lengths_on_host``, is used only for CPU tensors.

The same checks run for CPU and CUDA tensors, so a call that works on the CPU (where the
float32 reference computes it) works on a Hopper GPU and a call the GPU refuses is refused
on the CPU with the same message.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from . import scheduler
from .compile import HEAD_DIMS
from .launch_args import alignment_fault

PAGE_SIZE = scheduler.BLOCK_SIZE
"""Tokens per page of the paged KV cache."""

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
"""dtypes of ``q`` and ``k_cache``."""

SUPPORTED_HEAD_DIMS = frozenset(HEAD_DIMS)
"""``(d, head_dim_v)`` pairs the kernels are built for (CPU tensors are held to them too)."""

SOFTMAX_SCALE_RANGE = (2.0**-126, float(torch.finfo(torch.float32).max))
"""The scales the kernels and the references take (both scale in float32): float32's
normal range, so that a scale is neither flushed to zero nor rounded to infinity."""

MAX_TABLE_BLOCKS = (2**31 - 1) // PAGE_SIZE
"""The widest ``block_table`` a call takes: the pages of the longest int32 length (the
kernels count a row's tokens in 32 bits)."""

MAX_S_Q = 4
"""The most query tokens per sequence (``q.shape[1]``) a call takes: the largest ``s_q``
the GPU tests check against the reference."""

class DecodeProblem(NamedTuple):
    """The sizes and options of one validated ``flash_mla_with_kvcache`` call
    (immutable; a NamedTuple because one is built on every call)."""

    b: int
    s_q: int
    h_q: int
    h_kv: int
    d: int
    dv: int
    num_blocks: int
    max_blocks: int
    heads_per_kv: int  # h_q // h_kv
    rows_per_kv: int  # s_q * heads_per_kv: query rows that share one KV head
    num_parts: int  # tile_scheduler_metadata.shape[0]
    softmax_scale: float
    causal: bool  # False whenever s_q == 1


def _one_of(values) -> str:
    """``"a"``, ``"a or b"``, ``"a, b or c"``."""
    names = [str(v) for v in values]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def checked_softmax_scale(softmax_scale, d: int) -> float:
    """``softmax_scale`` as a float: ``d ** -0.5`` for None, else a finite positive real."""
    if softmax_scale is None:
        return d ** -0.5
    _check_scale_type(softmax_scale)
    try:
        scale = float(softmax_scale)
    except OverflowError:  # an int past float's range
        raise ValueError(f"softmax_scale must be a finite positive float, got an int of "
                         f"{len(str(abs(int(softmax_scale))))} digits") from None
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"softmax_scale must be a finite positive float, got {scale}")
    low, high = SOFTMAX_SCALE_RANGE
    if not low <= scale <= high:
        raise ValueError(f"softmax_scale must be within float32's normal range [{low:.7g}, {high:.7g}], got {scale}")
    return scale


def _check_scale_type(softmax_scale) -> None:
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type_name(softmax_scale)}")


def is_valid_scale(softmax_scale) -> bool:
    """What ``checked_softmax_scale`` accepts of a given float, in one comparison (the fast
    paths' test; anything else goes to the checks, which name what is wrong)."""
    return type(softmax_scale) is float and SOFTMAX_SCALE_RANGE[0] <= softmax_scale <= SOFTMAX_SCALE_RANGE[1]


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(x)}")
    check_strided(name, x)


def check_strided(name: str, x: torch.Tensor) -> None:
    """A dense tensor with strides, which is what the kernels and the references index: not
    a sparse, nested or other layout (whose strides and data pointer torch would refuse
    deep inside a call, with its own message)."""
    if x.layout != torch.strided or x.is_nested:
        kind = "a nested tensor" if x.is_nested else f"layout {x.layout}"
        raise ValueError(f"{name} must be a strided (dense) tensor, got {kind}")


def _check_dtype(name: str, x: torch.Tensor, dtypes) -> None:
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_one_of(dtypes)}, got {x.dtype}")


def _check_rank(name: str, x: torch.Tensor, rank: int, dims: str) -> None:
    if x.dim() != rank:
        plural = "s" if rank > 1 else ""
        raise ValueError(f"{name} must have {rank} dimension{plural} {dims}, got shape {tuple(x.shape)}")


def type_name(value) -> str:
    """``value``'s type for a message: a builtin's name (``bool``), any other qualified by
    its module (``numpy.bool``, ``torch.Tensor``), so that numpy's bool or int is not
    mistaken for Python's."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type_name(value)}")
    return value


# The calls' Python scalars on their own, for torch.compile's traces: they would otherwise
# go to the custom ops' schemas, which convert some (1 into True). They read no tensor.
def check_metadata_scalars(num_heads_per_head_k, num_heads_k) -> tuple[int, int]:
    return _check_int("num_heads_per_head_k", num_heads_per_head_k), _check_int("num_heads_k", num_heads_k)


def check_decode_scalars(head_dim_v, softmax_scale, causal) -> None:
    _check_int("head_dim_v", head_dim_v)
    if softmax_scale is not None:
        # Its type only: a traced float (dynamic=True) has no value to check here, so
        # its value is checked when the op runs (which the schema leaves as it is).
        _check_scale_type(softmax_scale)
    check_bool("causal", causal)


def check_host_device(name: str, x: torch.Tensor) -> None:
    """Refuse a tensor that is on neither a CUDA device nor the CPU (``meta`` and the like):
    where a call goes to a kernel or the reference, after the checks, which look at
    metadata only and so take meta tensors."""
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name} must be a CUDA (sm_90) or CPU tensor, got device {x.device}")


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type_name(value)}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_last_dim_contiguous(name: str, x: torch.Tensor) -> None:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {tuple(x.stride())}")


def _check_contiguous(name: str, x: torch.Tensor) -> None:
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(x.stride())} for shape {tuple(x.shape)}")


def _check_device(name: str, x: torch.Tensor, q: torch.Tensor) -> None:
    # get_device() (an int; -1 on the CPU) is much cheaper than building torch.device
    # objects, and this runs on every call.
    if (
        x.get_device() != q.get_device()
        or x.is_cuda != q.is_cuda
        or (not q.is_cuda and x.device != q.device)  # CPU vs. meta and the like
    ):
        raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")


def check_metadata_args(cache_seqlens, num_heads_per_head_k, num_heads_k) -> tuple[int, int]:
    """Validate ``get_mla_metadata``'s arguments; returns the two ints."""
    _check_tensor("cache_seqlens", cache_seqlens)
    _check_dtype("cache_seqlens", cache_seqlens, (torch.int32,))
    _check_rank("cache_seqlens", cache_seqlens, 1, "[b]")
    if cache_seqlens.shape[0] < 1:
        raise ValueError("cache_seqlens must hold at least one sequence (b >= 1), got shape (0,)")
    _check_contiguous("cache_seqlens", cache_seqlens)
    return check_metadata_scalars(num_heads_per_head_k, num_heads_k)


def check_lengths_on_host(cache_seqlens: torch.Tensor) -> None:
    """Refuse negative lengths by reading ``cache_seqlens``: only for CPU tensors, where
    reading costs no synchronization. On CUDA the values stay unchecked (FlashMLA does
    the same), and a negative length reads as an empty sequence."""
    negative = (cache_seqlens < 0).nonzero()
    if negative.numel():
        i = int(negative[0, 0])
        raise ValueError(f"cache_seqlens must be >= 0, got cache_seqlens[{i}] = {int(cache_seqlens[i])}")


def check_kernel_layout(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    """What the kernel's TMA loads need beyond shapes and dtypes: at least one cache page,
    and ``q`` and ``k_cache`` with strides in multiples of 16 bytes and 16-byte aligned
    data pointers. ``check_decode_args`` calls this on every device; it looks only at
    metadata."""
    if k_cache.shape[0] < 1:
        raise ValueError("k_cache must hold at least one page (k_cache.shape[0] >= 1), got 0")
    for name, x in (("q", q), ("k_cache", k_cache)):
        fault = alignment_fault(x)
        if fault is not None:
            raise ValueError(f"{name} {fault} (a TMA requirement)")


def check_query_and_cache(q: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Dense decoding's ``q`` and ``k_cache`` (tensors): dtypes, ranks, sizes and last
    dimensions; returns ``(b, s_q, h_q, d, num_blocks, h_kv)``. The first of
    ``check_decode_args``'s checks, which the current API's dense calls also run before
    they plan."""
    _check_dtype("q", q, SUPPORTED_DTYPES)
    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache must have q's dtype {q.dtype}, got {k_cache.dtype}")
    _check_rank("q", q, 4, "[b, s_q, h_q, d]")
    _check_rank("k_cache", k_cache, 4, "[num_blocks, 64, h_kv, d]")
    b, s_q, h_q, d = q.shape
    num_blocks, page, h_kv, d_k = k_cache.shape
    if b < 1:
        raise ValueError(f"q.shape[0] (batch size b) must be >= 1, got {b}")
    if not 1 <= s_q <= MAX_S_Q:
        raise ValueError(f"q.shape[1] (s_q, query tokens per sequence) must be in [1, {MAX_S_Q}], got {s_q}")
    if h_q < 1:
        raise ValueError(f"q.shape[2] (h_q) must be >= 1, got {h_q}")
    supported_d = {pair[0] for pair in SUPPORTED_HEAD_DIMS}
    if d not in supported_d:
        raise ValueError(f"q.shape[3] (d) must be {_one_of(sorted(supported_d))}, got {d}")
    if page != PAGE_SIZE:
        raise ValueError(f"k_cache.shape[1] (page block size) must be {PAGE_SIZE}, got {page}")
    if h_kv < 1:
        raise ValueError(f"k_cache.shape[2] (h_kv) must be >= 1, got {h_kv}")
    if d_k != d:
        raise ValueError(f"k_cache.shape[3] must equal q.shape[3] (d = {d}), got {d_k}")
    if h_q % h_kv != 0:
        raise ValueError(f"q.shape[2] (h_q = {h_q}) must be a multiple of k_cache.shape[2] (h_kv = {h_kv})")
    _check_last_dim_contiguous("q", q)
    _check_last_dim_contiguous("k_cache", k_cache)
    return b, s_q, h_q, d, num_blocks, h_kv


def check_decode_args(
    q,
    k_cache,
    block_table,
    cache_seqlens,
    head_dim_v,
    tile_scheduler_metadata,
    num_splits,
    softmax_scale=None,
    causal=False,
) -> DecodeProblem:
    """Validate ``flash_mla_with_kvcache``'s arguments and return the problem's sizes."""
    for name, x in (
        ("q", q),
        ("k_cache", k_cache),
        ("block_table", block_table),
        ("cache_seqlens", cache_seqlens),
        ("tile_scheduler_metadata", tile_scheduler_metadata),
        ("num_splits", num_splits),
    ):
        _check_tensor(name, x)

    b, s_q, h_q, d, num_blocks, h_kv = check_query_and_cache(q, k_cache)

    dv = _check_int("head_dim_v", head_dim_v)
    if (d, dv) not in SUPPORTED_HEAD_DIMS:
        supported_dv = {pair[1] for pair in SUPPORTED_HEAD_DIMS if pair[0] == d}
        raise ValueError(f"head_dim_v must be {_one_of(sorted(supported_dv))} with d = {d}, got {dv}")

    # Paging
    _check_dtype("block_table", block_table, (torch.int32,))
    _check_rank("block_table", block_table, 2, "[b, max_blocks]")
    if block_table.shape[0] != b:
        raise ValueError(f"block_table.shape[0] must equal the batch size b = {b}, got {block_table.shape[0]}")
    _check_last_dim_contiguous("block_table", block_table)
    if block_table.shape[1] > MAX_TABLE_BLOCKS:
        raise ValueError(f"block_table.shape[1] must be at most {MAX_TABLE_BLOCKS} (the pages of the longest int32 "
                         f"length), got {block_table.shape[1]}")
    _check_dtype("cache_seqlens", cache_seqlens, (torch.int32,))
    _check_rank("cache_seqlens", cache_seqlens, 1, "[b]")
    if cache_seqlens.shape[0] != b:
        raise ValueError(f"cache_seqlens.shape[0] must equal the batch size b = {b}, got {cache_seqlens.shape[0]}")
    _check_contiguous("cache_seqlens", cache_seqlens)

    # Scheduler plan
    meta = tile_scheduler_metadata
    _check_dtype("tile_scheduler_metadata", meta, (torch.int32,))
    _check_rank("tile_scheduler_metadata", meta, 2, f"[num_sm_parts, {scheduler.METADATA_INTS}]")
    if meta.shape[1] != scheduler.METADATA_INTS or meta.shape[0] < 1:
        raise ValueError(
            f"tile_scheduler_metadata must have shape [num_sm_parts >= 1, {scheduler.METADATA_INTS}] "
            f"(as returned by get_mla_metadata), got {tuple(meta.shape)}"
        )
    _check_contiguous("tile_scheduler_metadata", meta)
    _check_dtype("num_splits", num_splits, (torch.int32,))
    if tuple(num_splits.shape) != (b + 1,):
        raise ValueError(
            f"num_splits must have shape [b + 1] = [{b + 1}] (as returned by get_mla_metadata), "
            f"got {tuple(num_splits.shape)}"
        )
    _check_contiguous("num_splits", num_splits)

    # Options
    scale = checked_softmax_scale(softmax_scale, d)
    check_bool("causal", causal)

    # Devices
    for name, x in (
        ("k_cache", k_cache),
        ("block_table", block_table),
        ("cache_seqlens", cache_seqlens),
        ("tile_scheduler_metadata", meta),
        ("num_splits", num_splits),
    ):
        _check_device(name, x, q)

    check_kernel_layout(q, k_cache)

    heads_per_kv = h_q // h_kv
    num_parts = meta.shape[0]
    values = scheduler.split_workspace_values(b, num_parts, h_kv, s_q * heads_per_kv, dv)
    if values > scheduler.MAX_PARTIAL_VALUES:
        raise ValueError(
            f"the split-KV workspace for b={b}, {num_parts} SM parts and s_q * h_q = {s_q * h_q} "
            f"would hold {values} values, more than the kernels index (2**31 - 1): split the batch"
        )
    return DecodeProblem(
        b=b,
        s_q=s_q,
        h_q=h_q,
        h_kv=h_kv,
        d=d,
        dv=dv,
        num_blocks=num_blocks,
        max_blocks=block_table.shape[1],
        heads_per_kv=heads_per_kv,
        rows_per_kv=s_q * heads_per_kv,
        num_parts=num_parts,
        softmax_scale=scale,
        causal=causal and s_q > 1,
    )
