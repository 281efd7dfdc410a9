"""Launches the sparse decode kernel on torch's current CUDA stream, for arguments that
``sparse_checks`` has validated: ``sparse_launch`` works out once what a configuration
needs, ``launch_sparse`` runs a call of it. Outputs are allocated with torch; there is no
host synchronization, so a call can be captured in a CUDA graph (after a first call
outside the capture has compiled the kernel)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import compile as compile_mod
from . import fp8_cache, runtime
from .launch_args import SparseDecodeArgs
from .lse_layout import lse_strides
from .sparse_checks import SparseDecodeProblem
from .sparse_plan import SparsePlan, plan_splits

_placeholders: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_split_offsets: dict[tuple, torch.Tensor] = {}


def _absent(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One-element stand-ins for an absent ``topk_length`` and ``attn_sink`` (the kernel
    reads them only when told they are present)."""
    key = (device.type, device.index)
    pair = _placeholders.get(key)
    if pair is None:
        pair = (torch.zeros(1, dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.float32, device=device))
        _placeholders[key] = pair
    return pair


def split_offsets(b: int, plan: SparsePlan, device: torch.device) -> torch.Tensor:
    """``num_splits`` of the combine kernel for ``plan`` (``SparsePlan.fragment_offsets``),
    kept per shape so that calls allocate and launch nothing for it."""
    key = (device.type, device.index, b, plan)
    offsets = _split_offsets.get(key)
    if offsets is None:
        offsets = torch.tensor(plan.fragment_offsets(b), dtype=torch.int32, device=device)
        _split_offsets[key] = offsets
    return offsets


class SparseLaunch(NamedTuple):
    """What a sparse call of one configuration needs, worked out once (``sparse_launch``)."""

    fn: Any  # the compiled kernel of the layout, with or without an extra cache
    layout: fp8_cache.Fp8Layout
    out_shape: tuple  # (b, s_q, h_q, 512)
    lse_shape: tuple  # (b, h_q, s_q)
    lse_strides: tuple  # FlashMLA's layout: by query token (lse_layout)
    accum_elems: int  # the split query tokens' fragments' partials (SparsePlan.workspace_elems)
    num_splits: torch.Tensor  # the combine kernel's fragment offsets (SparsePlan.fragment_offsets)
    plan: SparsePlan
    num_sms: int
    device_index: int
    has_extra: bool  # an extra cache
    extra_topk: int


def sparse_launch(problem: SparseDecodeProblem, device: torch.device) -> SparseLaunch:
    b, s_q, h_q = problem.b, problem.s_q, problem.h_q
    num_sms = runtime.num_sms(device.index)
    plan = plan_splits(b, s_q, h_q, problem.topk + problem.extra_topk, num_sms)
    has_extra = problem.extra_topk > 0
    return SparseLaunch(
        # Two head tiles a query token: the pair kernel, whose CTAs share their K tiles.
        fn=compile_mod.get(compile_mod.sparse_decode_variant(problem.layout.key, has_extra,
                                                             pair_heads=problem.head_tiles == 2)),
        layout=problem.layout,
        out_shape=(b, s_q, h_q, fp8_cache.VALUE_DIM),
        lse_shape=(b, h_q, s_q),
        lse_strides=lse_strides(b, h_q, s_q, by_query_token=True),
        accum_elems=plan.workspace_elems(b, s_q, h_q),
        num_splits=split_offsets(b, plan, device),
        plan=plan,
        num_sms=num_sms,
        device_index=device.index,
        has_extra=has_extra,
        extra_topk=problem.extra_topk,
    )


def launch_sparse(launch: SparseLaunch, plan, q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
                  extra_indices, extra_topk_length, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the sparse kernel (and its combine); returns ``(out, lse)``. The split
    workspace is kept on ``plan`` (``runtime.split_workspace``). The compiled function
    raises (and launches nothing) on arguments that do not match what it was compiled
    for."""
    accum = runtime.split_workspace(plan, launch.accum_elems, launch.device_index)
    out = q.new_empty(launch.out_shape)
    lse = accum.new_empty_strided(launch.lse_shape, launch.lse_strides)
    no_length, no_sink = _absent(q.device)
    # The kernel reads the caches' bytes (any of the checks' one-byte dtypes) and makes
    # its own views of them.
    k_bytes = k_cache.view(torch.uint8)
    if launch.has_extra:
        extra_bytes = extra_k_cache.view(torch.uint8)
    else:
        # Stand-ins of the right kinds, never read (extra_topk is 0).
        extra_bytes, extra_indices = k_bytes, indices
    launch.fn(*SparseDecodeArgs(
        q=q, k_cache=k_bytes, indices=indices,
        topk_length=no_length if topk_length is None else topk_length,
        extra_k_cache=extra_bytes, extra_indices=extra_indices,
        extra_topk_length=no_length if extra_topk_length is None else extra_topk_length,
        sink=no_sink if attn_sink is None else attn_sink,
        o=out, lse=lse, accum=accum, num_splits=launch.num_splits,
        softmax_scale=softmax_scale, has_topk_length=int(topk_length is not None),
        has_sink=int(attn_sink is not None), extra_topk=launch.extra_topk,
        has_extra_topk_length=int(extra_topk_length is not None), whole_batches=launch.plan.whole_batches,
        topk_splits=launch.plan.splits, num_sms=launch.num_sms,
    ))
    return out, lse
