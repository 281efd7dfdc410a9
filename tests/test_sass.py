"""Every shipped kernel variant compiles for sm_90a on a machine without a GPU, and its
machine code is what the design needs: decode kernels use WGMMA (HGMMA) and TMA loads
(UTMALDG); no kernel touches local memory (LDL/STL: register spills or stack arrays)."""

import glob
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from flashmla_cute import compile as compile_mod


def nvdisasm() -> str | None:
    found = shutil.which("nvdisasm")
    if found:
        return found
    for entry in sys.path:
        hits = glob.glob(os.path.join(entry, "nvidia", "*", "bin", "nvdisasm"))
        if hits:
            return hits[0]
    return None


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    out = tmp_path_factory.mktemp("cubins")
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a")
    subprocess.run(
        [sys.executable, "-m", "flashmla_cute.precompile", "--arch", "sm_90a", "--out", str(out)],
        check=True, env=env, capture_output=True, text=True,
    )
    return {Path(p).stem: Path(p) for p in glob.glob(str(out / "*.cubin"))}


def test_precompile_writes_one_cubin_per_variant(cubins):
    expected = {v.name for v in compile_mod.all_variants()}
    assert set(cubins) == expected
    assert any(name.startswith("decode") for name in cubins)
    assert "metadata" in cubins


def sass_of(path: Path) -> str:
    tool = nvdisasm()
    if tool is None:
        pytest.skip("nvdisasm not installed (pip install nvidia-cuda-nvdisasm)")
    return subprocess.run([tool, "-c", str(path)], check=True, capture_output=True, text=True).stdout


