"""Merging two attention results computed over disjoint parts of the same keys.

Attention over keys ``K = K_a ∪ K_b`` (disjoint) follows from the two halves' results:
with ``w_x = exp(lse_x - lse)`` and ``lse = log(exp(lse_a) + exp(lse_b))``::

    out = w_a * out_a + w_b * out_b

This is what context parallelism needs (each GPU attends to its part of a long context,
then the parts are merged), and what ``flash_mla_with_kvcache`` returns ``lse`` for.

A half that sees no key contributes nothing. FlashMLA marks such a row with
``lse = +inf`` (and ``out = 0``); the mathematical log-sum-exp of nothing is ``-inf``.
Both are read as "empty" here, whatever the row's ``out`` holds. Two empty halves give
``out = 0`` and ``lse = +inf``, FlashMLA's convention.

On a Hopper GPU, for 16- and 32-bit float results of ``dv = 512`` whose rows start on
16 bytes, the merge is one kernel (``kernels/merge_states.py``); anything else is merged
by tensor operations, on any device. Both follow the rules above, run without host
synchronization (they can be captured in a CUDA graph) and agree to the last bit or two
of the output's dtype.

A call the kernel took has its configuration remembered (out_a's shape, dtype and
device, the other tensors' devices): later calls with it go straight to the compiled
kernel, whose entry checks in C what the key leaves out (the other tensors' dtypes,
ranks and extents against out_a's, strides, 16-byte alignment) and refuses anything else
before launching; a refused call takes the checked path, which raises our own error or
merges by tensor operations. So this fast path changes what a valid call costs the
host, not its result or which calls fail.

Under ``torch.compile`` the merge is the custom op
``torch.ops.flashmla_cute.merge_attention_states``.
"""

from __future__ import annotations

import math

import torch

from . import runtime
from .checks import _check_tensor
from .compile import MERGE_HEAD_DIMS_V
from .launch_args import MergeArgs, alignment_fault
from .no_backward import without_backward


