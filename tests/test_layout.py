"""The checkout's layout never shadows installed packages.

``python -m pytest``, ``python -m benchmarks...`` and a REPL started in the checkout put its root
on ``sys.path`` (a benchmark script puts ``benchmarks/``): a module or regular package there with
the name of an installed distribution's module would replace it (transformers imports the PyPI
``kernels`` package, for one).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _importable_names(folder: Path) -> set[str]:
    """Top-level names that ``folder`` on ``sys.path`` makes importable as modules or regular packages."""
    names = {path.stem for path in folder.glob("*.py")}
    names |= {path.parent.name for path in folder.glob("*/__init__.py")}
    return names


def _installed_top_level_names() -> set[str]:
    """Top-level modules of installed distributions other than fastgen itself."""
    return {
        name
        for name, distributions in importlib.metadata.packages_distributions().items()
        if set(distributions) - {"fastgen"}
    }


@pytest.mark.parametrize("folder", [".", "benchmarks", "examples"])
def test_no_name_on_a_checkout_path_shadows_an_installed_distribution(folder):
    clashes = _importable_names(ROOT / folder) & _installed_top_level_names()
    assert not clashes, f"{folder}/ would shadow installed modules {sorted(clashes)}"


def test_kernels_folder_is_not_a_top_level_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "fastgen_kernels" / "__init__.py").is_file()


def _kernels_seen_from_the_checkout_root(extra_path: str = "") -> Path:
    # `-c` puts the current directory first on sys.path, as `python -m pytest` does
    env = {**os.environ, "PYTHONPATH": extra_path} if extra_path else None
    found = subprocess.run(
        [sys.executable, "-c", "import kernels; print(kernels.__file__)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Path(found).resolve()


def test_import_kernels_from_the_checkout_root_gets_an_installed_package(tmp_path):
    stand_in = tmp_path / "kernels" / "__init__.py"  # a package installed later on the path
    stand_in.parent.mkdir()
    stand_in.write_text("")
    assert _kernels_seen_from_the_checkout_root(str(tmp_path)) == stand_in.resolve()


def test_import_kernels_from_the_checkout_root_gets_the_installed_distribution():
    try:  # transformers >= 5.25 depends on it
        distribution = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # the stand-in test above covers this machine
    expected = Path(distribution.locate_file("kernels/__init__.py")).resolve()
    assert _kernels_seen_from_the_checkout_root() == expected


def test_triton_kernels_are_one_module_object():
    code = (
        "import sys, pathlib, fastgen.kernels, fastgen.kernels.attention_triton, fastgen.layers.attention\n"
        f"folder = pathlib.Path({str(ROOT / 'kernels')!r}).resolve()\n"
        "owners = sorted(name for name, module in list(sys.modules.items())\n"
        "                if getattr(module, '__file__', None)\n"
        "                and folder in pathlib.Path(module.__file__).resolve().parents)\n"
        "print('\\n'.join(owners))\n"
    )
    owners = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "fastgen.kernels.attention_triton" in owners
    assert all(name == "fastgen.kernels" or name.startswith("fastgen.kernels.") for name in owners), owners
