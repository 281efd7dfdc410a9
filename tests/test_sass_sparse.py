"""The sparse decode kernel compiles for sm_90a without a GPU, for each cache layout
(V3.2 and MODEL1, each with and without an extra cache), and its machine code is what
its design needs: WGMMA (HGMMA) for both products, 16-byte gathers from the cache
(LDG.128) and 16-byte stores of the dequantized tile (STS.128), the FP8 conversion
instruction, and no local memory (LDL/STL: register spills or stack arrays); beside it,
the combine kernels it launches, one of them staging fragments by bulk copies; and the
step's schedule, dequantization and epilogue where they were chosen by measurement
(``sparse_decode_sm90.Arrangement``), a step loop that finds its tokens without
dividing, and whose latent loads carry cache hints, and Q's copies addressed once
(the eight-warp kernel) or made by TMA (the pair kernel)."""

import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flashmla_cute import compile as compile_mod
from test_sass import kernel_registers, sass_of

WRITE_CUBINS = (
    "import sys\n"
    "from flashmla_cute import compile\n"
    "for variant in compile.sparse_decode_variants():\n"
    "    compile.write_cubin(variant, sys.argv[1], 'sm_90a')\n"
)
SPARSE_NAMES = [variant.name for variant in compile_mod.sparse_decode_variants()]
# The eight-warp kernel (one head tile a query token) and the pair kernel (two).
EIGHT_WARP_NAMES = [name for name in SPARSE_NAMES if "_pair" not in name]
PAIR_NAMES = [name for name in SPARSE_NAMES if "_pair" in name]


def q_chunks(name: str) -> int:
    """Q's width (576 for V3.2, 512 for MODEL1) in 64-column chunks."""
    return 8 if "model1" in name else 9


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse_cubins")
    # The DSL reads the target architecture when it is imported: a fresh process.
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a")
    subprocess.run([sys.executable, "-c", WRITE_CUBINS, str(out)], check=True, env=env, capture_output=True, text=True)
    return {Path(p).stem: Path(p) for p in glob.glob(str(out / "*.cubin"))}


def test_one_cubin_per_sparse_variant(cubins):
    assert set(cubins) == set(SPARSE_NAMES)


@pytest.mark.parametrize("name", SPARSE_NAMES)
def test_sparse_machine_code(cubins, name):
    sass = sass_of(cubins[name])
    assert not re.search(r"\b(LDL|STL)\b", sass), f"{name} uses local memory"
    assert "HGMMA" in sass, f"{name} has no WGMMA"
    assert re.search(r"\bLDG\.E\.128\b", sass), f"{name} does not gather the cache 16 bytes at a time"
    assert re.search(r"\bSTS\.128\b", sass), f"{name} does not store the K tile 16 bytes at a time"
    assert "E4M3" in sass, f"{name} does not convert FP8 with the hardware instruction"


@pytest.mark.parametrize("name", SPARSE_NAMES)
def test_sparse_variants_carry_a_staged_combine(cubins, name):
    """The sparse kernel's host function launches one of two combine kernels
    (``kernels/combine.py``): the merge with the warp-per-row path, and, for query tokens
    of many fragments, the merge whose fragments' rows come into shared memory by bulk
    copies (``UBLKCP``), both one 512-thread CTA an SM (at most 128 registers)."""
    combines = {kernel: count for kernel, count in kernel_registers(cubins[name]).items() if "Combine" in kernel}
    assert len(combines) == 2, f"{name}: {len(combines)} combine kernels"
    assert sum("staged" in kernel for kernel in combines) == 1, f"{name}: {sorted(combines)}"
    assert max(combines.values()) <= 128, f"{name}: combine registers {combines}"
    assert "UBLKCP" in sass_of(cubins[name]), f"{name}: no bulk copy"


