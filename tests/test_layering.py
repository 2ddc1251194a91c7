"""The layering of lib/ (`.importlinter`, docs/ARCHITECTURE.md) holds, and a breach of it is caught."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; lint_imports_command()"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, "--config", str(root / ".importlinter"), "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=300)


def test_lib_keeps_its_layers():
    proc = _lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_every_package_of_lib_is_in_a_layer():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".importlinter")
    layers = cfg["importlinter:contract:layers"]["layers"]
    named = {p.strip() for line in layers.split("\n") for p in line.split("|") if p.strip()}
    packages = {p.name for p in (REPO / "lib").iterdir() if (p / "__init__.py").is_file()}
    assert named == packages


def test_an_import_against_the_layers_fails(tmp_path):
    shutil.copytree(REPO / "lib", tmp_path / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    with open(tmp_path / "lib" / "core" / "errors.py", "a", encoding="utf-8") as fh:
        fh.write("\nfrom lib.pipeline.cli import run_main  # planted: core must not import the stage drivers\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout and "lib.core.errors -> lib.pipeline.cli" in proc.stdout


def test_every_module_has_a_test_module_or_names_its_tests():
    """tests/ mirrors lib/: each module has tests/<package>/test_<module>.py, or its package's
    docstring names the tests that cover it."""
    import ast

    missing = []
    for pkg in sorted(p for p in (REPO / "lib").iterdir() if (p / "__init__.py").is_file()):
        doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text(encoding="utf-8"))) or ""
        assert len(doc.splitlines()) >= 2, f"lib/{pkg.name}/__init__.py needs a docstring saying what lives there"
        for mod in sorted(pkg.glob("*.py")):
            if mod.name == "__init__.py" or (REPO / "tests" / pkg.name / f"test_{mod.name}").is_file():
                continue
            if f"`{mod.stem}`" not in doc and "every module here" not in doc:
                missing.append(f"lib/{pkg.name}/{mod.name}")
    assert not missing, f"modules without tests/<package>/test_<module>.py or a 'Tests:' line: {missing}"
