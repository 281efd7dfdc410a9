"""``python -m flashmla_cute.precompile``: compiles into the disk cache (and, with --out,
copies cubins out of it), reuses what is cached, and refuses what it cannot do with a
message that says what it can do. Runs on the CPU (compiles for sm_90a)."""

import pytest

from flashmla_cute import compile as compile_mod
from flashmla_cute import precompile

NAMES = [v.name for v in compile_mod.all_variants()]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_90a")
    monkeypatch.setenv("FLASHMLA_CUTE_CACHE_DIR", str(tmp_path / "cache"))


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        precompile.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_help_lists_variants_and_architectures(capsys):
    with pytest.raises(SystemExit) as info:
        precompile.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in NAMES)
    assert all(arch in text for arch in compile_mod.ARCHS)


def test_only_matching_nothing_is_refused_with_the_variant_names(capsys):
    err = refused(["--only", "no_such_kernel"], capsys)
    assert "--only 'no_such_kernel' matches no variant" in err
    assert all(name in err for name in NAMES)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_100a"])
def test_other_architectures_are_refused_up_front(arch, capsys, monkeypatch):
    monkeypatch.setattr(compile_mod, "compile_variant", lambda *a, **k: pytest.fail("compiled"))
    err = refused(["--arch", arch], capsys)
    assert f"--arch {arch} is not supported" in err and "sm_90a only" in err


def test_bad_jobs_is_refused(capsys):
    assert "--jobs must be >= 1, got 0" in refused(["--jobs", "0"], capsys)


def test_out_reuses_the_disk_cache(tmp_path, capsys, monkeypatch):
    assert precompile.main(["--only", "metadata", "--out", str(tmp_path / "a")]) == 0
    first = (tmp_path / "a" / "metadata.cubin").read_bytes()
    assert first and "metadata: cached" not in capsys.readouterr().out

    monkeypatch.setattr(compile_mod, "compile_variant", lambda *a, **k: pytest.fail("compiled again"))
    assert precompile.main(["--only", "metadata", "--out", str(tmp_path / "b")]) == 0
    assert "metadata: cached" in capsys.readouterr().out
    assert (tmp_path / "b" / "metadata.cubin").read_bytes() == first
    # And the plain form finds it cached too.
    assert precompile.main(["--only", "metadata"]) == 0
    assert "metadata: cached" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["cache", "out"])
def test_a_folder_that_cannot_be_written_is_refused_before_compiling(where, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setattr(compile_mod, "compile_variant", lambda *a, **k: pytest.fail("compiled"))
    if where == "cache":
        monkeypatch.setenv("FLASHMLA_CUTE_CACHE_DIR", str(blocker / "cache"))
        err = refused(["--only", "metadata"], capsys)
        assert f"the compile cache (FLASHMLA_CUTE_CACHE_DIR) {blocker / 'cache'} is not a folder" in err
    else:
        err = refused(["--only", "metadata", "--out", str(blocker)], capsys)
        assert f"--out {blocker} is not a folder files can be written into" in err