def instructions(sass: str) -> list[str]:
    """The SASS instructions of a cubin, in order (one line each)."""
    return [line for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", line)]


def step_loop(sass: str) -> list[str]:
    """The instructions of the loop that fetches the next tile's tokens: in the
    eight-warp kernel the step loop, from S's first k-step to the barrier after the
    step's last P V k-step; in the pair kernel the gather warpgroup's, from its wait for
    a free buffer to its first bulk copy of rows into the peer's tile (``UBLKCP.S.S``)."""
    code = instructions(sass)
    if any("UBLKCP.S.S" in line for line in code):
        end = next(i for i, line in enumerate(code) if "UBLKCP.S.S" in line)
        first = max(i for i in range(end) if "SYNCS.PHASECHK.TRANS64.TRYWAIT" in code[i])
        return code[first:end]
    first = next(i for i, line in enumerate(code) if "HGMMA.64x32x16" in line)
    last = max(i for i, line in enumerate(code) if "HGMMA" in line)
    end = next(i for i in range(last, len(code)) if "BAR.SYNC" in code[i])
    return code[first:end]


@pytest.mark.parametrize("name", EIGHT_WARP_NAMES)
def test_what_runs_beside_the_scores(cubins, name):
    """S = Q K^T's k-steps (the m64n32k16 HGMMAs) are issued back to back, no load
    among them, in the V3.2 variants, which dequantize the whole next tile beside P V;
    the MODEL1 variants dequantize its first half between S's issue and its wait."""
    code = instructions(sass_of(cubins[name]))
    s_steps = [i for i, line in enumerate(code) if "HGMMA.64x32x16" in line]
    first, last = s_steps[0], s_steps[-1]
    assert "gsb0" in code[last], f"{name}: the last k-step of S does not commit"
    wait = next(i for i in range(last, len(code)) if "WARPGROUP.DEPBAR" in code[i])
    conversions_beside_s = sum("E4M3.UNPACK" in line for line in code[last:wait])
    if "model1" in name:
        assert conversions_beside_s > 0, f"{name}: nothing dequantized while S runs"
    else:
        loads = [line for line in code[first:last] if re.search(r"\b(LDS|LDG)", line)]
        assert not loads, f"{name}: loads among S's k-steps: {loads}"
        assert conversions_beside_s == 0, f"{name}: dequantizing while S runs"


@pytest.mark.parametrize("name", SPARSE_NAMES)
def test_how_the_output_leaves(cubins, name):
    """The pair kernels and the eight-warp MODEL1 variants stage the output's rows in
    shared memory and store them 16 bytes at a time (``finish_pair``,
    ``Arrangement.stage_output_rows``); the eight-warp V3.2 variants store from the
    accumulators (staging measured slower there), so none of their global stores is 16
    bytes wide."""
    wide_stores = re.findall(r"\bSTG\.E\.128\b", sass_of(cubins[name]))
    if "model1" in name or name in PAIR_NAMES:
        assert wide_stores, f"{name}: the output rows are not stored 16 bytes at a time"
    else:
        assert not wide_stores, f"{name}: 16-byte global stores in the V3.2 epilogue"


@pytest.mark.parametrize("name", EIGHT_WARP_NAMES)
def test_q_copies_are_addressed_once(cubins, name):
    """``load_q``: a thread copies one 16-byte vector of every 64-column chunk of each of
    its two rows of Q (256 threads, 8 a row's chunk), so a row's copies (``LDGSTS``)
    follow one another within a few instructions, their addresses constant offsets
    apart; dealt out as one vector index over whole rows they were about 54 instructions
    apart, which a CTA's start paid for (benchmarks/NOTES.md, "The b2 cases: a CTA's
    start"). (The pair kernel loads Q by TMA.)"""
    code = instructions(sass_of(cubins[name]))
    copies = [i for i, line in enumerate(code) if "LDGSTS" in line]
    chunks = q_chunks(name)
    row_copies = 2
    assert len(copies) == chunks * row_copies, f"{name}: {len(copies)} Q copies"
    close = sum(later - earlier <= 8 for earlier, later in zip(copies, copies[1:]))
    assert close == (chunks - 1) * row_copies, f"{name}: Q's copies are not addressed once"


@pytest.mark.parametrize("name", PAIR_NAMES)
def test_q_comes_by_tma_before_the_first_mma(cubins, name):
    """The pair kernel's Q comes by TMA (``start_q_load``), one copy per 64-column
    chunk, issued before the first MMA: no thread copies any of it itself
    (``cp.async``, LDGSTS), where those copies were both consumers' first instructions
    (benchmarks/NOTES.md, "Sparse Q through TMA")."""
    code = instructions(sass_of(cubins[name]))
    assert not any("LDGSTS" in line for line in code), f"{name}: threads copy Q"
    chunks = q_chunks(name)
    copies = [i for i, line in enumerate(code) if "UTMALDG" in line]
    first_mma = next(i for i, line in enumerate(code) if "HGMMA" in line)
    assert len(copies) == chunks and copies[-1] < first_mma, f"{name}: Q's copies {copies}, first MMA {first_mma}"


@pytest.mark.parametrize("name", SPARSE_NAMES)
def test_the_step_finds_tokens_without_dividing(cubins, name):
    """The step loop (from S's first k-step to the barrier after its last P V) fetches
    the next tile's tokens without an integer division (whose sequence begins with
    ``I2F.RP``): the page size is divided by with a multiply and shifts
    (``SparseDecodeSm90.token_bytes``)."""
    step = step_loop(sass_of(cubins[name]))
    assert any(re.search(r"\bLDG\.E\.128\b", line) for line in step), f"{name}: no fetch in the step loop"
    assert not any("I2F.RP" in line for line in step), f"{name}: an integer division in the step loop"


@pytest.mark.parametrize("name", SPARSE_NAMES)
def test_where_the_scale_is_applied(cubins, name):
    """The MODEL1 variants scale the dequantized values as bf16 pairs (HMUL2.BF16,
    ``Arrangement.scale_in_bf16``); the V3.2 variants scale float32 values (faster there)
    and have no bf16 multiply."""
    bf16_multiplies = re.findall(r"\bHMUL2\.BF16", sass_of(cubins[name]))
    if "model1" in name:
        assert bf16_multiplies, f"{name}: the scale is not applied to bf16 pairs"
    else:
        assert not bf16_multiplies, f"{name}: bf16 multiplies in the V3.2 dequantization"


@pytest.mark.parametrize("name", SPARSE_NAMES)
def test_the_latent_loads_carry_cache_hints(cubins, name):
    """The step loop's loads of a token's FP8 latent bytes ask L2 for 256 bytes on a
    miss and L1 to keep the line (``LDG.E.EL.LTC256B``), one of 16 bytes for each of the
    latent chunks a thread fetches (8 for V3.2, 7 for MODEL1)."""
    step = step_loop(sass_of(cubins[name]))
    hinted = sum(bool(re.search(r"\bLDG\.E\.EL\.LTC256B\.128\b", line)) for line in step)
    chunks = 7 if "model1" in name else 8
    assert hinted >= chunks, f"{name}: {hinted} hinted latent loads in the step loop"


@pytest.mark.parametrize("name", PAIR_NAMES)
def test_the_pair_kernel_shares_its_tiles(cubins, name):
    """The pair kernel: one warpgroup computes S over a step's 64 tokens (m64n64k16, 36
    k-steps for V3.2's 576 columns, 32 for MODEL1's 512); the gatherer's rows of a tile
    go to the peer CTA's as one bulk copy a 64-column chunk and one of their flags
    (``UBLKCP.S.S``, shared memory to shared memory), no thread storing into the peer
    (``STAS``); and no GPU-wide fence (``MEMBAR.ALL.GPU``) comes with the release of a
    tile to both CTAs, which cost 15-19% of the kernel's time."""
    sass = sass_of(cubins[name])
    k_steps = 32 if "model1" in name else 36
    assert len(re.findall(r"\bHGMMA\.64x64x16\b", sass)) == k_steps, f"{name}: S is not m64n64k16"
    chunks = 8 if "model1" in name else 9  # 64-column chunks of a K row, rope included
    copies = len(re.findall(r"\bUBLKCP\.S\.S\b", sass))
    assert copies == chunks + 1, f"{name}: {copies} bulk copies into the peer's tile"
    assert "STAS" not in sass, f"{name}: a thread stores into the peer's tile"
    assert "MEMBAR.ALL.GPU" not in sass, f"{name}: a GPU-wide fence"


@pytest.mark.parametrize("name", PAIR_NAMES)
def test_each_gather_warp_sends_its_rows_without_a_warpgroup_barrier(cubins, name):
    """Between the gatherer's wait for a free buffer and its copies into the peer's tile
    there is no barrier of the gather warpgroup (``BAR.SYNC``): each warp sends its own
    rows once it has stored them, which took 2% off the h_q 128 cases against one thread
    sending all rows after a warpgroup barrier."""
    step = step_loop(sass_of(cubins[name]))
    assert step, f"{name}: no gather loop before the bulk copies"
    barriers = [line.strip() for line in step if re.search(r"\bBAR\.(SYNC|ARV)\b", line)]
    assert not barriers, f"{name}: {barriers}"


@pytest.mark.parametrize("name", PAIR_NAMES)
def test_the_pair_kernel_roles_take_their_registers(cubins, name):
    """Each role of the pair kernel sets its registers (``setmaxnreg``) to its layout's
    budget (``sparse_pair_sm90.ROLE_REGISTERS``): ptxas drops every ``setmaxnreg`` of a
    kernel when a budget is below what its role needs, and then all roles run at the
    launch's share."""
    from flashmla_cute import fp8_cache
    from flashmla_cute.kernels.sparse_pair_sm90 import ROLE_REGISTERS

    budget = ROLE_REGISTERS[(fp8_cache.MODEL1 if "model1" in name else fp8_cache.V32).key]
    taken = sorted(int(m, 16) for m in re.findall(r"USETMAXREG\.\w+(?:\.\w+)*\s+(?:UP\d,\s*)?(0x[0-9a-f]+)",
                                                      sass_of(cubins[name])))
    assert taken == sorted([budget.scores, budget.values, budget.gather]), f"{name}: setmaxnreg {taken}"


@pytest.mark.parametrize("layout", ["V3.2", "MODEL1"])
def test_the_four_threads_of_a_token_cover_each_chunk(layout):
    """The four threads of a token take the 8 vectors (8 columns, 16 bf16 bytes) of each
    64-column chunk of its K row between them, two side by side each (one 16-byte load
    of FP8 bytes), in both kernels: thread ``part`` the vectors ``2 part`` and ``2 part +
    1``, which is where the latent loads and the stores of the unpack put them."""
    from flashmla_cute import fp8_cache
    from flashmla_cute.kernels.sparse_decode_sm90 import THREADS_PER_TOKEN, SparseDecodeSm90
    from flashmla_cute.kernels.sparse_pair_sm90 import SparsePairDecodeSm90

    fp8_layout = {"V3.2": fp8_cache.V32, "MODEL1": fp8_cache.MODEL1}[layout]
    for kernel in (SparsePairDecodeSm90(fp8_layout), SparseDecodeSm90(fp8_layout)):
        pieces = [kernel.piece_vectors(part) for part in range(THREADS_PER_TOKEN)]
        assert sorted(v for piece in pieces for v in piece) == list(range(8))
        assert pieces == [(0, 1), (2, 3), (4, 5), (6, 7)]
