"""The package computes attention for inference: its functions have no backward.

As with FlashMLA's functions, a call given an input that requires grad (under grad mode)
returns outputs that require grad too, so that they take their place in an autograd
graph, and a backward through them raises a RuntimeError that names the function: a
gradient is never silently left out. The same on every device: the CPU's references,
which torch could differentiate, are computed without a graph first. (Under
``torch.compile`` the custom ops have no autograd formula, and torch refuses to compile a
graph that would need one.)
"""

from __future__ import annotations

import torch


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name: str, outputs_count: int, *tensors):
        ctx.name = name
        return tuple(t.view_as(t) for t in tensors[:outputs_count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{ctx.name} has no backward: flashmla_cute computes attention for inference only "
            f"(call it under torch.no_grad() or torch.inference_mode(), or on detached inputs)"
        )


def without_backward(name: str, outputs: tuple, *inputs) -> tuple:
    """``outputs`` (computed without an autograd graph) as they are, or, where one of
    ``inputs`` (tensors or None) requires grad under grad mode, views of them whose
    backward raises. Callers test ``requires_grad`` first, which costs the fast paths
    next to nothing."""
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        return _NoBackward.apply(name, len(outputs), *outputs, *(x for x in inputs if x is not None))
    return outputs