def kernel_registers(path: Path) -> dict[str, int]:
    """Registers per thread of each kernel in a cubin, by kernel name: the ELF's
    ``.nv.info`` REGCOUNT attributes (format 0x04, attribute 0x2f: symbol index, count)."""
    data = path.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def cstring(offset: int) -> str:
        return data[offset:data.index(b"\0", offset)].decode()

    names = {cstring(sections[shstrndx][4] + sec[0]): sec for sec in sections}
    symtab, strtab = names[".symtab"], names[".strtab"]
    symbols = [cstring(strtab[4] + struct.unpack_from("<I", data, symtab[4] + i * 24)[0])
               for i in range(symtab[5] // 24)]
    info = data[names[".nv.info"][4]:names[".nv.info"][4] + names[".nv.info"][5]]
    counts, at = {}, 0
    while at + 4 <= len(info):
        fmt, attr, size = info[at], info[at + 1], struct.unpack_from("<H", info, at + 2)[0]
        if fmt != 0x04:  # only the sized format carries REGCOUNT; the others are 2 or 4 bytes
            at += {0x01: 2, 0x02: 4, 0x03: 4}.get(fmt, 2)
            continue
        if attr == 0x2F:
            symbol, count = struct.unpack_from("<II", info, at + 4)
            counts[symbols[symbol]] = count
        at += 4 + size
    return counts


@pytest.mark.parametrize("name", [v.name for v in compile_mod.all_variants()])
def test_machine_code(cubins, name):
    sass = sass_of(cubins[name])
    assert not re.search(r"\b(LDL|STL)\b", sass), f"{name} uses local memory"
    if name.startswith("decode"):
        assert "HGMMA" in sass, f"{name} has no WGMMA"
        assert "UTMALDG" in sass, f"{name} has no TMA load"


WGMMA_VARIANTS = [v.name for v in compile_mod.all_variants() if v.name.startswith(("decode", "sparse"))]


@pytest.mark.parametrize("name", WGMMA_VARIANTS)
def test_wgmmas_are_not_serialized(cubins, name):
    """Where ptxas cannot prove that no register of an in-flight WGMMA is touched (a
    branch on a value it does not see as warp-uniform, say: a reducing barrier's result),
    it serializes every WGMMA of the kernel, each followed by a wait. The kernels wait
    for whole chains of WGMMAs (S's 36 k-steps, a P V's 4), so their waits are a few."""
    sass = sass_of(cubins[name])
    hgmmas = len(re.findall(r"\bHGMMA\.", sass))
    waits = len(re.findall(r"\bWARPGROUP\.DEPBAR\b", sass))
    assert hgmmas > 0, f"{name} has no WGMMA"
    assert waits * 8 <= hgmmas, f"{name}: {waits} WGMMA waits for {hgmmas} WGMMAs (serialized?)"


@pytest.mark.parametrize("name", [v.name for v in compile_mod.all_variants() if v.name.startswith("merge")])
def test_the_merge_moves_rows_in_16_byte_pieces(cubins, name):
    """``kernels/merge_states.py``: a lane loads and stores a row's values 16 bytes at a
    time (the variant's fake tensors promise rows on 16 bytes); only the lse values go
    one at a time."""
    sass = sass_of(cubins[name])
    assert re.search(r"\bLDG\.E\.128\b", sass) and re.search(r"\bSTG\.E\.128\b", sass), name
    narrow_loads = re.findall(r"\bLDG\.E(?:\.(?:U8|S8|U16|S16|64))?\b(?!\.128)", sass)
    assert len(narrow_loads) <= 2, f"{name}: {len(narrow_loads)} loads narrower than 16 bytes (the two lse)"


def test_register_budgets_are_checked_against_the_launch():
    """A CTA of 384 threads starts with 168 registers a thread; budgets fit when their sum
    is at most the warpgroups' share (an increase beyond what the decreases freed would
    wait forever)."""
    from flashmla_cute.kernels import utils

    assert utils.launch_registers(384) == 168
    assert utils.registers_fit((40, 232, 232), 384)
    assert not utils.registers_fit((40, 240, 232), 384)


DENSE_VARIANTS = [v.name for v in compile_mod.all_variants() if v.name.startswith("decode_sm90")]


@pytest.mark.parametrize("name", DENSE_VARIANTS)
def test_the_decode_kernel_roles_take_their_registers(cubins, name):
    """The producer warpgroup gives registers up (``setmaxnreg.dec``) and both consumer
    warpgroups take them (``.inc``): ptxas drops every ``setmaxnreg`` of a kernel when a
    budget is below what its role needs, and then the consumers run at the launch's 168."""
    from flashmla_cute.kernels.decode_sm90 import CONSUMER_REGS, PRODUCER_REGS

    sass = sass_of(cubins[name])
    assert re.findall(r"USETMAXREG\.DEALLOC\S*\s+(0x[0-9a-f]+)", sass) == [hex(PRODUCER_REGS)], name
    assert re.findall(r"USETMAXREG\.TRY_ALLOC\S*\s+UP\d,\s*(0x[0-9a-f]+)", sass) == [hex(CONSUMER_REGS)], name


@pytest.mark.parametrize("name", DENSE_VARIANTS)
def test_the_dense_producer_asks_l2_for_a_streams_second_halves(cubins, name):
    """In a stream the producer prefetches a page's hi chunks into L2 (a TMA prefetch a
    chunk, 5 a page) as it copies the page's lo half, in both places a lo half is copied
    (a batch's first block, and the blocks after it); nowhere else."""
    import cutlass

    from flashmla_cute.kernels import decode_sm90

    kernel = decode_sm90.MlaDecodeSm90(cutlass.BFloat16)
    sass = sass_of(cubins[name])
    assert len(re.findall(r"\bUTMAPF\.L2\b", sass)) == 2 * len(kernel.hi), name


def test_which_runs_are_streams():
    """A run of one sequence's K tiles is a stream (the default L2 priority, the hi
    halves asked of L2) where one query tile reads 32 tiles or more of it, or two read 64
    or more; where four or more tiles share each K tile, never."""
    from flashmla_cute.kernels.decode_sm90 import is_stream

    assert is_stream(32, 1) and not is_stream(31, 1)
    assert is_stream(64, 2) and not is_stream(63, 2) and not is_stream(32, 2)
    assert not any(is_stream(run, tiles) for run in (64, 128, 10_000) for tiles in (3, 4, 8))


def kernel_sass(sass: str, marker: str) -> str:
    """The machine code of the one kernel of a cubin's disassembly whose section name
    contains ``marker`` (a cubin holds the decode kernel and the combine it launches)."""
    sections = re.split(r"^//-+ \.text\.", sass, flags=re.MULTILINE)[1:]
    found = [s for s in sections if marker in s.splitlines()[0]]
    assert len(found) == 1, f"{len(found)} kernels named like {marker}"
    return found[0]


def addresses(code: str, opcodes: str) -> list[int]:
    """Addresses of the instructions of ``code`` whose opcode matches ``opcodes`` (a
    regular expression), guarded by a predicate or not."""
    return [int(a, 16) for a in re.findall(rf"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?(?:{opcodes})\b", code)]


GLOBAL_ACCESS = "LDG|STG|LD|ST|ATOMG|ATOM|REDG|RED|UTMALDG|UTMAPF|UTMASTG|UBLKCP|UBLKPF|CCTL"


@pytest.mark.parametrize("name", DENSE_VARIANTS)
def test_the_dense_kernel_waits_for_the_kernel_before(cubins, name):
    """The dense decode kernel is launched as the programmatic dependent of whatever
    kernel precedes it on the stream: nothing in global memory is touched before its
    ``griddepcontrol.wait`` (``ACQBULK``), and its own dependent, the combine, which reads
    the plan before it waits, is allowed to launch (``PREEXIT``) only after that wait."""
    decode = kernel_sass(sass_of(cubins[name]), "MlaDecodeSm90")
    waits, triggers, accesses = (addresses(decode, opcodes) for opcodes in ("ACQBULK", "PREEXIT", GLOBAL_ACCESS))
    assert len(waits) == 1 and len(triggers) == 1 and accesses, (waits, triggers, len(accesses))
    assert waits[0] < triggers[0], "the combine may launch before the wait"
    assert waits[0] < min(accesses), f"a global access at {min(accesses):#x} before the wait at {waits[0]:#x}"
