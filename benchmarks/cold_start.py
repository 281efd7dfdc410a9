"""Where the first call's compile time goes: one decode variant compiled from nothing, in
this fresh process, phase by phase. Runs without a GPU (compiles for sm_90a).

    python benchmarks/cold_start.py [--variant decode_sm90_bfloat16_d576_dv512]

Phases: importing torch, the package and the CuTe DSL; tracing the kernel's Python into
MLIR; the DSL's MLIR pipeline (lowering, LLVM/NVVM and ptxas, one C++ call); exporting
the object file, linking it into a shared library with ``cc`` and loading that. It also
reports whether the MLIR pipeline releases the GIL: a thread that wakes every millisecond
counts how often it got to run meanwhile.
"""

import argparse
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
os.environ["FLASHMLA_CUTE_CACHE_DIR"] = tempfile.mkdtemp(prefix="flashmla-cute-cold-")
times: dict[str, float] = {}


def timed(name, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    times[name] = times.get(name, 0.0) + time.perf_counter() - start
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="decode_sm90_bfloat16_d576_dv512")
    args = parser.parse_args()

    timed("import torch", __import__, "torch")
    compile_mod = timed("import flashmla_cute", lambda: __import__("flashmla_cute.compile").compile)
    timed("import the CuTe DSL", __import__, "cutlass.cute")
    from pathlib import Path

    import cutlass.cute as cute
    from cutlass.base_dsl import compiler as dsl_compiler

    ticks = [0, True]

    def probe():
        while ticks[1]:
            time.sleep(0.001)
            ticks[0] += 1

    threading.Thread(target=probe, daemon=True).start()
    pipeline = dsl_compiler.Compiler.compile
    pipeline_ticks = []

    def timed_pipeline(self, *a, **k):
        before = ticks[0]
        result = timed("MLIR pipeline incl. ptxas", pipeline, self, *a, **k)
        pipeline_ticks.append(ticks[0] - before)
        return result

    dsl_compiler.Compiler.compile = timed_pipeline
    variant = next(v for v in compile_mod.all_variants() if v.name == args.variant)
    fn, fake_args = timed("kernel module import, fake arguments", variant.build)
    arch = compile_mod.target_arch()
    compiled = timed("cute.compile", cute.compile, fn, *fake_args, options=f"--enable-tvm-ffi --gpu-arch={arch}")
    ticks[1] = False
    times["tracing to MLIR"] = times.pop("cute.compile") - times["MLIR pipeline incl. ptxas"]
    out = Path(os.environ["FLASHMLA_CUTE_CACHE_DIR"])
    timed("export object file", compiled.export_to_c, str(out / "k.o"), function_name=variant.name)
    linked = timed("link with cc", compile_mod._link_shared, out / "k.o", out / "k.so")
    if linked:
        timed("load shared library", compile_mod._load, out / "k.so", variant.name)

    print(f"{variant.name} for {arch}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    order = ["import torch", "import flashmla_cute", "import the CuTe DSL", "kernel module import, fake arguments",
             "tracing to MLIR", "MLIR pipeline incl. ptxas", "export object file", "link with cc",
             "load shared library"]
    for name, seconds in sorted(times.items(), key=lambda item: order.index(item[0])):
        print(f"  {name:<40} {seconds:6.2f} s")
    print(f"  {'total':<40} {sum(times.values()):6.2f} s")
    rate = pipeline_ticks[0] / times["MLIR pipeline incl. ptxas"]
    print(f"  a 1 ms thread ran {rate:.0f} times/s during the MLIR pipeline "
          f"({'the GIL is held' if rate < 100 else 'the GIL is released'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
