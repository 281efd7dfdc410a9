"""Compile-on-first-use for every kernel variant, with an on-disk cache.

A *variant* is one static configuration of a kernel (dtype, causal, head dims). Each is
compiled with ``cute.compile`` against fake tensors whose dynamic extents and strides
are symbolic, so one compiled function serves every batch size, head count, sequence
length and cache size. Compilation needs no GPU: with ``CUTE_DSL_ARCH=sm_90a`` it runs
on any machine (``python -m flashmla_cute.precompile``).

The compiled functions use the DSL's TVM-FFI calling convention: they take torch
tensors directly and launch on torch's current CUDA stream.

Caching, fastest first:

1. in this process: a dict from variant name to function;
2. on disk: ``$FLASHMLA_CUTE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/flashmla_cute`` or
   ``~/.cache/flashmla_cute``) holds each compiled variant as a shared library (linked
   with the system C compiler; where there is none, as the object file, which loads
   slower), and its machine code as a ``.cubin`` (for ``precompile --out``). The file
   name carries the variant, the GPU arch, the DSL version and a hash of the kernel
   sources, so editing a kernel file recompiles it on the next run, and files are
   written under a temporary name and renamed into place, so processes that fill the
   cache at the same time never see a partial file.

Where a cold start goes (one decode variant; ``benchmarks/cold_start.py``): the DSL
traces the kernel's Python into MLIR, then runs its MLIR pipeline, which ends in ptxas;
that pipeline holds the GIL, so variants compile in parallel only in separate processes
(``precompile --jobs``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from .launch_args import ALIGN_BYTES, CombineArgs, DecodeArgs, MergeArgs, MetadataArgs, SparseDecodeArgs
from .scheduler import BLOCK_SIZE, METADATA_INTS

_PACKAGE_DIR = Path(__file__).resolve().parent
# Files whose content decides what the kernels compile to.
_KERNEL_SOURCES = ("compile.py", "launch_args.py", "scheduler.py", "fp8_cache.py", "sparse_plan.py", "kernels/*.py")

ARCHS = ("sm_90a",)
"""GPU architectures the kernels can be compiled for (they use Hopper-only TMA and WGMMA)."""

DTYPES = ("bfloat16", "float16")
HEAD_DIMS = ((576, 512),)
"""(d, dv) pairs the decode kernel is built for."""

MERGE_DTYPES = DTYPES + ("float32",)
"""Output dtypes the merge kernel is built for (float32: results kept unrounded between
merges, as a context-parallel merge of several ranks does)."""
MERGE_HEAD_DIMS_V = tuple(sorted({dv for _, dv in HEAD_DIMS}))

_compiled: dict[str, Any] = {}
_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled kernel: ``name`` doubles as its cubin's file name."""

    name: str
    build: Callable[[], tuple[Any, tuple]]  # -> (jit callable, fake arguments)


def _cutlass_dtype(name: str):
    import cutlass

    return {"bfloat16": cutlass.BFloat16, "float16": cutlass.Float16, "float32": cutlass.Float32}[name]


def _fake(dtype, shape, stride, align=None):
    from cutlass.cute.runtime import make_fake_tensor

    return make_fake_tensor(dtype, shape, stride, assumed_align=align)


def _i32():
    import cutlass.cute as cute

    return cute.sym_int32()


def _stride(divisibility: int = 1):
    # Strides of big tensors may pass 2**31 elements. TMA sources and vectorized
    # accesses need theirs in multiples of 8 elements (16 bytes).
    import cutlass.cute as cute

    return cute.sym_int64(divisibility=divisibility)


