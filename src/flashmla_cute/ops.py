"""``torch.library`` custom ops for the public functions, so that a decode step
compiled with ``torch.compile(fullgraph=True)`` calls our kernels.

This module sits on top of ``interface`` and ``merge``: the ops run the public functions (which,
outside tracing, do the work), and nothing in the package imports this module back.
The package's ``__init__`` imports it last, which registers the ops; while
torch.compile traces, the public functions look them up on ``torch.ops`` (eager calls
go straight to the implementation and skip the dispatcher's per-call cost). The fake
implementations give output shapes and dtypes without running anything, and never fail:
a bad tensor argument is refused when the op runs, with the eager call's exception.
(The Python scalars are checked by the public functions before the ops' schemas
convert them.)
"""

from __future__ import annotations

from typing import Optional

import torch

from . import interface, merge, scheduler
from .lse_layout import dense_by_query_token, empty_lse

NAMESPACE = "flashmla_cute"


@torch.library.custom_op(f"{NAMESPACE}::get_mla_metadata", mutates_args=())
def get_mla_metadata_op(
    cache_seqlens: torch.Tensor, num_heads_per_head_k: int, num_heads_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return interface.get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)


@get_mla_metadata_op.register_fake
def _(cache_seqlens, num_heads_per_head_k, num_heads_k):
    parts = interface.num_sm_parts_for(cache_seqlens.device, num_heads_per_head_k, num_heads_k)
    meta = cache_seqlens.new_empty((parts, scheduler.METADATA_INTS), dtype=torch.int32)
    return meta, cache_seqlens.new_empty((cache_seqlens.shape[0] + 1,), dtype=torch.int32)


@torch.library.custom_op(f"{NAMESPACE}::flash_mla_with_kvcache", mutates_args=())
def flash_mla_with_kvcache_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    return interface.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal
    )


@flash_mla_with_kvcache_op.register_fake
def _(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
      softmax_scale=None, causal=False):
    if q.dim() != 4:  # refused when the op runs
        return q.new_empty(q.shape), q.new_empty(q.shape, dtype=torch.float32)
    b, s_q, h_q, _ = q.shape
    by_query_token = k_cache.dim() == 4 and dense_by_query_token(k_cache.shape[2])
    return q.new_empty((b, s_q, h_q, head_dim_v)), empty_lse(b, h_q, s_q, by_query_token, q.device)


@torch.library.custom_op(f"{NAMESPACE}::merge_attention_states", mutates_args=())
def merge_attention_states_op(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return merge.merge_attention_states(out_a, lse_a, out_b, lse_b)


@merge_attention_states_op.register_fake
def _(out_a, lse_a, out_b, lse_b):
    if out_a.dim() != 4:  # refused when the op runs
        return out_a.new_empty(out_a.shape), out_a.new_empty(lse_a.shape, dtype=torch.float32)
    b, s_q, h_q, _ = out_a.shape
    return out_a.new_empty(out_a.shape), out_a.new_empty((b, h_q, s_q), dtype=torch.float32)
