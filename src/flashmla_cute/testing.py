"""Helpers shared by the tests and the benchmarks: random paged decode inputs, the
cosine distance used to compare results (and, for two CPU computations of one result,
equality up to rounding), FLOP and byte counts, and a CUDA graph's capture.

Importing this module needs only torch (no GPU, no CUTLASS).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from typing import Callable, Sequence

import torch

from .checks import PAGE_SIZE

GARBAGE_PAGE_INDEX = 2147480000
"""Written into every ``block_table`` entry past a sequence's last page: a kernel that
indexes with such an entry reads far out of bounds instead of silently succeeding."""


@dataclasses.dataclass
class DecodeInputs:
    """Arguments of one decode call (see ``make_decode_inputs``)."""

    q: torch.Tensor  # [b, s_q, h_q, d]
    k_cache: torch.Tensor  # [num_blocks, 64, h_kv, d]
    block_table: torch.Tensor  # [b, max_blocks] int32
    cache_seqlens: torch.Tensor  # [b] int32
    seed: int | None = None  # the seed the inputs were drawn with (to reproduce them)


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """FlashMLA's comparison measure ``1 - 2 <x, y> / (<x, x> + <y, y>)``, in float64.

    0 for equal tensors and never negative. Positions where both tensors hold ``+inf``
    (the lse of rows that see no key) count as equal and are left out; any NaN, or an
    infinity in one tensor that the other does not have at the same position, gives
    ``inf``, so a NaN can never pass a threshold. Two tensors that are both all zero
    (or empty after leaving out the shared infinities) are at distance 0.
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.detach().to(torch.float64)
    y = y.detach().to(torch.float64).to(x.device)
    if bool(torch.isnan(x).any()) or bool(torch.isnan(y).any()):
        return math.inf
    both_posinf = torch.isposinf(x) & torch.isposinf(y)
    x = x[~both_posinf]
    y = y[~both_posinf]
    if bool(torch.isinf(x).any()) or bool(torch.isinf(y).any()):
        return math.inf
    denominator = float((x * x + y * y).sum())
    if denominator == 0.0:
        return 0.0
    return 1.0 - 2.0 * float((x * y).sum()) / denominator


def assert_equal_up_to_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """Raise AssertionError unless ``got`` is ``want`` (same dtype and shape, infinities
    and NaN at the same places) but for one rounding step of their dtype (at least 1e-5
    relative): two computations of one result on the CPU may differ that much, as torch's
    CPU operations are not bitwise reproducible from one call to the next in a process
    (about one process in 25 gave a first call one bf16 step off its later calls)."""
    rtol = max(torch.finfo(want.dtype).eps, 1e-5)
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6, equal_nan=True)


MAX_COSINE_DISTANCE = 1e-5
"""FlashMLA's pass criterion for out and lse against the float32 reference."""


def reference_verdict(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor,
                      ref_lse: torch.Tensor) -> tuple[bool, str]:
    """``(passed, "cosine distance out D, lse D (limit L): PASS")`` (or ``FAIL``) for a
    result against a reference, by ``cosine_distance`` and ``MAX_COSINE_DISTANCE``."""
    d_out = cosine_distance(out.float(), ref_out.float())
    d_lse = cosine_distance(lse, ref_lse)
    passed = d_out < MAX_COSINE_DISTANCE and d_lse < MAX_COSINE_DISTANCE
    return passed, (f"cosine distance out {d_out:.2e}, lse {d_lse:.2e} (limit {MAX_COSINE_DISTANCE:.0e}): "
                    f"{'PASS' if passed else 'FAIL'}")


def random_seqlens(b: int, seqlen: int, s_q: int = 1, varlen: bool = False, seed: int | None = None) -> torch.Tensor:
    """Sequence lengths like FlashMLA's test: all ``seqlen``, or with ``varlen`` drawn
    from Normal(seqlen, seqlen / 2), rounded and clamped to at least ``s_q``. int32, CPU."""
    if not varlen:
        return torch.full((b,), max(seqlen, 0), dtype=torch.int32)
    gen = torch.Generator()
    gen.manual_seed(secrets.randbits(63) if seed is None else seed)
    lens = torch.normal(float(seqlen), seqlen / 2, (b,), generator=gen)
    return lens.round().clamp(min=s_q).to(torch.int32)


