"""What a user meets before calling anything: the README's commands and code, CI's
script, the license and the package metadata. These read the repository's files (they
skip where the tests run without the checkout around them)."""

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import flashmla_cute
from flashmla_cute import checks

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
TEST_COMMANDS = ('pip install ".[test]"', "python -m pytest tests -q")

if not (ROOT / "pyproject.toml").exists():  # pragma: no cover
    pytest.skip("needs the repository checkout", allow_module_level=True)


def read(name: str) -> str:
    return (ROOT / name).read_text()


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a Markdown text."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no section {heading!r}"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


# ---------------------------------------------------------------- README


def test_quick_start_installs_cpu_torch_before_the_package():
    commands = [line.split("#")[0].strip() for block in code_blocks(section(read("README.md"), "Quick start"), "bash")
                for line in block.splitlines()]
    commands = [c for c in commands if c]
    torch_line = next(i for i, c in enumerate(commands) if c.startswith("pip install torch"))
    assert CPU_INDEX in commands[torch_line]
    first_package_install = next(i for i, c in enumerate(commands) if c.startswith("pip install ."))
    assert torch_line < first_package_install, commands
    assert "python examples/decode_step.py" in commands
    assert all(c in commands for c in TEST_COMMANDS), commands


def test_usage_block_runs_without_a_gpu():
    usage = code_blocks(section(read("README.md"), "Usage"), "python")[0]
    assert 'device="cuda"' not in usage
    scope = {}
    exec(compile(usage, "README usage", "exec"), scope)  # on a machine without Hopper: the CPU
    out, lse = scope["out"], scope["lse"]
    b, s_q, h_q = scope["b"], scope["s_q"], scope["h_q"]
    assert out.shape == (b, s_q, h_q, 512) and lse.shape == (b, h_q, s_q)


def test_readme_states_the_largest_s_q():
    assert f"`s_q` from 1 to {checks.MAX_S_Q}" in section(read("README.md"), "Status")


def test_readme_has_the_sections_users_look_for():
    text = read("README.md")
    for heading in ("Quick start", "Usage", "Editing a kernel", "Limitations", "Acknowledgements", "License"):
        section(text, heading)
    assert "FlashMLA" in section(text, "Acknowledgements") and "MIT" in section(text, "Acknowledgements")


# ---------------------------------------------------------------- CI


def test_ci_uses_a_virtual_environment_of_its_own():
    script = read(".ci/run")
    # The only thing it deletes is the temporary folder it made itself.
    removals = [line for line in script.splitlines() if re.search(r"\brm\b", line.split("#")[0])]
    assert removals and all('"$ci_dir"' in line for line in removals), removals
    assert 'ci_dir=$(mktemp -d' in script
    code = "\n".join(line.split("#")[0] for line in script.splitlines())
    assert ".venv" not in code  # a developer's own environment
    assert all(command in script for command in TEST_COMMANDS)
    assert '"$status" -eq 5' in script  # pytest's "no tests collected"
    assert CPU_INDEX in script


# ---------------------------------------------------------------- license and metadata


def test_license_carries_ours_and_flashmlas_notice():
    text = read("LICENSE")
    assert "Copyright (c) 2026 flashmla-cute contributors" in text
    assert "Copyright (c) 2025 DeepSeek" in text
    assert text.count("Permission is hereby granted, free of charge") == 2


def test_pyproject_license_and_single_source_version():
    pyproject = read("pyproject.toml")
    assert re.search(r'^license = "MIT"$', pyproject, re.M)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, re.M)
    assert re.search(r'"setuptools>=(\d+)"', pyproject) and int(re.search(r'"setuptools>=(\d+)"', pyproject)[1]) >= 77
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert 'version = { attr = "flashmla_cute.__version__" }' in pyproject
    assert not re.search(r'^version = "', pyproject, re.M)


def test_changelog_names_the_current_version():
    first = re.search(r"^## (\S+)", read("CHANGELOG.md"), re.M)
    assert first and first[1] == flashmla_cute.__version__


def test_built_metadata_has_the_version_and_license_without_warnings(tmp_path):
    pytest.importorskip("setuptools")
    from importlib.metadata import version

    if int(version("setuptools").split(".")[0]) < 77:
        pytest.skip("needs setuptools >= 77 (pyproject's build requirement)")
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "__pycache__", ".*venv*"))
    code = textwrap.dedent("""
        import sys, warnings
        warnings.simplefilter("always")
        from setuptools import build_meta
        print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))
    """)
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    result = subprocess.run([sys.executable, "-c", code, str(meta_dir)], cwd=tree, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if re.search(r"(?i)warn|deprecat", line)]
    assert not [line for line in warnings if re.search(r"(?i)licen[cs]e", line)], output
    metadata = (meta_dir / result.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert f"Version: {flashmla_cute.__version__}" in metadata
    assert "License-Expression: MIT" in metadata


# ---------------------------------------------------------------- module layering


def imported_modules(path: Path) -> set[str]:
    """The package modules a module imports (``from . import x``, ``from .x import y``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(alias.name for alias in node.names)
    return names


def test_calls_flow_one_way():
    # interface -> checks | runtime -> compile; ops sits on top and only __init__ imports it.
    package = Path(flashmla_cute.__file__).parent
    imports = {p.stem: imported_modules(p) for p in package.glob("*.py")}
    assert [m for m, names in imports.items() if "ops" in names] == ["__init__"]
    assert not imports["runtime"] & {"interface", "checks", "ops"}
    assert not imports["checks"] & {"interface", "runtime", "ops"}
    assert not imports["compile"] & {"interface", "checks", "runtime", "ops"}
