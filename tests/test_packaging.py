"""The wheel holds every package: setup.py lists them by hand, and an editable install (what
the tests run against) imports a package setup.py forgot all the same."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# Source folder -> the package it is installed as (setup.py's package_dir).
SOURCES = {"vitprune": "vitprune", "kernels": "vitprune.kernels"}


def source_packages() -> dict:
    """{dotted package: its .py files} of every folder under SOURCES holding an __init__.py."""
    found = {}
    for folder, package in SOURCES.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            parts = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" not in parts:
                found[".".join([package, *parts])] = {p.name for p in init.parent.glob("*.py")}
    return found


def wheel_packages(wheel: Path) -> dict:
    """{dotted package: its .py files} inside the wheel."""
    found = {}
    for name in zipfile.ZipFile(wheel).namelist():
        path = Path(name)
        if path.suffix == ".py":
            found.setdefault(".".join(path.parent.parts), set()).add(path.name)
    return found


def test_the_wheel_holds_every_package(tmp_path):
    pytest.importorskip("setuptools")  # --no-build-isolation builds with the installed one
    # Built from a copy, so the build's build/ and *.egg-info stay out of the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for entry in ROOT.iterdir():
        if entry.is_file():
            shutil.copy2(entry, src)
    for folder in SOURCES:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "--no-index", "--quiet", "--wheel-dir", str(tmp_path / "dist")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wheel, = (tmp_path / "dist").glob("vitprune-*.whl")
    expected, built = source_packages(), wheel_packages(wheel)
    assert "vitprune.kernels" in expected and "vitprune.bench" in expected
    missing = sorted(set(expected) - set(built))
    assert not missing, f"packages not in the wheel (add them to setup.py's packages): {missing}"
    assert built == expected
