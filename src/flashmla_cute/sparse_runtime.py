"""Launches the sparse decode kernel on torch's current CUDA stream, for arguments that
``sparse_checks`` has validated. Outputs are allocated with torch; there is no host
synchronization, so a call can be captured in a CUDA graph (after a first call outside
the capture has compiled the kernel)."""

from __future__ import annotations

import torch

from . import compile as compile_mod
from . import fp8_cache, runtime, scheduler
from .launch_args import SparseDecodeArgs
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


def kernel_cache_views(k_cache: torch.Tensor, layout: fp8_cache.Fp8Layout, num_blocks: int,
                       page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache as the kernel reads it: uint8 ``[num_blocks, page_size, row bytes]``, each
    token's latent and rope bytes, and ``[num_blocks, page_size, scale bytes]``, its
    scales: for V3.2 both inside the token's 656 bytes (scales at byte 512), for MODEL1
    the page's 576-byte token rows and, after them, its 8-byte scale rows. (The page
    stride of a cache of one page is never used.)"""
    raw = k_cache.view(torch.uint8)
    page_stride = raw.stride(0) if num_blocks > 1 else page_size * layout.bytes_per_token
    base = raw.storage_offset()
    if layout is fp8_cache.V32:
        token_stride, scales_at, scale_stride = layout.bytes_per_token, fp8_cache.SCALES_OFFSET, layout.bytes_per_token
    else:
        token_stride, scales_at, scale_stride = layout.row_bytes, page_size * layout.row_bytes, layout.scale_bytes
    rows = raw.as_strided((num_blocks, page_size, layout.row_bytes), (page_stride, token_stride, 1), base)
    scales = raw.as_strided((num_blocks, page_size, layout.scale_bytes), (page_stride, scale_stride, 1),
                            base + scales_at)
    return rows, scales


def split_offsets(b: int, plan: SparsePlan, device: torch.device) -> torch.Tensor:
    """``num_splits`` of the combine kernel for ``plan`` (``SparsePlan.fragment_offsets``),
    kept per shape so that calls allocate and launch nothing for it."""
    key = (device.type, device.index, b, plan)
    offsets = _split_offsets.get(key)
    if offsets is None:
        offsets = torch.tensor(plan.fragment_offsets(b), dtype=torch.int32, device=device)
        _split_offsets[key] = offsets
    return offsets


def gpu_sparse_decode(problem: SparseDecodeProblem, q, k_cache, indices, topk_length, attn_sink,
                      extra_k_cache=None, extra_indices=None, extra_topk_length=None):
    b, s_q, h_q = problem.b, problem.s_q, problem.h_q
    out = torch.empty(b, s_q, h_q, fp8_cache.VALUE_DIM, dtype=torch.bfloat16, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    no_length, no_sink = _absent(q.device)
    num_sms = runtime.num_sms(q.device.index)
    plan = plan_splits(b, s_q, h_q, problem.topk + problem.extra_topk, num_sms)
    # The fragments' partials (read by the combine kernel only for split sequences).
    fragments = plan.num_fragments(b) if plan.splits > 1 else 1
    accum = lse.new_empty(scheduler.accumulator_elems(fragments, 1, s_q * h_q, fp8_cache.VALUE_DIM))
    k, k_scales = kernel_cache_views(k_cache, problem.layout, problem.num_blocks, problem.page_size)
    if extra_k_cache is None:
        # Stand-ins of the right kinds, never read (extra_topk is 0).
        extra_k, extra_k_scales, extra_indices = k, k_scales, indices
    else:
        extra_k, extra_k_scales = kernel_cache_views(extra_k_cache, problem.layout, problem.extra_num_blocks,
                                                     problem.extra_page_size)
    kernel = compile_mod.get(compile_mod.sparse_decode_variant(problem.layout.key, extra_k_cache is not None))
    kernel(*SparseDecodeArgs(
        q=q, k=k, k_scales=k_scales, indices=indices,
        topk_length=no_length if topk_length is None else topk_length,
        extra_k=extra_k, extra_k_scales=extra_k_scales, extra_indices=extra_indices,
        extra_topk_length=no_length if extra_topk_length is None else extra_topk_length,
        sink=no_sink if attn_sink is None else attn_sink,
        o=out, lse=lse, accum=accum, num_splits=split_offsets(b, plan, q.device),
        softmax_scale=problem.softmax_scale, has_topk_length=int(topk_length is not None),
        has_sink=int(attn_sink is not None), extra_topk=problem.extra_topk,
        has_extra_topk_length=int(extra_topk_length is not None), whole_batches=plan.whole_batches,
        topk_splits=plan.splits, num_sms=num_sms,
    ))
    return out, lse

