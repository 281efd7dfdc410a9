"""DeepSeek-V3.2's FP8 KV cache layout, and its quantization in PyTorch.

Each token of the cache is ``BYTES_PER_TOKEN = 656`` bytes, one after another within a
page (``k_cache.stride(1) == 656``)::

    bytes   0 .. 511   512 float8_e4m3fn: the latent ("NoPE") values, quantized
    bytes 512 .. 527   4 float32 scales, one per group of 128 latent values
    bytes 528 .. 655   64 bfloat16: the rope values, not quantized

A latent value is ``fp8 * scale`` of its group. As in DeepSeek's cache, a group's scale
is its largest magnitude over the largest float8_e4m3fn value (448), rounded up to a
power of two (so that dividing by it is exact and no value saturates); a group of zeros
gets the scale of a tiny amax (``MIN_SCALED_AMAX``), not 0, so nothing divides by 0.

The cache tensor is ``[num_blocks, page_size, 1, 656]`` of dtype float8_e4m3fn, int8 or
uint8 (only the bytes matter); the key of a token is the 576 dequantized values
(latent then rope) and its value the 512 latent ones. These functions run on any device
torch supports.
"""

from __future__ import annotations

import torch

LATENT_DIM = 512
"""Latent ("NoPE") values per token: the value vector, and the first part of the key."""

ROPE_DIM = 64
"""Rope values per token: the last part of the key, kept in bfloat16."""

HEAD_DIM = LATENT_DIM + ROPE_DIM
"""Key width ``d_qk`` (576)."""

GROUP_SIZE = 128
"""Latent values that share one scale."""

NUM_GROUPS = LATENT_DIM // GROUP_SIZE
"""Scales per token (4)."""

SCALE_BYTES = 4  # float32
ROPE_BYTES = 2  # bfloat16

SCALES_OFFSET = LATENT_DIM  # one byte per float8 latent value
ROPE_OFFSET = SCALES_OFFSET + NUM_GROUPS * SCALE_BYTES
BYTES_PER_TOKEN = ROPE_OFFSET + ROPE_DIM * ROPE_BYTES
"""656: bytes of one token in the cache."""

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""

MIN_SCALED_AMAX = 1e-4
"""Floor of ``amax / FP8_MAX`` before rounding up: all-zero groups get scale 2**-13."""

CACHE_DTYPES = (torch.float8_e4m3fn, torch.int8, torch.uint8)
"""dtypes a V3.2 FP8 cache may be viewed as."""


def _group_scales(latent: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales ``[..., NUM_GROUPS]`` (float32) of latent values ``[..., 512]``."""
    amax = latent.float().abs().unflatten(-1, (NUM_GROUPS, GROUP_SIZE)).amax(dim=-1)
    return torch.exp2(torch.ceil(torch.log2(torch.clamp_min(amax / FP8_MAX, MIN_SCALED_AMAX))))


def quantize_v32_kv_cache(kv: torch.Tensor) -> torch.Tensor:
    """Quantize a ``[num_blocks, page_size, 1, 576]`` cache (bfloat16, or any float
    dtype: the rope part is stored as bfloat16) into the V3.2 FP8 layout.

    Returns a contiguous float8_e4m3fn tensor ``[num_blocks, page_size, 1, 656]`` on
    ``kv``'s device (view it as uint8 to read the bytes).
    """
    if not isinstance(kv, torch.Tensor):
        raise TypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
    if not kv.is_floating_point():
        raise TypeError(f"kv must have a floating-point dtype, got {kv.dtype}")
    if kv.dim() != 4 or kv.shape[2] != 1 or kv.shape[3] != HEAD_DIM:
        raise ValueError(f"kv must have shape [num_blocks, page_size, 1, {HEAD_DIM}], got {tuple(kv.shape)}")
    num_blocks, page_size = kv.shape[:2]
    latent = kv[..., :LATENT_DIM].float()
    scales = _group_scales(latent)  # [num_blocks, page_size, 1, NUM_GROUPS]
    quantized = (latent.unflatten(-1, (NUM_GROUPS, GROUP_SIZE)) / scales[..., None]).flatten(-2)
    out = torch.empty(num_blocks, page_size, 1, BYTES_PER_TOKEN, dtype=torch.uint8, device=kv.device)
    out[..., :SCALES_OFFSET] = quantized.to(torch.float8_e4m3fn).view(torch.uint8)
    out[..., SCALES_OFFSET:ROPE_OFFSET] = scales.contiguous().view(torch.uint8)
    out[..., ROPE_OFFSET:] = kv[..., LATENT_DIM:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return out.view(torch.float8_e4m3fn)


def dequantize_v32_kv_cache(cache: torch.Tensor) -> torch.Tensor:
    """The bfloat16 keys ``[num_blocks, page_size, 1, 576]`` of a V3.2 FP8 cache
    ``[num_blocks, page_size, 1, 656]`` (float8_e4m3fn, int8 or uint8; the page stride
    may exceed ``page_size * 656``). Latent values are ``fp8 * scale`` rounded once to
    bfloat16; rope values are copied."""
    raw = v32_cache_bytes(cache)
    latent = raw[..., :SCALES_OFFSET].view(torch.float8_e4m3fn).float()
    scales = raw[..., SCALES_OFFSET:ROPE_OFFSET].contiguous().view(torch.float32)
    rope = raw[..., ROPE_OFFSET:].contiguous().view(torch.bfloat16)
    values = (latent.unflatten(-1, (NUM_GROUPS, GROUP_SIZE)) * scales[..., None]).flatten(-2)
    return torch.cat([values.to(torch.bfloat16), rope], dim=-1)


def v32_cache_bytes(cache: torch.Tensor) -> torch.Tensor:
    """``cache`` viewed as uint8 ``[num_blocks, page_size, 1, 656]``; TypeError or
    ValueError (naming ``k_cache``) unless it is a V3.2 FP8 cache."""
    if not isinstance(cache, torch.Tensor):
        raise TypeError(f"k_cache must be a torch.Tensor, got {type(cache).__name__}")
    if cache.dtype not in CACHE_DTYPES:
        raise TypeError(f"k_cache must have dtype torch.float8_e4m3fn, torch.int8 or torch.uint8, got {cache.dtype}")
    if cache.dim() != 4 or cache.shape[2] != 1 or cache.shape[3] != BYTES_PER_TOKEN:
        raise ValueError(
            f"k_cache must have shape [num_blocks, page_size, 1, {BYTES_PER_TOKEN}] (the V3.2 FP8 layout), "
            f"got {tuple(cache.shape)}"
        )
    return cache.view(torch.uint8)
