"""The FP8 KV cache layouts of sparse decoding (DeepSeek-V3.2's and MODEL1's), and their
quantization in PyTorch.

V3.2
----

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
(latent then rope) and its value the 512 latent ones.

MODEL1
------
A token's key is 512 values, 448 latent ones quantized in 7 groups of 64 and 64 rope
ones in bfloat16; its value is the whole key. A page of ``page_size`` tokens holds, in
this order::

    page_size rows of 576 bytes   448 float8_e4m3fn latent values, then 64 bfloat16 rope values
    page_size rows of 8 bytes     7 ue8m0 scales (the power of two 2 ** (byte - 127)), 1 unused

and is padded to a multiple of 576 bytes. The tensor is ``[num_blocks, page_size, 1, 584]``
(584 bytes a token: 576 + 8), a view whose page stride is the padded page
(``k_cache.stride(0) >= page_size * 584``); a token's bytes are not its row of that view,
only the page's bytes together are. The scales are found as for V3.2 (rounded up to
powers of two).

Layouts are told apart by the last dimension (``layout_of``). These functions run on any
device torch supports.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .checks import _check_tensor, type_name

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

NON_FINITE_EXPONENT = 128.0
"""The scale exponent of a group holding inf or NaN: 2**128 is inf in float32, and as a
UE8M0 byte (the exponent plus 127) it is 255, the format's NaN."""

CACHE_DTYPES = (torch.float8_e4m3fn, torch.int8, torch.uint8)
"""dtypes a V3.2 FP8 cache may be viewed as."""


def _scale_exponents(latent: torch.Tensor, group_size: int) -> torch.Tensor:
    """The exponents ``e`` of the power-of-two scales ``2 ** e`` (float32 ``[..., groups]``)
    of latent values ``[..., groups * group_size]``: each group's largest magnitude over
    ``FP8_MAX``, floored at ``MIN_SCALED_AMAX``, rounded up to a power of two."""
    amax = latent.float().abs().unflatten(-1, (-1, group_size)).amax(dim=-1)
    exponents = torch.ceil(torch.log2(torch.clamp_min(amax / FP8_MAX, MIN_SCALED_AMAX)))
    # A group holding inf or NaN gets the scale 2**128, inf in float32 (MODEL1's byte 255):
    # the whole group then reads back NaN, as V3.2's float scale of inf makes it, rather
    # than its finite values scaled by whatever a non-finite exponent would cast to.
    return torch.where(torch.isfinite(amax), exponents, NON_FINITE_EXPONENT)


def _check_kv(kv, head_dim: int) -> None:
    """``kv`` is a floating-point ``[num_blocks, page_size, 1, head_dim]`` tensor."""
    _check_tensor("kv", kv)
    if not kv.is_floating_point():
        raise TypeError(f"kv must have a floating-point dtype, got {kv.dtype}")
    if kv.dim() != 4 or kv.shape[2] != 1 or kv.shape[3] != head_dim:
        raise ValueError(f"kv must have shape [num_blocks, page_size, 1, {head_dim}], got {tuple(kv.shape)}")


def quantize_v32_kv_cache(kv: torch.Tensor) -> torch.Tensor:
    """Quantize a ``[num_blocks, page_size, 1, 576]`` cache (bfloat16, or any float
    dtype: the rope part is stored as bfloat16) into the V3.2 FP8 layout.

    Returns a contiguous float8_e4m3fn tensor ``[num_blocks, page_size, 1, 656]`` on
    ``kv``'s device (view it as uint8 to read the bytes). A scale group holding inf or
    NaN reads back NaN, all of it (in both layouts).
    """
    _check_kv(kv, HEAD_DIM)
    num_blocks, page_size = kv.shape[:2]
    latent = kv[..., :LATENT_DIM].float()
    scales = torch.exp2(_scale_exponents(latent, GROUP_SIZE))  # [num_blocks, page_size, 1, NUM_GROUPS]
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
    raw = v32_cache_bytes(cache, "cache")
    latent = raw[..., :SCALES_OFFSET].view(torch.float8_e4m3fn).float()
    scales = raw[..., SCALES_OFFSET:ROPE_OFFSET].contiguous().view(torch.float32)
    rope = raw[..., ROPE_OFFSET:].contiguous().view(torch.bfloat16)
    values = (latent.unflatten(-1, (NUM_GROUPS, GROUP_SIZE)) * scales[..., None]).flatten(-2)
    return torch.cat([values.to(torch.bfloat16), rope], dim=-1)