def make_decode_inputs(
    b: int,
    s_q: int,
    h_q: int,
    h_kv: int = 1,
    seqlen: int = 4096,
    varlen: bool = False,
    d: int = 576,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    seqlens: Sequence[int] | torch.Tensor | None = None,
    extra_blocks: int = 4,
) -> DecodeInputs:
    """Random inputs for one decode call, laid out the way a serving engine would.

    - ``q`` and the cache: ``randn / 10`` clamped to [-1, 1] (as in FlashMLA's test).
    - Sequence lengths: ``seqlens`` when given (a list or tensor of ``b`` lengths, which
      may be 0), else ``seqlen`` for all, or with ``varlen`` drawn from
      Normal(seqlen, seqlen / 2) clamped to at least ``s_q``.
    - The cache holds exactly the pages the sequences use plus ``extra_blocks`` unused
      ones, in a random order: ``block_table`` maps each sequence's pages to a random
      permutation of the cache's pages (never the identity layout).
    - ``block_table`` is ``ceil((max_pages + 1) / 4) * 4`` entries wide (so that every row
      has unused entries); every entry past a sequence's last page holds
      ``GARBAGE_PAGE_INDEX``.
    - Every cache slot no sequence uses (the unused pages and the slots past the end of
      each sequence's last page) holds NaN, so reading one shows in the result.

    Data are fresh random numbers on every call unless ``seed`` is given; the seed used
    is kept in the result's ``seed`` field. Random numbers are drawn on ``device``.
    """
    if b < 1 or s_q < 1 or h_q < 1 or h_kv < 1 or d < 1:
        raise ValueError(f"b, s_q, h_q, h_kv and d must be >= 1, got {b}, {s_q}, {h_q}, {h_kv}, {d}")
    if h_q % h_kv != 0:
        raise ValueError(f"h_q = {h_q} must be a multiple of h_kv = {h_kv}")
    if extra_blocks < 0:
        raise ValueError(f"extra_blocks must be >= 0, got {extra_blocks}")
    device = torch.device(device)
    if seed is None:
        seed = secrets.randbits(63)

    if seqlens is None:
        lens = random_seqlens(b, seqlen, s_q, varlen, seed)
    else:
        lens = torch.as_tensor(seqlens).to(device="cpu", dtype=torch.int64).reshape(-1)
        if lens.numel() != b:
            raise ValueError(f"seqlens must hold b = {b} lengths, got {lens.numel()}")
        if bool((lens < 0).any()):
            raise ValueError("seqlens must be >= 0")
    lens = lens.to(torch.int64)

    pages = (lens + PAGE_SIZE - 1) // PAGE_SIZE  # pages each sequence uses
    used = int(pages.sum())
    num_blocks = used + extra_blocks
    if num_blocks == 0:
        num_blocks = 1  # keep the cache non-empty even if every sequence is empty
    max_pages = int(pages.max())
    width = -(-(max_pages + 1) // 4) * 4

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    q = (torch.randn(b, s_q, h_q, d, generator=gen, device=device) / 10).clamp_(-1.0, 1.0).to(dtype)
    k_cache = torch.empty(num_blocks, PAGE_SIZE, h_kv, d, dtype=dtype, device=device)
    # Fill page by page in bounded chunks to keep the float32 temporaries small.
    step = max(1, (1 << 24) // (PAGE_SIZE * h_kv * d))
    for first in range(0, num_blocks, step):
        last = min(first + step, num_blocks)
        chunk = torch.randn(last - first, PAGE_SIZE, h_kv, d, generator=gen, device=device)
        k_cache[first:last] = (chunk / 10).clamp_(-1.0, 1.0)

    # Page p of sequence i (batch-major order) gets physical page perm[offset_i + p].
    perm = torch.randperm(num_blocks, generator=gen, device=device)
    seq_of_page = torch.repeat_interleave(torch.arange(b), pages)  # [used]
    first_page = torch.cumsum(pages, 0) - pages
    page_in_seq = torch.arange(used) - first_page[seq_of_page]
    table = torch.full((b, width), GARBAGE_PAGE_INDEX, dtype=torch.int32, device=device)
    physical = perm[:used]
    table[seq_of_page.to(device), page_in_seq.to(device)] = physical.to(torch.int32)

    # Valid slots per physical page: 64 on full pages, the remainder on a last page, 0 on
    # unused pages; every other slot becomes NaN.
    filled = torch.zeros(num_blocks, dtype=torch.int64, device=device)
    valid = torch.clamp(lens[seq_of_page] - page_in_seq * PAGE_SIZE, max=PAGE_SIZE)
    filled[physical] = valid.to(device)
    unused_slot = torch.arange(PAGE_SIZE, device=device)[None, :] >= filled[:, None]  # [num_blocks, 64]
    k_cache[unused_slot] = float("nan")

    return DecodeInputs(
        q=q,
        k_cache=k_cache,
        block_table=table,
        cache_seqlens=lens.to(device=device, dtype=torch.int32),
        seed=seed,
    )


def written_by_a_long_kernel(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A tensor shaped as ``like`` (entries ~N(0, 1)), written at the end of a matmul of
    a few tens of microseconds into memory that held NaN, with nothing between it and
    whatever is launched next on the stream: a kernel that reads it too early sees NaN."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    rows, cols, inner = like.numel() // like.shape[-1], like.shape[-1], 1 << 15
    a = torch.randn(rows, inner, device=like.device, generator=gen).to(like.dtype) / math.sqrt(inner)
    w = torch.randn(inner, cols, device=like.device, generator=gen).to(like.dtype)
    out = torch.full_like(like, float("nan"))
    torch.cuda.synchronize()
    torch.matmul(a, w, out=out.view(rows, cols))
    return out


def _total_tokens(cache_seqlens) -> int:
    if isinstance(cache_seqlens, torch.Tensor):
        return int(cache_seqlens.to(torch.int64).sum())
    return int(sum(int(x) for x in cache_seqlens))


def _batch(cache_seqlens) -> int:
    if isinstance(cache_seqlens, torch.Tensor):
        return cache_seqlens.numel()
    return len(cache_seqlens)


def decode_flops(cache_seqlens, s_q: int, h_q: int, d: int = 576, dv: int = 512) -> int:
    """FLOPs of one decode call: ``2 * s_q * h_q * total_kv_tokens * (d + dv)`` (Q K^T and
    P V; causal masking is not subtracted). ``cache_seqlens`` is a tensor or a sequence."""
    return 2 * s_q * h_q * _total_tokens(cache_seqlens) * (d + dv)


def decode_bytes(cache_seqlens, s_q: int, h_q: int, h_kv: int = 1, d: int = 576, dv: int = 512,
                 element_size: int = 2) -> int:
    """Bytes a decode call must move: the KV cache rows it reads once, plus the queries
    read and the outputs written: ``element_size * (total_kv_tokens * h_kv * d +
    b * s_q * h_q * (d + dv))``."""
    b = _batch(cache_seqlens)
    return element_size * (_total_tokens(cache_seqlens) * h_kv * d + b * s_q * h_q * (d + dv))


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds one call of ``fn()`` takes on ``device`` (CUDA events on a GPU, the
    wall clock on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


def capture_graph(step: Callable[[], object], calls: int = 1, warmups: int = 3, stream=None):
    """``(graph, result)``: a CUDA graph of ``calls`` calls of ``step`` and what the last
    one returned (its outputs, rewritten by every replay). Captured on ``stream`` (a new
    one by default) after ``warmups`` calls on it, which do the first-use work (compiles,
    buffers kept for later calls) outside the capture, as serving engines capture a graph
    per batch size."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream() if stream is None else stream
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            step()
        stream.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                result = step()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, result
