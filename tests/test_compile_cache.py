"""The on-disk compile cache: keyed by kernel source, DSL version, arch and variant;
safe to fill from several processes at once. Runs on the CPU (compiles for sm_90a)."""

import multiprocessing
import shutil
from pathlib import Path

import pytest

from flashmla_cute import compile as compile_mod

ARCH = "sm_90a"


@pytest.fixture(autouse=True)
def _arch(monkeypatch):
    monkeypatch.setenv("CUTE_DSL_ARCH", ARCH)


def test_source_hash_changes_when_a_kernel_file_is_edited(tmp_path):
    package = Path(compile_mod.__file__).parent
    copy = tmp_path / "flashmla_cute"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = compile_mod.source_hash(copy)
    assert before == compile_mod.source_hash(package)
    kernel = copy / "kernels" / "combine.py"
    kernel.write_text(kernel.read_text() + "\n# edited\n")
    assert compile_mod.source_hash(copy) != before
    # Files outside the kernel sources do not force a recompile.
    kernel.write_text((package / "kernels" / "combine.py").read_text())
    (copy / "README_NOTE.py").write_text("x = 1\n")
    assert compile_mod.source_hash(copy) == before


def test_cache_key_names_variant_arch_dsl_and_source():
    variant = compile_mod.metadata_variant()
    key = compile_mod.cache_key(variant, ARCH)
    assert key.startswith("metadata-sm_90a-dsl")
    assert key.endswith(compile_mod.source_hash())
    assert compile_mod.cache_key(variant, "sm_100a") != key


def test_second_lookup_loads_from_disk_without_compiling(tmp_path, monkeypatch):
    variant = compile_mod.metadata_variant()
    first = compile_mod.load_or_compile(variant, tmp_path, ARCH)
    assert callable(first)
    names = {p.name for p in tmp_path.iterdir()}
    key = compile_mod.cache_key(variant, ARCH)
    assert {f"{key}.o", f"{key}.cubin"} <= names  # and .so where a C compiler is found

    def no_compile(*args, **kwargs):
        raise AssertionError("should have been loaded from the disk cache")

    monkeypatch.setattr(compile_mod, "compile_variant", no_compile)
    assert callable(compile_mod.load_or_compile(variant, tmp_path, ARCH))


def test_edited_source_recompiles(tmp_path, monkeypatch):
    variant = compile_mod.metadata_variant()
    compile_mod.load_or_compile(variant, tmp_path, ARCH)
    calls = []
    real = compile_mod.compile_variant

    def counting(*args, **kwargs):
        calls.append(args[0].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(compile_mod, "compile_variant", counting)
    monkeypatch.setattr(compile_mod, "_source_hash_cached", lambda: "0123456789abcdef")
    compile_mod.load_or_compile(variant, tmp_path, ARCH)
    assert calls == ["metadata"]
    assert any("0123456789abcdef" in p.name for p in tmp_path.iterdir())


def _fill(directory: str) -> str:
    import os

    os.environ["CUTE_DSL_ARCH"] = ARCH
    from flashmla_cute import compile as c

    fn = c.load_or_compile(c.metadata_variant(), Path(directory), ARCH)
    return type(fn).__name__


def test_concurrent_fill_leaves_one_complete_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.map(_fill, [str(tmp_path)] * 3)
    assert len(results) == 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names
    stems = {n.rsplit(".", 1)[0] for n in names}
    assert len(stems) == 1, names
    # What is on disk loads.
    assert callable(compile_mod.load_or_compile(compile_mod.metadata_variant(), tmp_path, ARCH))


def test_a_file_cut_short_is_compiled_again(tmp_path, monkeypatch):
    # A shared library cut short (a copy cut off, a crash before its bytes reached the
    # disk) loads without an error and faults when called: it must be rebuilt instead.
    variant = compile_mod.metadata_variant()
    compile_mod.compile_into_cache(variant, tmp_path, ARCH)  # not loaded: this process maps nothing of it
    paths = compile_mod.cache_paths(variant, ARCH, tmp_path)
    for path in (paths["so"], paths["o"]):
        if path.exists():
            assert compile_mod.is_whole_elf(path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size * 4 // 5])
            assert not compile_mod.is_whole_elf(path)
    compiles = []
    real = compile_mod.compile_variant
    monkeypatch.setattr(compile_mod, "compile_variant", lambda *a, **k: compiles.append(1) or real(*a, **k))
    assert callable(compile_mod.load_or_compile(variant, tmp_path, ARCH))
    assert compiles == [1]
    assert compile_mod.is_whole_elf(paths["o"])


def test_cache_files_are_readable_by_others_under_the_umask(tmp_path):
    # mkstemp's files are 0600: a cache filled by one user would be compiled again by
    # every other one. Files get what open() would give under the umask.
    import os

    old = os.umask(0o022)
    try:
        compile_mod.compile_into_cache(compile_mod.metadata_variant(), tmp_path, ARCH)
    finally:
        os.umask(old)
    modes = {p.suffix: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes[".o"] == modes[".cubin"] == 0o644
    assert modes.get(".so", 0o755) == 0o755
