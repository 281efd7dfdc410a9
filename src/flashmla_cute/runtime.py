"""Launches the compiled kernels on torch's current CUDA stream.

Everything here takes arguments that are already known to be valid (``interface``
decides that, through ``checks.py`` or its table of configurations the checks have
accepted) and only works out what a launch needs and launches:

- ``plan_on_gpu``: the metadata kernel, into freshly handed-out output tensors;
- ``decode_launch``: what a decode call of one configuration needs (the compiled
  function, output shapes, workspace size), worked out once from a ``DecodeProblem``;
  ``launch_decode`` runs it for one call.

The compiled functions' TVM-FFI entries check, in C, every tensor's type, dtype, rank,
device, 16-byte alignment, the static extents (576, 64, 8, ...), the strides they were
compiled for (unit and multiples of 8) and that extents with one name (``b``, ``h_kv``,
...) agree across tensors, before they launch anything; they raise on anything else.

Outputs and workspaces are allocated with torch, so launches work under CUDA-graph
capture.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from . import compile as compile_mod
from .launch_args import DecodeArgs, MetadataArgs
from .lse_layout import dense_by_query_token, lse_strides
from .scheduler import METADATA_INTS, split_workspace_elems

_DTYPE_NAMES = {getattr(torch, name): name for name in compile_mod.DTYPES}
MERGE_DTYPE_NAMES = {getattr(torch, name): name for name in compile_mod.MERGE_DTYPES}

REQUIRED_CAPABILITY = (9, 0)
"""The kernels use Hopper-only instructions (TMA, WGMMA): sm_90."""

MAX_REMEMBERED = 4096
"""Configurations one fast path's table keeps (``remember``)."""


def remember(table: dict, key, value) -> None:
    """``table[key] = value`` in a fast path's table of configurations that the checks
    accepted (``interface``, ``api``, ``merge``); a full table is cleared first."""
    if len(table) >= MAX_REMEMBERED:
        table.clear()
    table[key] = value


@functools.lru_cache(maxsize=None)
def device_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def index_of(device: torch.device) -> int:
    """The index of a CUDA ``device`` (``cuda`` alone: the current device's)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def is_hopper(index: int) -> bool:
    """Whether CUDA device ``index`` is an sm_90 GPU, which the kernels are built for."""
    return device_capability(index) == REQUIRED_CAPABILITY


def require_hopper(device: torch.device) -> int:
    """The CUDA device index of ``device``; RuntimeError unless it is an sm_90 GPU."""
    index = index_of(device)
    capability = device_capability(index)
    if not is_hopper(index):
        raise RuntimeError(
            f"flashmla_cute's kernels need a Hopper GPU (compute capability 9.0, sm_90); "
            f"cuda:{index} is {torch.cuda.get_device_name(index)} with compute capability "
            f"{capability[0]}.{capability[1]}. Pass CPU tensors to compute with the float32 reference."
        )
    return index


@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    """Multiprocessor count of CUDA device ``index``."""
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def decode_fn(dtype: torch.dtype, causal: bool, d: int, dv: int):
    """The compiled decode kernel of a variant (its host function also launches the combine kernel)."""
    return compile_mod.get(compile_mod.decode_variant(_DTYPE_NAMES[dtype], causal, d, dv))


@functools.lru_cache(maxsize=None)
def combine_fn(dtype: torch.dtype, dv: int):
    """The combine kernel launched on its own, over a workspace in the decode kernel's
    layout (the decode call launches it itself; this tests the merge alone)."""
    return compile_mod.get(compile_mod.combine_variant(_DTYPE_NAMES[dtype], dv))


@functools.lru_cache(maxsize=None)
def merge_fn(dtype: torch.dtype, dv: int):
    """The merge of two results over disjoint keys (``merge.merge_attention_states``)."""
    return compile_mod.get(compile_mod.merge_variant(MERGE_DTYPE_NAMES[dtype], dv))


@functools.lru_cache(maxsize=None)
def metadata_fn():
    return compile_mod.get(compile_mod.metadata_variant())


# ---------------------------------------------------------------- get_mla_metadata

PLAN_SLAB = 32
"""Plans whose outputs one allocation holds once a plan configuration repeats."""
_MAX_PLAN_SLABS = 8  # configurations with unused slots kept (GPU memory: slabs hold b + 1 ints a plan)

# (device, stream, num_parts, b) -> output pairs not handed out yet
_plan_slabs: dict[tuple, list] = {}
_last_plan_key: tuple | None = None


def _plan_outputs(cache_seqlens: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh ``(tile_scheduler_metadata, num_splits)`` tensors for one plan.

    A plan's outputs are small (``num_parts * 8`` and ``b + 1`` ints) and a decoding
    loop asks for plans of one size step after step, so when a configuration repeats,
    the outputs of its next ``PLAN_SLAB`` plans are cut out of two allocations at once
    (one for each output, so that a plan's two tensors never share memory) and handed
    out one plan per call. No slot is handed out twice and a slab's memory lives as
    long as any of its tensors, so each call's outputs are as much its own as
    ``torch.empty``'s would be, for a tenth of the host time. Slabs are kept per stream:
    the caching allocator recycles a slab's memory, once all its tensors are gone, only
    for work ordered after the stream it was allocated on.

    A plan made while the stream is captured into a CUDA graph gets tensors of its own
    from the graph's memory pool, as ``split_workspace`` does: a slot of a slab made
    outside the capture would be freed with the slab's last other tensor, while the
    graph's replays still write the plan there.
    """
    global _last_plan_key
    if torch._C._cuda_isCurrentStreamCapturing():
        return _fresh_plan_outputs(cache_seqlens, num_parts)
    device = cache_seqlens.get_device()
    b = cache_seqlens.shape[0]
    key = (device, torch._C._cuda_getCurrentRawStream(device), num_parts, b)
    free = _plan_slabs.get(key)
    if free:
        return free.pop()
    if key != _last_plan_key:  # a configuration seen once may not come back
        _last_plan_key = key
        return _fresh_plan_outputs(cache_seqlens, num_parts)
    metas = cache_seqlens.new_empty(PLAN_SLAB, num_parts, METADATA_INTS).unbind(0)
    splits = cache_seqlens.new_empty(PLAN_SLAB, b + 1).unbind(0)
    free = list(zip(metas, splits))
    result = free.pop()
    if len(_plan_slabs) >= _MAX_PLAN_SLABS:
        _plan_slabs.clear()
    _plan_slabs[key] = free
    return result