def _row_strides(dtype, count: int) -> tuple:
    """The strides of a tensor of ``dtype`` whose last mode is contiguous and whose rows
    start on ``ALIGN_BYTES``: ``count`` strides in whole 16-byte units, then 1."""
    return tuple(_stride(ALIGN_BYTES * 8 // dtype.width) for _ in range(count)) + (1,)


def _stream():
    from cutlass.cute.runtime import make_fake_stream

    return make_fake_stream(use_tvm_ffi_env_stream=True)


def _plan_rows():
    """The split plan, ``tile_scheduler_metadata``: rows of ``METADATA_INTS`` int32."""
    import cutlass

    return _fake(cutlass.Int32, (_i32(), METADATA_INTS), (METADATA_INTS, 1))


def decode_variant(dtype: str, causal: bool, head_dim: int = 576, head_dim_v: int = 512) -> Variant:
    def build():
        import cutlass
        from cutlass import Float32, Int32

        from .kernels.decode_sm90 import MlaDecodeSm90

        dt = _cutlass_dtype(dtype)
        # One name per extent that several tensors share: the compiled function checks
        # at every call that they agree.
        b, h_kv, q_rows, s_q, h_q = (_i32() for _ in range(5))
        d, dv = head_dim, head_dim_v
        args = DecodeArgs(
            q=_fake(dt, (b, 1, q_rows, d), _row_strides(dt, 3), ALIGN_BYTES),
            k=_fake(dt, (_i32(), BLOCK_SIZE, h_kv, d), _row_strides(dt, 3), ALIGN_BYTES),
            block_table=_fake(cutlass.Int32, (b, _i32()), (_stride(), 1)),
            seqlens=_fake(cutlass.Int32, (b,), (1,)),
            meta=_plan_rows(),
            num_splits=_fake(cutlass.Int32, (_i32(),), (1,)),
            o=_fake(dt, (b, s_q, h_q, dv), _row_strides(dt, 3), ALIGN_BYTES),
            lse=_fake(cutlass.Float32, (b, h_q, s_q), (_stride(), _stride(), _stride())),
            accum=_fake(cutlass.Float32, (_i32(),), (1,), ALIGN_BYTES),
            softmax_scale=Float32(1.0),
            heads_per_kv=Int32(1),
        ) + (_stream(),)
        return MlaDecodeSm90(dt, head_dim, head_dim_v, causal), args

    name = f"decode_sm90_{dtype}_d{head_dim}_dv{head_dim_v}" + ("_causal" if causal else "")
    return Variant(name, build)


def combine_variant(dtype: str, head_dim_v: int = 512) -> Variant:
    def build():
        import cutlass
        from cutlass import Int32

        from .kernels.combine import MlaCombine

        dt = _cutlass_dtype(dtype)
        b, s_q, h_q = (_i32() for _ in range(3))
        dv = head_dim_v
        args = CombineArgs(
            accum=_fake(cutlass.Float32, (_i32(),), (1,), ALIGN_BYTES),
            meta=_plan_rows(),
            num_splits=_fake(cutlass.Int32, (_i32(),), (1,)),
            o=_fake(dt, (b, s_q, h_q, dv), _row_strides(dt, 3), ALIGN_BYTES),
            lse=_fake(cutlass.Float32, (b, h_q, s_q), (_stride(), _stride(), _stride())),
            heads_per_kv=Int32(1),
        ) + (_stream(),)
        # The merge alone (the decode kernel launches it after itself).
        return MlaCombine(dt, head_dim_v), args

    return Variant(f"combine_{dtype}_dv{head_dim_v}", build)


def merge_variant(dtype: str, head_dim_v: int = 512) -> Variant:
    """The merge of two results over disjoint keys (``merge.merge_attention_states``)."""

    def build():
        import cutlass

        from .kernels.merge_states import MlaMergeStates

        dt = _cutlass_dtype(dtype)
        b, s_q, h_q = (_i32() for _ in range(3))

        def values():
            return _fake(dt, (b, s_q, h_q, head_dim_v), _row_strides(dt, 3), ALIGN_BYTES)

        def lse():
            return _fake(cutlass.Float32, (b, h_q, s_q), (_stride(), _stride(), _stride()))

        args = MergeArgs(out_a=values(), lse_a=lse(), out_b=values(), lse_b=lse(), out=values(), lse=lse())
        return MlaMergeStates(dt, head_dim_v), args + (_stream(),)

    return Variant(f"merge_{dtype}_dv{head_dim_v}", build)


def metadata_variant() -> Variant:
    def build():
        import cutlass

        from .kernels.metadata import MlaMetadata

        args = MetadataArgs(
            seqlens=_fake(cutlass.Int32, (_i32(),), (1,)),
            meta=_plan_rows(),
            num_splits=_fake(cutlass.Int32, (_i32(),), (1,)),
        ) + (_stream(),)
        return MlaMetadata(), args

    return Variant("metadata", build)


def sparse_cache_fake(layout):
    """A cache's bytes, ``[num_blocks, page_size, 1, bytes per token]`` uint8, 16-byte
    aligned: the kernel finds a token's bytes itself (``SparseDecodeSm90.token_bytes``)
    and reads only the page stride, which may be anything for a cache of one page."""
    import cutlass

    return _fake(cutlass.Uint8, (_i32(), _i32(), 1, layout.bytes_per_token), (_stride(), _stride(), _stride(), 1),
                 ALIGN_BYTES)


def sparse_decode_variant(layout_name: str = "v32", has_extra: bool = False, pair_heads: bool = False) -> Variant:
    """The sparse decode kernel for one cache layout (``fp8_cache``'s, by key), with or
    without an extra cache, for one head tile a query token or (``pair_heads``) two, as
    pairs of CTAs that share their K tiles (``kernels/sparse_pair_sm90.py``)."""
    from . import fp8_cache

    layout = {layout.key: layout for layout in fp8_cache.LAYOUTS}[layout_name]

    def build():
        import cutlass
        from cutlass import Float32, Int32

        from .kernels.sparse_decode_sm90 import SparseDecodeSm90
        from .kernels.sparse_pair_sm90 import SparsePairDecodeSm90

        b, s_q, h_q = (_i32() for _ in range(3))
        bf16 = cutlass.BFloat16
        args = SparseDecodeArgs(
            q=_fake(bf16, (b, s_q, h_q, layout.head_dim), _row_strides(bf16, 3), ALIGN_BYTES),
            k_cache=sparse_cache_fake(layout),
            indices=_fake(cutlass.Int32, (b, s_q, _i32()), (_stride(), _stride(), 1)),
            topk_length=_fake(cutlass.Int32, (_i32(),), (1,)),
            extra_k_cache=sparse_cache_fake(layout),
            extra_indices=_fake(cutlass.Int32, (_i32(), _i32(), _i32()), (_stride(), _stride(), 1)),
            extra_topk_length=_fake(cutlass.Int32, (_i32(),), (1,)),
            sink=_fake(cutlass.Float32, (_i32(),), (1,)),
            o=_fake(bf16, (b, s_q, h_q, fp8_cache.VALUE_DIM), _row_strides(bf16, 3), ALIGN_BYTES),
            lse=_fake(cutlass.Float32, (b, h_q, s_q), (_stride(), _stride(), _stride())),
            accum=_fake(cutlass.Float32, (_i32(),), (1,), ALIGN_BYTES),
            num_splits=_fake(cutlass.Int32, (_i32(),), (1,)),
            softmax_scale=Float32(1.0),
            has_topk_length=Int32(0),
            has_sink=Int32(0),
            extra_topk=Int32(0),
            has_extra_topk_length=Int32(0),
            whole_batches=Int32(0),
            topk_splits=Int32(1),
            num_sms=Int32(132),
        ) + (_stream(),)
        kernel = SparsePairDecodeSm90 if pair_heads else SparseDecodeSm90
        return kernel(layout, has_extra), args

    extra = "_extra" if has_extra else ""
    pair = "_pair" if pair_heads else ""
    return Variant(f"sparse_decode_sm90_{layout_name}{extra}{pair}_d{layout.head_dim}_dv{fp8_cache.VALUE_DIM}", build)


SPARSE_LAYOUTS = ("v32", "model1")  # fp8_cache's layouts, by key


def sparse_decode_variants() -> list[Variant]:
    return [sparse_decode_variant(layout, has_extra, pair_heads) for layout in SPARSE_LAYOUTS
            for has_extra in (False, True) for pair_heads in (False, True)]


def all_variants() -> list[Variant]:
    """Every kernel variant the package ships (the standalone combine kernel, which only
    tests the merge on its own, is not one of them)."""
    variants = [metadata_variant()]
    for dtype in DTYPES:
        for d, dv in HEAD_DIMS:
            for causal in (False, True):
                variants.append(decode_variant(dtype, causal, d, dv))
    variants += sparse_decode_variants()  # every option but the layout and the extra cache is a runtime value
    variants += [merge_variant(dtype, dv) for dtype in MERGE_DTYPES for dv in MERGE_HEAD_DIMS_V]
    return variants


def compile_variant(variant: Variant, extra_options: str = "") -> Any:
    """Compile ``variant`` now (no caching). ``extra_options`` go to ``cute.compile``."""
    import cutlass.cute as cute

    fn, args = variant.build()
    return cute.compile(fn, *args, options=("--enable-tvm-ffi " + extra_options).strip())


def cache_dir() -> Path:
    """Where compiled variants are kept between processes."""
    explicit = os.environ.get("FLASHMLA_CUTE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashmla_cute"


def source_hash(package_dir: Path = _PACKAGE_DIR) -> str:
    """Hash of the kernel sources (see ``_KERNEL_SOURCES``) under ``package_dir``."""
    digest = hashlib.sha256()
    for pattern in _KERNEL_SOURCES:
        for path in sorted(package_dir.glob(pattern)):
            digest.update(path.relative_to(package_dir).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _source_hash_cached() -> str:
    return source_hash()


def target_arch() -> str:
    """The architecture kernels are compiled for: ``CUTE_DSL_ARCH`` if set, else the
    current CUDA device's (``sm_90a`` on Hopper)."""
    arch = os.environ.get("CUTE_DSL_ARCH")
    if arch:
        return arch
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}{'a' if major >= 9 else ''}"


def cache_key(variant: Variant, arch: str) -> str:
    """File stem of ``variant`` in the disk cache."""
    from importlib.metadata import version

    dsl = version("nvidia-cutlass-dsl")
    return f"{variant.name}-{arch}-dsl{dsl}-{_source_hash_cached()}"


def _atomic_write(path: Path, write: Callable[[str], None], executable: bool = False) -> None:
    """Run ``write(tmp_path)`` then rename the result to ``path`` (atomic on POSIX), its
    bytes on disk first (a crash never leaves a name on a partial file) and its mode what
    ``open`` would give under the umask (``mkstemp``'s 0600 would keep the cache from
    other users)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, (0o777 if executable else 0o666) & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    try:  # Linux shows it; setting it to read it back would change it for other threads meanwhile
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_whole_elf(path: Path) -> bool:
    """Whether ``path`` is a 64-bit ELF file (a shared library or an object file) that
    holds all of its section headers, which come last: a file cut short (a copy cut off,
    a crash before its bytes reached the disk) loads without an error and faults when
    called, so it is rebuilt instead."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 64 or head[:5] != b"\x7fELF\x02":
        return False
    (section_headers,) = struct.unpack_from("<Q", head, 0x28)
    entry_size, entries = struct.unpack_from("<HH", head, 0x3A)
    return section_headers + entry_size * entries <= size


def _link_shared(obj: Path, so: Path) -> bool:
    """Link an exported object into a shared library with the system C compiler."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return False
    import cutlass.cute as cute

    libs = cute.runtime.find_runtime_libraries(enable_tvm_ffi=True)
    # The runtime libraries' folders go into the library's run path, so that loading
    # it needs neither the DSL imported nor LD_LIBRARY_PATH.
    rpaths = [f"-Wl,-rpath,{os.path.dirname(lib)}" for lib in libs]

    def link(tmp: str) -> None:
        subprocess.run([compiler, "-shared", "-o", tmp, str(obj), *libs, *rpaths], check=True, capture_output=True)

    try:
        _atomic_write(so, link, executable=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


def _load(path: Path, function_name: str) -> Any:
    if path.suffix == ".so":
        # A linked library loads in milliseconds through TVM-FFI alone.
        import tvm_ffi

        return tvm_ffi.load_module(str(path))[function_name]
    import cutlass.cute as cute  # an object file is linked in memory by the DSL (~1 s)

    return getattr(cute.runtime.load_module(str(path), enable_tvm_ffi=True), function_name)


def cache_paths(variant: Variant, arch: str, directory: Path | None = None) -> dict[str, Path]:
    """The disk cache's files for ``variant``: ``{"so": ..., "o": ..., "cubin": ...}``."""
    directory = cache_dir() if directory is None else directory
    stem = cache_key(variant, arch)
    return {kind: directory / f"{stem}.{kind}" for kind in ("so", "o", "cubin")}


def compile_into_cache(variant: Variant, directory: Path | None = None, arch: str | None = None) -> Any:
    """Compile ``variant`` now and store it in the disk cache (object file, shared
    library where a C compiler is found, and cubin); returns the in-process compiled
    function. An unwritable cache leaves files out, silently: callers look for them."""
    arch = target_arch() if arch is None else arch
    paths = cache_paths(variant, arch, directory)
    with tempfile.TemporaryDirectory() as dump:
        compiled = compile_variant(variant, f"--gpu-arch={arch} --keep-cubin --dump-dir={dump}")
        cubins = list(Path(dump).glob("*.cubin"))
        if len(cubins) != 1:
            raise RuntimeError(f"expected one cubin for {variant.name}, found {cubins}")
        try:
            _atomic_write(paths["cubin"], lambda tmp: shutil.copyfile(cubins[0], tmp))
            _atomic_write(paths["o"], lambda tmp: compiled.export_to_c(tmp, function_name=variant.name))
            _link_shared(paths["o"], paths["so"])
        except OSError:
            pass
    return compiled


def load_or_compile(variant: Variant, directory: Path | None = None, arch: str | None = None) -> Any:
    """The compiled function of ``variant`` from the disk cache, compiling and storing
    it first if it is not there."""
    arch = target_arch() if arch is None else arch
    paths = cache_paths(variant, arch, directory)
    for path in (paths["so"], paths["o"]):
        if is_whole_elf(path):
            try:
                return _load(path, variant.name)
            except Exception:  # a corrupt or foreign file: rebuild it below
                pass
    compiled = compile_into_cache(variant, directory, arch)
    if is_whole_elf(paths["so"]):
        return _load(paths["so"], variant.name)
    return compiled


def cached_cubin(variant: Variant, arch: str, directory: Path | None = None) -> Path:
    """The disk cache's ``.cubin`` of ``variant``, compiling it first if it is not there."""
    path = cache_paths(variant, arch, directory)["cubin"]
    if not path.exists():
        compile_into_cache(variant, directory, arch)
        if not path.exists():
            raise OSError(f"could not write {path}: set FLASHMLA_CUTE_CACHE_DIR to a writable folder")
    return path


def get(variant: Variant) -> Any:
    """The compiled function of ``variant``: from this process, else from the disk
    cache, else compiled now (and stored in the disk cache)."""
    fn = _compiled.get(variant.name)
    if fn is None:
        with _lock:
            fn = _compiled.get(variant.name)
            if fn is None:
                fn = load_or_compile(variant)
                _compiled[variant.name] = fn
    return fn


def write_cubin(variant: Variant, out_dir: str, arch: str = "sm_90a") -> str:
    """Write ``<out_dir>/<variant.name>.cubin``, from the disk cache (compiled first if
    it is not there)."""
    os.makedirs(out_dir, exist_ok=True)
    dest = os.path.join(out_dir, f"{variant.name}.cubin")
    shutil.copyfile(cached_cubin(variant, arch), dest)
    return dest
