"""The V3.2 FP8 cache layout: 656 bytes a token (512 fp8 latent values, 4 float32
power-of-two scales, 64 bfloat16 rope values), and its quantization round trip."""

import math
import struct

import pytest
import torch

from flashmla_cute import fp8_cache
from flashmla_cute.fp8_cache import dequantize_v32_kv_cache, quantize_v32_kv_cache


def random_kv(num_blocks, page, seed, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(num_blocks, page, 1, fp8_cache.HEAD_DIM, generator=gen)
    # Groups of very different magnitudes, so that the scales differ.
    kv[..., : fp8_cache.LATENT_DIM] *= torch.exp2(
        torch.randint(-8, 8, (num_blocks, page, 1, fp8_cache.NUM_GROUPS), generator=gen).float()
    ).repeat_interleave(fp8_cache.GROUP_SIZE, dim=-1)
    return (kv * spread).to(torch.bfloat16)


def scales_of(cache):
    raw = cache.view(torch.uint8)[..., fp8_cache.SCALES_OFFSET : fp8_cache.ROPE_OFFSET]
    return raw.contiguous().view(torch.float32)


def test_constants_describe_656_bytes():
    assert fp8_cache.HEAD_DIM == 576
    assert (fp8_cache.SCALES_OFFSET, fp8_cache.ROPE_OFFSET, fp8_cache.BYTES_PER_TOKEN) == (512, 528, 656)
    assert fp8_cache.NUM_GROUPS * fp8_cache.GROUP_SIZE == fp8_cache.LATENT_DIM


def test_shape_and_dtype():
    cache = quantize_v32_kv_cache(random_kv(3, 5, seed=0))
    assert cache.shape == (3, 5, 1, 656) and cache.dtype == torch.float8_e4m3fn and cache.is_contiguous()
    kv = dequantize_v32_kv_cache(cache)
    assert kv.shape == (3, 5, 1, 576) and kv.dtype == torch.bfloat16


def test_round_trip_error_bound():
    kv = random_kv(4, 7, seed=1)
    cache = quantize_v32_kv_cache(kv)
    back = dequantize_v32_kv_cache(cache).float()
    x = kv.float()
    scale = scales_of(cache).repeat_interleave(fp8_cache.GROUP_SIZE, dim=-1)
    latent = slice(0, fp8_cache.LATENT_DIM)
    # e4m3 keeps 3 mantissa bits (half an ulp: 1/16 relative), its subnormals are
    # spaced 2**-9 * scale apart, and the result is rounded once more to bfloat16.
    bound = x[..., latent].abs() / 16 + scale * 2.0**-10 + back[..., latent].abs() / 256
    assert bool(((back[..., latent] - x[..., latent]).abs() <= bound).all())
    # The rope part is stored as is.
    assert torch.equal(back[..., fp8_cache.LATENT_DIM :], x[..., fp8_cache.LATENT_DIM :])


def test_scales_are_powers_of_two_rounded_up():
    kv = random_kv(2, 9, seed=2)
    scales = scales_of(quantize_v32_kv_cache(kv))
    mantissa, _ = torch.frexp(scales)
    assert bool((mantissa == 0.5).all()), "every scale is a power of two"
    amax = kv.float()[..., : fp8_cache.LATENT_DIM].abs().unflatten(-1, (4, 128)).amax(-1)
    ideal = torch.clamp_min(amax / fp8_cache.FP8_MAX, fp8_cache.MIN_SCALED_AMAX)
    assert bool((scales >= ideal).all()) and bool((scales < 2 * ideal).all())


def test_no_value_saturates():
    kv = random_kv(2, 3, seed=3, spread=1000.0)
    cache = quantize_v32_kv_cache(kv)
    latent = cache.view(torch.uint8)[..., : fp8_cache.LATENT_DIM].view(torch.float8_e4m3fn).float()
    assert bool(torch.isfinite(latent).all()) and float(latent.abs().max()) <= fp8_cache.FP8_MAX


def test_zero_rows():
    kv = torch.zeros(1, 2, 1, 576, dtype=torch.bfloat16)
    cache = quantize_v32_kv_cache(kv)
    assert torch.equal(dequantize_v32_kv_cache(cache), kv)
    expected = 2.0 ** math.ceil(math.log2(fp8_cache.MIN_SCALED_AMAX))
    assert bool((scales_of(cache) == expected).all())
    assert bool((cache.view(torch.uint8)[..., : fp8_cache.SCALES_OFFSET] == 0).all())


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
    fp8 = lambda v: torch.tensor([v]).to(torch.float8_e4m3fn).view(torch.uint8).item()  # noqa: E731
    for g, (amax, scale) in enumerate(zip(group_amax, scales)):
        expected[g * 128] = fp8(amax / scale)
        expected[g * 128 + 1] = fp8(-amax / 2 / scale)
    expected[512:528] = struct.pack("<4f", *scales)
    expected[528:656] = torch.tensor([i / 8.0 - 4.0 for i in range(64)]).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    assert bytes(raw) == bytes(expected)
    # 448 is the largest e4m3 value: 0 1111 110.
    assert raw[0] == 0b0_1111_110


def test_dequantize_reads_a_strided_cache_of_any_byte_dtype():
    kv = random_kv(3, 4, seed=4)
    cache = quantize_v32_kv_cache(kv)
    padded = torch.zeros(3, 5, 1, 656, dtype=torch.uint8)[:, :4]  # page stride > 4 * 656
    padded.copy_(cache.view(torch.uint8))
    expected = dequantize_v32_kv_cache(cache)
    for view in (padded, padded.view(torch.int8), padded.view(torch.float8_e4m3fn)):
        assert torch.equal(dequantize_v32_kv_cache(view), expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"kv must have shape \[num_blocks, page_size, 1, 576\]"):
        quantize_v32_kv_cache(torch.zeros(1, 2, 1, 512))
    with pytest.raises(TypeError, match="kv must have a floating-point dtype"):
        quantize_v32_kv_cache(torch.zeros(1, 2, 1, 576, dtype=torch.int32))
    with pytest.raises(ValueError, match="656"):
        dequantize_v32_kv_cache(torch.zeros(1, 2, 1, 584, dtype=torch.uint8))
    with pytest.raises(TypeError, match="k_cache must have dtype"):
        dequantize_v32_kv_cache(torch.zeros(1, 2, 1, 656, dtype=torch.bfloat16))


@pytest.mark.gpu
def test_same_bytes_on_gpu(requires_hopper):
    kv = random_kv(5, 64, seed=5)
    cpu = quantize_v32_kv_cache(kv).view(torch.uint8)
    gpu = quantize_v32_kv_cache(kv.to(requires_hopper)).view(torch.uint8).cpu()
    assert torch.equal(cpu, gpu)
    assert torch.equal(dequantize_v32_kv_cache(gpu.to(requires_hopper)).cpu(), dequantize_v32_kv_cache(cpu))