def _fresh_plan_outputs(cache_seqlens: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    # new_empty keeps cache_seqlens' dtype and device; the compiled function rejects a
    # cache_seqlens that is not int32 before it writes anything.
    return cache_seqlens.new_empty(num_parts, METADATA_INTS), cache_seqlens.new_empty(cache_seqlens.shape[0] + 1)


def plan_on_gpu(cache_seqlens: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-KV plan of ``num_parts`` parts for ``cache_seqlens``, computed on its
    GPU (no host sync)."""
    meta, num_splits = _plan_outputs(cache_seqlens, num_parts)
    metadata_fn()(*MetadataArgs(seqlens=cache_seqlens, meta=meta, num_splits=num_splits))
    return meta, num_splits


# ---------------------------------------------------------- flash_mla_with_kvcache


class DecodeLaunch(NamedTuple):
    """What a decode call of one configuration needs, worked out once."""

    fn: Any  # the compiled decode kernel
    device_index: int
    out_shape: tuple  # (b, s_q, h_q, dv)
    lse_shape: tuple  # (b, h_q, s_q)
    lse_strides: tuple  # FlashMLA's layout (lse_layout)
    workspace_elems: int
    h_kv: int
    heads_per_kv: int
    gather_rows: bool  # s_q > 1: q goes through query_rows
    default_scale: float


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


def split_workspace(holder, elems: int, device_index: int) -> torch.Tensor:
    """A kernel's split workspace of ``elems`` fp32 values (the split sequences' partial
    results), kept on ``holder``: the dense plan's tensor, or the sparse plan object.

    All layers of a decoding step share one plan and run one after another on one
    stream, so the workspace is allocated by the first call with a plan and kept on it
    for the next calls, which save an allocation. Calls on one stream run in order, so
    no two kernels ever use one workspace at once; each stream (and size) gets its own,
    and a plan keeps every workspace it handed out while it lives: one freed would leave
    a CUDA graph that captured a call using it replaying into memory that is no longer
    its own (two graphs captured on two streams with one plan did exactly that).

    A call being captured into a CUDA graph gets a workspace of its own, allocated in the
    capture from the graph's memory pool, where torch keeps it for the graph's replays:
    the graph depends neither on the plan's life nor on the calls made with it later.
    """
    if torch._C._cuda_isCurrentStreamCapturing():
        return torch.empty(elems, dtype=torch.float32, device=torch.device("cuda", device_index))
    key = (torch._C._cuda_getCurrentRawStream(device_index), elems)
    kept = kept_workspaces(holder)
    workspace = kept.get(key)
    if workspace is None:
        workspace = torch.empty(elems, dtype=torch.float32, device=torch.device("cuda", device_index))
        kept[key] = workspace
    return workspace


def kept_workspaces(holder) -> dict:
    """The workspaces kept on ``holder`` by ``split_workspace``, by (raw stream, size);
    a fresh dict, not kept, for a holder that takes no attributes."""
    kept = getattr(holder, _WORKSPACE_ATTR, None)
    if kept is None:
        kept = {}
        try:
            setattr(holder, _WORKSPACE_ATTR, kept)
        except (AttributeError, RuntimeError):  # a type without attributes: not kept
            pass
    return kept


def decode_launch(problem, dtype: torch.dtype, device_index: int) -> DecodeLaunch:
    """What a decode call of a validated ``problem`` (``checks.DecodeProblem``) needs;
    compiles the kernel variant on first use."""
    p = problem
    elems = split_workspace_elems(p.b, p.num_parts, p.h_kv, p.rows_per_kv, p.dv)
    return DecodeLaunch(
        fn=decode_fn(dtype, p.causal, p.d, p.dv),
        device_index=device_index,
        out_shape=(p.b, p.s_q, p.h_q, p.dv),
        lse_shape=(p.b, p.h_q, p.s_q),
        lse_strides=lse_strides(p.b, p.h_q, p.s_q, dense_by_query_token(p.h_kv)),
        workspace_elems=elems,
        h_kv=p.h_kv,
        heads_per_kv=p.heads_per_kv,
        gather_rows=p.s_q > 1,
        default_scale=p.d**-0.5,
    )


def launch_decode(launch: DecodeLaunch, q, k_cache, block_table, cache_seqlens, meta, num_splits,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the decode kernel; returns ``(out, lse)``. The compiled function raises (and
    launches nothing) on arguments that do not match what it was compiled for."""
    workspace = split_workspace(meta, launch.workspace_elems, launch.device_index)
    out = q.new_empty(launch.out_shape)
    lse = workspace.new_empty_strided(launch.lse_shape, launch.lse_strides)
    rows = query_rows(q, launch.h_kv) if launch.gather_rows else q
    launch.fn(*DecodeArgs(q=rows, k=k_cache, block_table=block_table, seqlens=cache_seqlens, meta=meta,
                          num_splits=num_splits, o=out, lse=lse, accum=workspace, softmax_scale=scale,
                          heads_per_kv=launch.heads_per_kv))
    return out, lse
