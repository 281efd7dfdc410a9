"""Launches the sparse decode kernel on torch's current CUDA stream, for arguments that
``sparse_checks`` has validated. Outputs are allocated with torch; there is no host
synchronization, so a call can be captured in a CUDA graph (after a first call outside
the capture has compiled the kernel)."""

from __future__ import annotations

import torch

from . import compile as compile_mod
from . import runtime, scheduler
from .fp8_cache import BYTES_PER_TOKEN, LATENT_DIM
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


def cache_as_token_rows(k_cache: torch.Tensor, problem: SparseDecodeProblem) -> torch.Tensor:
    """The cache as uint8 ``[num_blocks, page_size, 656]`` with token stride 656 (the
    stride of a dimension of size 1 is set to what the kernel expects, as it is never used)."""
    raw = k_cache.view(torch.uint8)
    page_stride = raw.stride(0) if problem.num_blocks > 1 else problem.page_size * BYTES_PER_TOKEN
    return raw.as_strided((problem.num_blocks, problem.page_size, BYTES_PER_TOKEN), (page_stride, BYTES_PER_TOKEN, 1))


def split_offsets(b: int, plan: SparsePlan, device: torch.device) -> torch.Tensor:
    """``num_splits`` of the combine kernel for ``plan`` (``SparsePlan.fragment_offsets``),
    kept per shape so that calls allocate and launch nothing for it."""
    key = (device.type, device.index, b, plan)
    offsets = _split_offsets.get(key)
    if offsets is None:
        offsets = torch.tensor(plan.fragment_offsets(b), dtype=torch.int32, device=device)
        _split_offsets[key] = offsets
    return offsets


def gpu_sparse_decode(problem: SparseDecodeProblem, q, k_cache, indices, topk_length, attn_sink):
    b, s_q, h_q = problem.b, problem.s_q, problem.h_q
    out = torch.empty(b, s_q, h_q, LATENT_DIM, dtype=torch.bfloat16, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    no_length, no_sink = _absent(q.device)
    num_sms = runtime.num_sms(q.device.index)
    plan = plan_splits(b, s_q, h_q, problem.topk, num_sms)
    # The fragments' partials (read by the combine kernel only for split sequences).
    fragments = plan.num_fragments(b) if plan.splits > 1 else 1
    accum = lse.new_empty(scheduler.accumulator_elems(fragments, 1, s_q * h_q, LATENT_DIM))
    kernel = compile_mod.get(compile_mod.sparse_decode_variant())
    kernel(*SparseDecodeArgs(
        q=q, k=cache_as_token_rows(k_cache, problem), indices=indices,
        topk_length=no_length if topk_length is None else topk_length,
        sink=no_sink if attn_sink is None else attn_sink,
        o=out, lse=lse, accum=accum, num_splits=split_offsets(b, plan, q.device),
        softmax_scale=problem.softmax_scale, has_topk_length=int(topk_length is not None),
        has_sink=int(attn_sink is not None), whole_batches=plan.whole_batches, topk_splits=plan.splits,
        num_sms=num_sms,
    ))
    return out, lse
