"""The FP8 cache layouts of sparse decoding and their quantization round trip.

V3.2: 656 bytes a token (512 fp8 latent values, 4 float32 power-of-two scales, 64
bfloat16 rope values), tokens back to back within a page. MODEL1: a page holds its
tokens' 576-byte rows (448 fp8 latent values, 64 bfloat16 rope values), then their
8-byte scale rows (7 ue8m0 power-of-two scales, one unused byte), padded to a multiple
of 576 bytes; the tensor is a ``[num_blocks, page_size, 1, 584]`` view of those pages."""

import math
import struct

import pytest
import torch

from flashmla_cute import fp8_cache
from flashmla_cute.fp8_cache import (
    MODEL1,
    V32,
    dequantize_model1_kv_cache,
    dequantize_v32_kv_cache,
    quantize_model1_kv_cache,
    quantize_v32_kv_cache,
)
from flashmla_cute.sparse_testing import page_bytes, token_byte_parts, with_page_stride

QUANTIZE = {V32: quantize_v32_kv_cache, MODEL1: quantize_model1_kv_cache}
DEQUANTIZE = {V32: dequantize_v32_kv_cache, MODEL1: dequantize_model1_kv_cache}
LAYOUTS = pytest.mark.parametrize("layout", [V32, MODEL1], ids=lambda layout: layout.name)


