"""Compile every shipped kernel variant ahead of time; no GPU needed.

    python -m flashmla_cute.precompile [--arch sm_90a] [--out DIR] [--only TEXT] [--jobs N]

Every variant is compiled into the on-disk cache (see ``flashmla_cute.compile``), so
that later processes load instead of compiling; variants already there are not compiled
again. With ``--out``, one ``<variant>.cubin`` per variant is also copied into DIR, from
the cache. Variants compile in parallel processes (the CuTe DSL holds the GIL while it
compiles, so threads would not help).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

from . import compile as compile_mod


def _compile(name: str, arch: str) -> float:
    """Compile the variant called ``name`` into the disk cache (in a worker process);
    returns the seconds it took."""
    start = time.perf_counter()
    variant = next(v for v in compile_mod.all_variants() if v.name == name)
    compile_mod.compile_into_cache(variant, arch=arch)
    return time.perf_counter() - start


def _is_cached(variant: compile_mod.Variant, arch: str, want_cubin: bool) -> bool:
    paths = compile_mod.cache_paths(variant, arch)
    if want_cubin:
        return paths["cubin"].exists()
    return compile_mod.is_whole_elf(paths["so"]) or compile_mod.is_whole_elf(paths["o"])


def _folder_fault(folder: Path) -> str | None:
    """Why no file can be written into ``folder`` (made if missing), or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def _parser(names: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flashmla_cute.precompile",
        description=__doc__.split("\n")[0],
        epilog="architectures (--arch): " + ", ".join(compile_mod.ARCHS)
        + "\nvariants (--only picks by part of the name):\n" + "\n".join(f"  {name}" for name in names),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", default=compile_mod.ARCHS[0],
                        help=f"GPU architecture to compile for: {', '.join(compile_mod.ARCHS)} (the default)")
    parser.add_argument("--out", default=None, help="also write one <variant>.cubin per variant into this directory")
    parser.add_argument("--only", default=None, help="only the variants whose name contains this text")
    parser.add_argument("--jobs", type=int, default=None,
                        help="variants compiled at once, in separate processes (default: one per CPU core)")
    return parser


def main(argv: list[str] | None = None) -> int:
    names = [v.name for v in compile_mod.all_variants()]
    parser = _parser(names)
    args = parser.parse_args(argv)
    if args.arch not in compile_mod.ARCHS:
        parser.error(
            f"--arch {args.arch} is not supported: the kernels use Hopper-only instructions (TMA, WGMMA) "
            f"and are built for {', '.join(compile_mod.ARCHS)} only"
        )
    variants = [v for v in compile_mod.all_variants() if args.only is None or args.only in v.name]
    if not variants:
        parser.error(f"--only {args.only!r} matches no variant; the variants are: {', '.join(names)}")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    # Refused before anything compiles: with nowhere to write, every variant would compile
    # for nothing.
    for what, folder in (("the compile cache (FLASHMLA_CUTE_CACHE_DIR)", compile_mod.cache_dir()),
                         ("--out", None if args.out is None else Path(args.out))):
        fault = None if folder is None else _folder_fault(folder)
        if fault is not None:
            parser.error(f"{what} {folder} is not a folder files can be written into: {fault}")

    # The DSL reads the target architecture when it is imported (in the workers too, which
    # inherit the environment); without a GPU it cannot detect one.
    os.environ["CUTE_DSL_ARCH"] = args.arch
    todo = [v for v in variants if not _is_cached(v, args.arch, want_cubin=args.out is not None)]
    seconds = {}
    if todo:
        jobs = min(args.jobs or os.cpu_count() or 1, len(todo))
        if jobs == 1:
            seconds = {v.name: _compile(v.name, args.arch) for v in todo}
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
                futures = {v.name: pool.submit(_compile, v.name, args.arch) for v in todo}
                seconds = {name: future.result() for name, future in futures.items()}
    missing = [v.name for v in todo if not _is_cached(v, args.arch, want_cubin=args.out is not None)]
    if missing:
        print(f"not stored in {compile_mod.cache_dir()} (out of space?): {', '.join(missing)}", file=sys.stderr)
        return 1

    for variant in variants:
        took = f"{seconds[variant.name]:.1f} s" if variant.name in seconds else "cached"
        if args.out:
            where = compile_mod.write_cubin(variant, args.out, args.arch)
        else:
            where = str(compile_mod.cache_dir() / compile_mod.cache_key(variant, args.arch)) + ".*"
        print(f"{variant.name}: {took} -> {where}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