def merge_attention_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the attention results of two disjoint sets of keys into the result over both.

    Args:
        out_a, out_b: ``[b, s_q, h_q, dv]``, the same floating dtype and device, as
            ``flash_mla_with_kvcache`` returns them.
        lse_a, lse_b: float32 ``[b, h_q, s_q]``, natural-log log-sum-exp of the scaled
            scores; ``+inf`` or ``-inf`` for a row that saw no key.

    Returns:
        ``(out, lse)``: ``out [b, s_q, h_q, dv]`` in ``out_a``'s dtype and ``lse
        [b, h_q, s_q]`` float32. Computed in float32. Where one half is empty the result
        is the other half's; where both are, ``out = 0`` and ``lse = +inf``.

    Raises TypeError or ValueError, naming the argument, for mismatched shapes, dtypes
    or devices.
    """
    if torch.compiler.is_compiling():
        return torch.ops.flashmla_cute.merge_attention_states(out_a, lse_a, out_b, lse_b)
    try:  # the fast path
        merge_fn = _known_merges[_merge_key(out_a, lse_a, out_b, lse_b)]
        result = _launch(merge_fn, out_a, lse_a, out_b, lse_b)
    except Exception:  # first call of this configuration, one the kernel does not take, or a bad argument
        result = None
    if result is None:
        result = _checked_merge(out_a, lse_a, out_b, lse_b)
    if out_a.requires_grad or lse_a.requires_grad or out_b.requires_grad or lse_b.requires_grad:
        return without_backward("merge_attention_states", result, out_a, lse_a, out_b, lse_b)
    return result


# _merge_key -> the compiled merge, for configurations the checks passed and the kernel took.
_known_merges: dict[tuple, object] = {}


def _merge_key(out_a, lse_a, out_b, lse_b) -> tuple:
    return (out_a.shape, out_a.dtype, out_a.get_device(), lse_a.get_device(), out_b.get_device(),
            lse_b.get_device())


def _checked_merge(out_a, lse_a, out_b, lse_b):
    _check(out_a, lse_a, out_b, lse_b)
    if not _kernel_merges(out_a, out_b):
        return _merge_with_tensor_operations(out_a, lse_a, out_b, lse_b)
    merge_fn = runtime.merge_fn(out_a.dtype, out_a.shape[-1])
    result = _launch(merge_fn, out_a, lse_a, out_b, lse_b)
    runtime.remember(_known_merges, _merge_key(out_a, lse_a, out_b, lse_b), merge_fn)
    return result


def _launch(merge_fn, out_a, lse_a, out_b, lse_b):
    """The merge kernel into fresh outputs (its entry refuses, before launching, what it
    was not compiled for)."""
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=out_a.device)
    merge_fn(*MergeArgs(out_a, lse_a, out_b, lse_b, out, lse))
    return out, lse


def _kernel_merges(out_a: torch.Tensor, out_b: torch.Tensor) -> bool:
    """Whether the merge kernel takes these results: on a Hopper GPU, in a dtype and with a
    ``dv`` it is built for, every row starting on 16 bytes (its loads and stores are of 16
    bytes). A dimension of size 1 may have any stride, as the compiled entry's check
    allows (its stride is never used): the fast path, which that check guards, and the
    checked path take the same calls to the kernel."""
    if out_a.device.type != "cuda" or out_a.numel() == 0:
        return False
    if out_a.dtype not in runtime.MERGE_DTYPE_NAMES or out_a.shape[-1] not in MERGE_HEAD_DIMS_V:
        return False
    if not runtime.is_hopper(runtime.index_of(out_a.device)):
        return False
    row_dims = [dim for dim in range(out_a.dim() - 1) if out_a.shape[dim] > 1]
    return all(t.stride(-1) == 1 and alignment_fault(t, row_dims) is None for t in (out_a, out_b))


@torch.no_grad()  # as the kernel's outputs: no_backward
def _merge_with_tensor_operations(out_a, lse_a, out_b, lse_b):
    """The merge on any device, for any floating dtype and ``dv``."""
    # Both halves side by side, lse brought to out's row order ([2, b, s_q, h_q]), so that
    # every step is one tensor operation for both: at decode sizes the merge's time is its
    # operations' launches (about twenty), not their arithmetic.
    lse_rows = torch.stack((lse_a, lse_b)).transpose(2, 3)
    empty = torch.isinf(lse_rows)
    # An empty half gets weight exactly 0: its lse becomes -inf. The larger lse is
    # subtracted so that both exponentials are <= 1; where both halves are empty the shift
    # is finite instead of -inf (which would make -inf - -inf = NaN), and both weights are 0.
    lse_rows = lse_rows.masked_fill(empty, -math.inf)
    shift = lse_rows.amax(0).clamp_min(torch.finfo(torch.float32).min)
    weights = torch.exp(lse_rows - shift)
    total = weights.sum(0)  # in [1, 2] unless both are empty (then 0)
    weights = weights / total.clamp_min(torch.finfo(torch.float32).tiny)

    # An empty half's out is ignored even if it is not 0 (NaN included).
    outs = torch.stack((out_a, out_b)).float().masked_fill(empty[..., None], 0.0)
    out = (outs * weights[..., None]).sum(0).to(out_a.dtype)

    # Two empty halves: +inf. (A NaN lse makes the total NaN, and the row's lse with it.)
    lse = torch.where(empty.all(0), math.inf, shift + torch.log(total))
    return out, lse.transpose(1, 2).contiguous()


def _check(out_a, lse_a, out_b, lse_b) -> None:
    args = {"out_a": out_a, "lse_a": lse_a, "out_b": out_b, "lse_b": lse_b}
    for name, t in args.items():
        _check_tensor(name, t)
    if out_a.dim() != 4:
        raise ValueError(f"out_a must be [b, s_q, h_q, dv], got shape {tuple(out_a.shape)}")
    if not out_a.dtype.is_floating_point:
        raise TypeError(f"out_a must have a floating dtype, got {out_a.dtype}")
    b, s_q, h_q, _ = out_a.shape
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b must have out_a's shape {tuple(out_a.shape)}, got {tuple(out_b.shape)}")
    if out_b.dtype != out_a.dtype:
        raise TypeError(f"out_b must have out_a's dtype {out_a.dtype}, got {out_b.dtype}")
    lse_shape = (b, h_q, s_q)
    for name in ("lse_a", "lse_b"):
        t = args[name]
        if tuple(t.shape) != lse_shape:
            raise ValueError(f"{name} must be [b, h_q, s_q] = {lse_shape} (from out_a), got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    for name in ("lse_a", "out_b", "lse_b"):
        if args[name].device != out_a.device:
            raise ValueError(f"{name} must be on out_a's device {out_a.device}, got {args[name].device}")