def v32_cache_bytes(cache: torch.Tensor, name: str = "k_cache") -> torch.Tensor:
    """``cache`` viewed as uint8 ``[num_blocks, page_size, 1, 656]``; TypeError or
    ValueError (naming the argument ``name``) unless it is a V3.2 FP8 cache."""
    _check_cache_tensor(cache, BYTES_PER_TOKEN, "V3.2", name)
    return cache.view(torch.uint8)


# ------------------------------------------------------------------------ MODEL1

MODEL1_LATENT_DIM = 448
MODEL1_HEAD_DIM = MODEL1_LATENT_DIM + ROPE_DIM
"""Key (and value) width of MODEL1: 512."""

MODEL1_GROUP_SIZE = 64
MODEL1_NUM_GROUPS = MODEL1_LATENT_DIM // MODEL1_GROUP_SIZE  # 7
MODEL1_ROW_BYTES = MODEL1_LATENT_DIM + ROPE_DIM * ROPE_BYTES
"""576: a token's latent and rope bytes, one row of the page's first part."""
MODEL1_SCALE_ROW_BYTES = 8
"""A token's 7 ue8m0 scales and one unused byte, one row of the page's second part."""
MODEL1_BYTES_PER_TOKEN = MODEL1_ROW_BYTES + MODEL1_SCALE_ROW_BYTES
"""584: the last dimension of a MODEL1 cache tensor."""
MODEL1_PAGE_ALIGN = 576
"""A page's bytes are padded to a multiple of this."""

UE8M0_BIAS = 127


