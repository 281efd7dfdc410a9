"""Compile every shipped kernel variant ahead of time; no GPU needed.

    python -m flashmla_cute.precompile --arch sm_90a [--out DIR]

Without ``--out`` every variant is compiled into the on-disk cache (see
``flashmla_cute.compile``), so that later processes load instead of compiling; with it,
one ``<variant>.cubin`` per variant is written into DIR instead (``decode_*`` and
``metadata``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashmla_cute.precompile", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sm_90a", help="GPU architecture to compile for (default: sm_90a)")
    parser.add_argument("--out", default=None, help="write one .cubin per kernel variant into this directory")
    parser.add_argument("--only", default=None, help="compile only the variants whose name contains this text")
    args = parser.parse_args(argv)

    # The DSL reads the target architecture when it is imported; without a GPU it
    # cannot detect one.
    os.environ.setdefault("CUTE_DSL_ARCH", args.arch)
    from . import compile as compile_mod

    variants = [v for v in compile_mod.all_variants() if args.only is None or args.only in v.name]
    for variant in variants:
        start = time.perf_counter()
        if args.out:
            where = compile_mod.write_cubin(variant, args.out, args.arch)
        else:
            compile_mod.load_or_compile(variant, arch=args.arch)
            where = str(compile_mod.cache_dir() / compile_mod.cache_key(variant, args.arch)) + ".*"
        print(f"{variant.name}: {time.perf_counter() - start:.1f} s -> {where}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