def random_kv(layout, num_blocks, page, seed, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(num_blocks, page, 1, layout.head_dim, generator=gen)
    # Groups of very different magnitudes, so that the scales differ.
    num_groups = layout.latent_dim // layout.group_size
    kv[..., : layout.latent_dim] *= torch.exp2(
        torch.randint(-8, 8, (num_blocks, page, 1, num_groups), generator=gen).float()
    ).repeat_interleave(layout.group_size, dim=-1)
    return (kv * spread).to(torch.bfloat16)


def token_fields(cache, layout):
    """``(latent [..., latent_dim] fp8 values as float32, scales [..., groups] float32)``
    of every token ``[num_blocks, page_size]``, read from the bytes as the layout places them."""
    if layout is V32:
        (raw,) = token_byte_parts(cache, V32)
        latent = raw[..., : fp8_cache.SCALES_OFFSET]
        scales = raw[..., fp8_cache.SCALES_OFFSET : fp8_cache.ROPE_OFFSET].contiguous().view(torch.float32)
    else:
        rows, scale_rows = token_byte_parts(cache, MODEL1)
        latent = rows[..., : fp8_cache.MODEL1_LATENT_DIM]
        scales = torch.exp2(scale_rows[..., : fp8_cache.MODEL1_NUM_GROUPS].float() - fp8_cache.UE8M0_BIAS)
    return latent.contiguous().view(torch.float8_e4m3fn).float(), scales


def fp8_byte(value: float) -> int:
    return torch.tensor([value]).to(torch.float8_e4m3fn).view(torch.uint8).item()


def rope_bytes() -> bytes:
    """The bytes of the rope values ``i / 8 - 4`` (i < 64) in bfloat16, little-endian."""
    return torch.tensor([i / 8.0 - 4.0 for i in range(64)]).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------- both layouts


def test_constants_describe_656_bytes():
    assert fp8_cache.HEAD_DIM == 576
    assert (fp8_cache.SCALES_OFFSET, fp8_cache.ROPE_OFFSET, fp8_cache.BYTES_PER_TOKEN) == (512, 528, 656)
    assert fp8_cache.NUM_GROUPS * fp8_cache.GROUP_SIZE == fp8_cache.LATENT_DIM


def test_model1_constants_describe_576_plus_8_bytes():
    assert fp8_cache.MODEL1_HEAD_DIM == fp8_cache.VALUE_DIM == 512
    assert fp8_cache.MODEL1_NUM_GROUPS * fp8_cache.MODEL1_GROUP_SIZE == fp8_cache.MODEL1_LATENT_DIM == 448
    assert (fp8_cache.MODEL1_ROW_BYTES, fp8_cache.MODEL1_BYTES_PER_TOKEN) == (448 + 64 * 2, 576 + 8)


@pytest.mark.parametrize("page_size,padded", [(1, 576 * 2), (2, 576 * 3), (64, 576 * 65), (72, 72 * 584)])
def test_model1_pages_are_padded_to_a_multiple_of_576_bytes(page_size, padded):
    assert fp8_cache.model1_page_bytes(page_size) == padded


@pytest.mark.parametrize("layout,shape,page_stride", [
    (V32, (3, 5, 1, 656), 5 * 656),
    (MODEL1, (3, 5, 1, 584), 576 * 6),  # 5 * 584 = 2920 bytes, padded to 3456
], ids=["V3.2", "MODEL1"])
def test_shape_stride_and_dtype(layout, shape, page_stride):
    cache = QUANTIZE[layout](random_kv(layout, 3, 5, seed=0))
    assert cache.shape == shape and cache.dtype == torch.float8_e4m3fn
    assert cache.stride() == (page_stride, shape[3], shape[3], 1)
    kv = DEQUANTIZE[layout](cache)
    assert kv.shape == (3, 5, 1, layout.head_dim) and kv.dtype == torch.bfloat16


@LAYOUTS
def test_round_trip_error_bound(layout):
    kv = random_kv(layout, 4, 7, seed=1)
    cache = QUANTIZE[layout](kv)
    back = DEQUANTIZE[layout](cache).float()
    x = kv.float()
    _, scales = token_fields(cache, layout)
    scale = scales[:, :, None].repeat_interleave(layout.group_size, dim=-1)
    latent = slice(0, layout.latent_dim)
    # e4m3 keeps 3 mantissa bits (half an ulp: 1/16 relative), its subnormals are
    # spaced 2**-9 * scale apart, and the result is rounded once more to bfloat16.
    bound = x[..., latent].abs() / 16 + scale * 2.0**-10 + back[..., latent].abs() / 256
    assert bool(((back[..., latent] - x[..., latent]).abs() <= bound).all())
    # The rope part is stored as is.
    assert torch.equal(back[..., layout.latent_dim :], x[..., layout.latent_dim :])


@LAYOUTS
def test_scales_are_powers_of_two_rounded_up(layout):
    kv = random_kv(layout, 2, 9, seed=2)
    _, scales = token_fields(QUANTIZE[layout](kv), layout)
    mantissa, _ = torch.frexp(scales)
    assert bool((mantissa == 0.5).all()), "every scale is a power of two"
    amax = kv.float()[:, :, 0, : layout.latent_dim].abs().unflatten(-1, (-1, layout.group_size)).amax(-1)
    ideal = torch.clamp_min(amax / fp8_cache.FP8_MAX, fp8_cache.MIN_SCALED_AMAX)
    assert bool((scales >= ideal).all()) and bool((scales < 2 * ideal).all())


@LAYOUTS
def test_no_value_saturates(layout):
    kv = random_kv(layout, 2, 3, seed=3, spread=1000.0)
    latent, _ = token_fields(QUANTIZE[layout](kv), layout)
    assert bool(torch.isfinite(latent).all()) and float(latent.abs().max()) <= fp8_cache.FP8_MAX


@LAYOUTS
def test_zero_rows(layout):
    kv = torch.zeros(1, 2, 1, layout.head_dim, dtype=torch.bfloat16)
    cache = QUANTIZE[layout](kv)
    assert torch.equal(DEQUANTIZE[layout](cache), kv)
    latent, scales = token_fields(cache, layout)
    assert bool((scales == 2.0 ** math.ceil(math.log2(fp8_cache.MIN_SCALED_AMAX))).all())
    assert bool((latent == 0).all())


@LAYOUTS
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_group_holding_inf_or_nan_reads_back_nan_and_no_other_group_changes(layout, bad):
    kv = random_kv(layout, 2, 3, seed=8)
    spoiled = kv.clone()
    spoiled[1, 2, 0, 5] = bad  # in the first scale group
    back = DEQUANTIZE[layout](QUANTIZE[layout](spoiled))
    assert bool(back[1, 2, 0, :layout.group_size].isnan().all())
    expected = DEQUANTIZE[layout](QUANTIZE[layout](kv))
    assert torch.equal(back[1, 2, 0, layout.group_size:], expected[1, 2, 0, layout.group_size:])
    assert torch.equal(back[:1], expected[:1])


@LAYOUTS
def test_dequantize_reads_a_padded_page_stride_of_any_byte_dtype(layout):
    cache = QUANTIZE[layout](random_kv(layout, 3, 4, seed=4))
    padded = with_page_stride(cache, cache.stride(0) + 1000)  # not a whole number of tokens
    expected = DEQUANTIZE[layout](cache)
    for view in (padded, padded.view(torch.int8), padded.view(torch.float8_e4m3fn)):
        assert torch.equal(DEQUANTIZE[layout](view), expected)


@LAYOUTS
def test_dequantize_tokens_gathers_the_named_tokens(layout):
    cache = QUANTIZE[layout](random_kv(layout, 5, 3, seed=6))
    gen = torch.Generator().manual_seed(6)
    pages = torch.randint(0, 5, (4, 7), generator=gen)
    slots = torch.randint(0, 3, (4, 7), generator=gen)
    keys = fp8_cache.dequantize_tokens(cache, layout, pages, slots)
    assert keys.shape == (4, 7, layout.head_dim)
    assert torch.equal(keys, DEQUANTIZE[layout](cache)[pages, slots, 0])


@pytest.mark.parametrize("last_dim,layout", [(656, V32), (584, MODEL1)])
def test_layout_of_tells_the_layouts_apart_by_the_last_dimension(last_dim, layout):
    assert fp8_cache.layout_of(torch.zeros(2, 3, 1, last_dim, dtype=torch.uint8)) is layout


def test_a_layout_must_be_one_of_the_two():
    kv = torch.zeros(1, 2, 1, 576)
    for layout in ("v32", None, fp8_cache.V32.name):
        with pytest.raises(TypeError, match=r"layout must be fp8_cache.V32 or fp8_cache.MODEL1, got"):
            fp8_cache.quantize_kv_cache(kv, layout)
        with pytest.raises(TypeError, match=r"layout must be fp8_cache.V32 or fp8_cache.MODEL1, got"):
            fp8_cache.cache_bytes(torch.zeros(1, 2, 1, 656, dtype=torch.uint8), layout)
    with pytest.raises(TypeError, match="k_cache must be a torch.Tensor, got list"):
        fp8_cache.layout_of([656])
    with pytest.raises(TypeError, match="kv must be a torch.Tensor, got numpy.ndarray"):
        fp8_cache.quantize_kv_cache(kv.numpy(), fp8_cache.V32)
    with pytest.raises(ValueError, match=r"kv must be a strided \(dense\) tensor, got layout torch.sparse_coo"):
        fp8_cache.quantize_kv_cache(kv.to_sparse(), fp8_cache.V32)
    with pytest.raises(ValueError, match=r"k_cache must be a strided \(dense\) tensor, got layout torch.sparse_coo"):
        fp8_cache.layout_of(torch.zeros(1, 2, 1, 656, dtype=torch.uint8).to_sparse())


def test_layout_of_refuses_other_widths_naming_the_argument():
    with pytest.raises(ValueError, match=r"k_cache must have shape .*656.*584.*got \(2, 3, 1, 576\)"):
        fp8_cache.layout_of(torch.zeros(2, 3, 1, 576, dtype=torch.uint8))
    with pytest.raises(ValueError, match="extra_k_cache must have shape"):
        fp8_cache.layout_of(torch.zeros(2, 3, 1, 600, dtype=torch.uint8), "extra_k_cache")


# ---------------------------------------------------------------- V3.2 bytes


def test_bytes_of_one_token():
    """Byte by byte, a token with known values: latent value j of group g is a small
    multiple of that group's power-of-two scale, so it is exact in fp8."""
    kv = torch.zeros(1, 2, 1, 576)
    group_amax = [448.0, 1.0, 0.25, 3.0 * 2**-6]  # scales 1, 2**-8, 2**-10, 2**-13 (floored)
    for g, amax in enumerate(group_amax):
        kv[0, 1, 0, g * 128] = amax
        kv[0, 1, 0, g * 128 + 1] = -amax / 2
    kv[0, 1, 0, 512:] = torch.arange(64) / 8.0 - 4.0
    raw = quantize_v32_kv_cache(kv.to(torch.bfloat16)).view(torch.uint8)[0, 1, 0].tolist()
    assert len(raw) == 656

    expected = bytearray(656)
    scales = [1.0, 2.0**-8, 2.0**-10, 2.0**-13]
    for g, (amax, scale) in enumerate(zip(group_amax, scales)):
        expected[g * 128] = fp8_byte(amax / scale)
        expected[g * 128 + 1] = fp8_byte(-amax / 2 / scale)
    expected[512:528] = struct.pack("<4f", *scales)
    expected[528:656] = rope_bytes()
    assert bytes(raw) == bytes(expected)
    # 448 is the largest e4m3 value: 0 1111 110.
    assert raw[0] == 0b0_1111_110


@pytest.mark.parametrize("quantize, dequantize, key_width, bytes_per_token, other_bytes", [
    (quantize_v32_kv_cache, dequantize_v32_kv_cache, 576, 656, 584),
    (quantize_model1_kv_cache, dequantize_model1_kv_cache, 512, 584, 656),
])
def test_refusals_name_the_argument(quantize, dequantize, key_width, bytes_per_token, other_bytes):
    with pytest.raises(ValueError, match=rf"kv must have shape \[num_blocks, page_size, 1, {key_width}\]"):
        quantize(torch.zeros(1, 2, 1, 1088 - key_width))
    with pytest.raises(TypeError, match="kv must have a floating-point dtype"):
        quantize(torch.zeros(1, 2, 1, key_width, dtype=torch.int32))
    with pytest.raises(ValueError, match=rf"^cache must have shape \[num_blocks, page_size, 1, {bytes_per_token}\]"):
        dequantize(torch.zeros(1, 2, 1, other_bytes, dtype=torch.uint8))
    with pytest.raises(TypeError, match="^cache must have dtype"):
        dequantize(torch.zeros(1, 2, 1, bytes_per_token, dtype=torch.bfloat16))


# ---------------------------------------------------------------- MODEL1 bytes


def test_model1_bytes_of_a_tiny_cache():
    """Byte by byte, two pages of two tokens, every token zero but the second of the
    second page: its group g's first two latent values are amax_g and -amax_g / 2, exact
    in fp8 once divided by the group's power-of-two scale. In each page: the two 576-byte
    rows, then the two 8-byte scale rows (ue8m0: exponent + 127), then zeros up to 1728."""
    group_amax = [448.0, 1.0, 0.25, 3.0 * 2**-6, 0.0, 896.0, 960.0]
    exponents = [0, -8, -10, -13, -13, 1, 2]  # 0.25 / 448 -> 2**-10; below 1e-4 * 448 -> 2**-13
    kv = torch.zeros(2, 2, 1, 512)
    for g, amax in enumerate(group_amax):
        kv[1, 1, 0, g * 64] = amax
        kv[1, 1, 0, g * 64 + 1] = -amax / 2
    kv[1, 1, 0, 448:] = torch.arange(64) / 8.0 - 4.0
    cache = quantize_model1_kv_cache(kv.to(torch.bfloat16))
    assert cache.stride(0) == 1728

    zero_scales = bytes([127 - 13] * 7 + [0])  # a zero token's groups all get 2**-13
    row = bytearray(576)
    for g, (amax, e) in enumerate(zip(group_amax, exponents)):
        row[g * 64] = fp8_byte(amax / 2.0**e)
        row[g * 64 + 1] = fp8_byte(-amax / 2 / 2.0**e)
    row[448:576] = rope_bytes()
    scale_row = bytes([127 + e for e in exponents] + [0])
    padding = bytes(1728 - 2 * 584)
    expected_pages = [
        bytes(576) + bytes(576) + zero_scales + zero_scales + padding,
        bytes(576) + bytes(row) + zero_scales + scale_row + padding,
    ]
    storage = cache.view(torch.uint8).as_strided((2, 1728), (1728, 1))  # the pages with their padding
    assert [bytes(page.tolist()) for page in storage] == expected_pages


def test_model1_refuses_pages_that_overlap():
    storage = torch.zeros(4 * 584 * 2, dtype=torch.uint8)
    overlapping = storage.as_strided((2, 4, 1, 584), (4 * 584 - 1, 584, 584, 1))
    with pytest.raises(ValueError, match=r"^cache must be a MODEL1 cache view.*page stride >= page_size \* 584"):
        dequantize_model1_kv_cache(overlapping)
    with pytest.raises(ValueError, match="^cache must be a MODEL1 cache view"):
        first = torch.zeros(1, dtype=torch.long)
        fp8_cache.dequantize_tokens(overlapping, MODEL1, first, first)


@pytest.mark.gpu
@LAYOUTS
def test_same_bytes_on_gpu(requires_hopper, layout):
    kv = random_kv(layout, 5, 64, seed=5)
    cpu = QUANTIZE[layout](kv)
    gpu = QUANTIZE[layout](kv.to(requires_hopper))
    assert torch.equal(page_bytes(gpu).cpu(), page_bytes(cpu))
    assert torch.equal(DEQUANTIZE[layout](gpu).cpu(), DEQUANTIZE[layout](cpu))


def test_the_helpers_name_their_own_arguments():
    for page_size, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="page_size must be"):
            fp8_cache.model1_page_bytes(page_size)
    assert fp8_cache.model1_page_bytes(2) % fp8_cache.MODEL1_PAGE_ALIGN == 0
    for dequantize in (fp8_cache.dequantize_v32_kv_cache, fp8_cache.dequantize_model1_kv_cache):
        with pytest.raises(TypeError, match="^cache must be a torch.Tensor, got list"):
            dequantize([1])