def model1_page_bytes(page_size: int) -> int:
    """Bytes of one padded MODEL1 page (``k_cache.stride(0)`` of ``quantize_model1_kv_cache``)."""
    if isinstance(page_size, bool) or not isinstance(page_size, numbers.Integral):
        raise TypeError(f"page_size must be an int, got {type_name(page_size)}")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    return -(-page_size * MODEL1_BYTES_PER_TOKEN // MODEL1_PAGE_ALIGN) * MODEL1_PAGE_ALIGN


def quantize_model1_kv_cache(kv: torch.Tensor) -> torch.Tensor:
    """Quantize a ``[num_blocks, page_size, 1, 512]`` cache (bfloat16, or any float dtype)
    into the MODEL1 FP8 layout.

    Returns a float8_e4m3fn view ``[num_blocks, page_size, 1, 584]`` with page stride
    ``model1_page_bytes(page_size)``, on ``kv``'s device. A scale group holding inf or
    NaN reads back NaN, all of it (in both layouts).
    """
    _check_kv(kv, MODEL1_HEAD_DIM)
    num_blocks, page_size = kv.shape[:2]
    latent = kv[:, :, 0, :MODEL1_LATENT_DIM].float()
    exponents = _scale_exponents(latent, MODEL1_GROUP_SIZE)
    scales = torch.exp2(exponents)  # [num_blocks, page_size, 7]
    quantized = (latent.unflatten(-1, (MODEL1_NUM_GROUPS, MODEL1_GROUP_SIZE)) / scales[..., None]).flatten(-2)
    pages = torch.zeros(num_blocks, model1_page_bytes(page_size), dtype=torch.uint8, device=kv.device)
    rows = pages[:, : page_size * MODEL1_ROW_BYTES].view(num_blocks, page_size, MODEL1_ROW_BYTES)
    rows[..., :MODEL1_LATENT_DIM] = quantized.to(torch.float8_e4m3fn).view(torch.uint8)
    rows[..., MODEL1_LATENT_DIM:] = kv[:, :, 0, MODEL1_LATENT_DIM:].to(torch.bfloat16).contiguous().view(torch.uint8)
    scale_rows = pages[:, page_size * MODEL1_ROW_BYTES : page_size * MODEL1_BYTES_PER_TOKEN]
    scale_rows = scale_rows.view(num_blocks, page_size, MODEL1_SCALE_ROW_BYTES)
    scale_rows[..., :MODEL1_NUM_GROUPS] = (exponents + UE8M0_BIAS).to(torch.uint8)
    view = pages[:, : page_size * MODEL1_BYTES_PER_TOKEN].view(num_blocks, page_size, 1, MODEL1_BYTES_PER_TOKEN)
    return view.view(torch.float8_e4m3fn)


def page_stride_of(cache: torch.Tensor, bytes_per_token: int) -> int:
    """Bytes from one page of ``cache`` (``[num_blocks, page_size, ...]``) to the next: its
    stride, or for a cache of one page, whose page stride is never used and may be
    anything, the pages packed (``page_size * bytes_per_token``)."""
    return cache.stride(0) if cache.shape[0] > 1 else cache.shape[1] * bytes_per_token


def model1_token_bytes(
    cache: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes of tokens ``slots`` of pages ``pages`` (integer tensors of one shape
    ``[...]``, in range) of a MODEL1 cache: ``(rows [..., 576], scales [..., 8])`` uint8."""
    rows, scales = page_parts(model1_cache_bytes(cache, "cache"), MODEL1)
    return rows[pages, slots], scales[pages, slots]


def dequantize_model1_tokens(rows: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The bfloat16 keys ``[..., 512]`` of MODEL1 token bytes (``model1_token_bytes``):
    latent values ``fp8 * 2 ** (scale byte - 127)`` rounded once to bfloat16, rope copied."""
    latent = rows[..., :MODEL1_LATENT_DIM].contiguous().view(torch.float8_e4m3fn).float()
    group_scales = torch.exp2(scales[..., :MODEL1_NUM_GROUPS].float() - UE8M0_BIAS)
    values = (latent.unflatten(-1, (MODEL1_NUM_GROUPS, MODEL1_GROUP_SIZE)) * group_scales[..., None]).flatten(-2)
    rope = rows[..., MODEL1_LATENT_DIM:].contiguous().view(torch.bfloat16)
    return torch.cat([values.to(torch.bfloat16), rope], dim=-1)


def dequantize_model1_kv_cache(cache: torch.Tensor) -> torch.Tensor:
    """The bfloat16 keys ``[num_blocks, page_size, 1, 512]`` of a MODEL1 FP8 cache."""
    return dequantize_model1_tokens(*page_parts(model1_cache_bytes(cache, "cache"), MODEL1))[:, :, None, :]


def model1_cache_bytes(cache: torch.Tensor, name: str = "k_cache") -> torch.Tensor:
    """``cache`` viewed as uint8 ``[num_blocks, page_size, 1, 584]``; TypeError or
    ValueError (naming the argument ``name``) unless it is a MODEL1 FP8 cache whose pages
    do not overlap."""
    _check_cache_tensor(cache, MODEL1_BYTES_PER_TOKEN, "MODEL1", name)
    num_blocks, page_size = cache.shape[:2]
    if cache.stride(3) != 1 or (page_size > 1 and cache.stride(1) != MODEL1_BYTES_PER_TOKEN) or (
        num_blocks > 1 and cache.stride(0) < page_size * MODEL1_BYTES_PER_TOKEN
    ):
        raise ValueError(
            f"{name} must be a MODEL1 cache view: strides (page stride >= page_size * {MODEL1_BYTES_PER_TOKEN}, "
            f"{MODEL1_BYTES_PER_TOKEN}, any, 1), got {tuple(cache.stride())}"
        )
    return cache.view(torch.uint8)


def _check_cache_tensor(cache, bytes_per_token: int, layout_name: str, name: str) -> None:
    _check_tensor(name, cache)
    if cache.dtype not in CACHE_DTYPES:
        raise TypeError(f"{name} must have dtype torch.float8_e4m3fn, torch.int8 or torch.uint8, got {cache.dtype}")
    if cache.dim() != 4 or cache.shape[2] != 1 or cache.shape[3] != bytes_per_token:
        raise ValueError(
            f"{name} must have shape [num_blocks, page_size, 1, {bytes_per_token}] (the {layout_name} FP8 layout), "
            f"got {tuple(cache.shape)}"
        )


# ------------------------------------------------------------------------ both


@dataclass(frozen=True)
class Fp8Layout:
    """What the sparse kernel and the checks need to know of a layout."""

    name: str
    key: str  # in the compiled kernel's name
    bytes_per_token: int  # the cache tensor's last dimension
    head_dim: int  # d_qk: the key's width
    latent_dim: int  # quantized values of a key
    group_size: int  # latent values per scale
    row_bytes: int  # bytes of a token's latent (and for V3.2, scales) and rope values, one after another
    rope_offset: int  # where the rope values start in that row
    scale_bytes: int  # bytes of a token's scales as the kernel reads them
    ue8m0_scales: bool  # scales are ue8m0 bytes (MODEL1) rather than float32 (V3.2)
    scale_stride: int  # bytes from one token's scales to the next one's in a page
    scales_in_rows: bool  # V3.2: a token's scales are in its row; MODEL1: in rows after the page's token rows

    def scales_offset(self, page_size: int) -> int:
        """Where a page's first token's scales are, from the page's start."""
        return SCALES_OFFSET if self.scales_in_rows else page_size * self.row_bytes


V32 = Fp8Layout("V3.2", "v32", BYTES_PER_TOKEN, HEAD_DIM, LATENT_DIM, GROUP_SIZE, BYTES_PER_TOKEN, ROPE_OFFSET,
                NUM_GROUPS * SCALE_BYTES, False, BYTES_PER_TOKEN, True)
MODEL1 = Fp8Layout("MODEL1", "model1", MODEL1_BYTES_PER_TOKEN, MODEL1_HEAD_DIM, MODEL1_LATENT_DIM, MODEL1_GROUP_SIZE,
                   MODEL1_ROW_BYTES, MODEL1_LATENT_DIM, MODEL1_SCALE_ROW_BYTES, True, MODEL1_SCALE_ROW_BYTES, False)
LAYOUTS = (V32, MODEL1)

VALUE_DIM = 512
"""Width of the values in both layouts: V3.2's 512 latent values, MODEL1's whole key."""


def layout_of(cache: torch.Tensor, name: str = "k_cache") -> Fp8Layout:
    """The layout of an FP8 cache tensor, from its last dimension (656: V3.2, 584:
    MODEL1); TypeError or ValueError naming ``name`` otherwise."""
    _check_tensor(name, cache)
    for layout in LAYOUTS:
        if cache.dim() == 4 and cache.shape[3] == layout.bytes_per_token:
            return layout
    raise ValueError(
        f"{name} must have shape [num_blocks, page_size, 1, {BYTES_PER_TOKEN}] (V3.2 FP8 layout) or "
        f"[num_blocks, page_size, 1, {MODEL1_BYTES_PER_TOKEN}] (MODEL1), got {tuple(cache.shape)}"
    )


def page_parts(raw: torch.Tensor, layout: Fp8Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache's bytes (``cache_bytes``) as the kernel reads them (its fetch finds the
    same bytes, ``SparseDecodeSm90.token_bytes``), two writable uint8 views:
    ``[num_blocks, page_size, row bytes]``, each token's latent and rope bytes, and
    ``[num_blocks, page_size, scale bytes]``, its scales. For V3.2 both lie inside the
    token's 656 bytes (the rows are the whole tokens, scales at byte 512); for MODEL1 a
    page holds its 576-byte token rows and, after them, its 8-byte scale rows. (The page
    stride of a cache of one page is never used.)"""
    num_blocks, page_size = raw.shape[:2]
    page_stride = page_stride_of(raw, layout.bytes_per_token)
    base = raw.storage_offset()
    rows = raw.as_strided((num_blocks, page_size, layout.row_bytes), (page_stride, layout.row_bytes, 1), base)
    scales = raw.as_strided((num_blocks, page_size, layout.scale_bytes), (page_stride, layout.scale_stride, 1),
                            base + layout.scales_offset(page_size))
    return rows, scales


def _check_layout(layout) -> None:
    if not any(layout is known for known in LAYOUTS):
        raise TypeError(f"layout must be fp8_cache.V32 or fp8_cache.MODEL1, got {layout!r}")


def quantize_kv_cache(kv: torch.Tensor, layout: Fp8Layout) -> torch.Tensor:
    """``kv [num_blocks, page_size, 1, layout.head_dim]`` quantized into ``layout``
    (``quantize_v32_kv_cache`` or ``quantize_model1_kv_cache``)."""
    _check_layout(layout)
    return quantize_v32_kv_cache(kv) if layout is V32 else quantize_model1_kv_cache(kv)


def cache_bytes(cache: torch.Tensor, layout: Fp8Layout, name: str = "k_cache") -> torch.Tensor:
    """``cache`` as uint8, checked against ``layout`` (see ``v32_cache_bytes`` and
    ``model1_cache_bytes``); errors name the argument ``name``."""
    _check_layout(layout)
    return v32_cache_bytes(cache, name) if layout is V32 else model1_cache_bytes(cache, name)


def dequantize_tokens(cache: torch.Tensor, layout: Fp8Layout, pages: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The bfloat16 keys ``[..., head_dim]`` of tokens ``slots`` of pages ``pages``."""
    return dequantize_token_bytes(cache_bytes(cache, layout, "cache"), layout, pages, slots)


def dequantize_token_bytes(raw: torch.Tensor, layout: Fp8Layout, pages: torch.Tensor,
                           slots: torch.Tensor) -> torch.Tensor:
    """``dequantize_tokens`` of a cache's checked bytes (``cache_bytes``)."""
    if layout is V32:
        tokens = raw[pages, slots, 0]
        return dequantize_v32_kv_cache(tokens.reshape(-1, 1, 1, BYTES_PER_TOKEN)).reshape(*pages.shape, HEAD_DIM)
    rows, scales = page_parts(raw, MODEL1)
    return dequantize_model1_tokens(rows[pages, slots], scales[pages, slots])
