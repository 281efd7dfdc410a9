"""The memory layout of the ``lse`` a call returns: FlashMLA's, so that code written for
FlashMLA may view or reshape it as it does there.

``lse`` is ``[b, h_q, s_q]`` either way. FlashMLA's sparse calls, and its dense calls with
one KV head, return it as a transposed view of memory ordered ``[b, s_q, h_q]`` (each query
token's heads side by side); its dense calls with several KV heads return it contiguous.
The kernels write ``lse`` through whatever strides it has, so the layout is the host's
choice, made when it allocates the tensor (``empty_lse``), and the CPU references'
results are brought to it (``in_layout``).
"""

from __future__ import annotations

import torch


def lse_strides(b: int, h_q: int, s_q: int, by_query_token: bool) -> tuple[int, int, int]:
    """``lse [b, h_q, s_q]``'s strides: memory ``[b, s_q, h_q]`` where ``by_query_token``."""
    return (s_q * h_q, 1, h_q) if by_query_token else (h_q * s_q, s_q, 1)


def dense_by_query_token(h_kv: int) -> bool:
    """Whether a dense call's ``lse`` is laid out by query token (as FlashMLA's is with one
    KV head); sparse calls' always is."""
    return h_kv == 1


def empty_lse(b: int, h_q: int, s_q: int, by_query_token: bool, device) -> torch.Tensor:
    return torch.empty_strided((b, h_q, s_q), lse_strides(b, h_q, s_q, by_query_token), dtype=torch.float32,
                               device=device)


def in_layout(lse: torch.Tensor, by_query_token: bool) -> torch.Tensor:
    """``lse`` in that layout: itself where it already is, else a copy."""
    b, h_q, s_q = lse.shape
    if lse.stride() == lse_strides(b, h_q, s_q, by_query_token):
        return lse
    laid_out = empty_lse(b, h_q, s_q, by_query_token, lse.device)
    laid_out.copy_(lse)
    return laid_out
