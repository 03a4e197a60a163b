"""The built wheel (not the editable install) holds every module of the source tree.

`pyproject.toml` lists its packages by hand, because the required top-level folders convert/ and
eval/ are mapped into `sparsify`; a new subpackage missing from that list would import fine from
a checkout and be absent from every installed copy. This builds the wheel and imports every
module from it alone: the editable install's import hook is kept out by starting Python without
`site` (so no .pth file runs) and naming the dependencies' folder explicitly.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Source folder -> the package it becomes (pyproject.toml's package-dir mapping).
MAPPING = {"sparsify": "sparsify", "convert": "sparsify.convert", "eval": "sparsify.eval", "recipes": "sparsify.recipes"}


def source_modules() -> set[str]:
    modules = set()
    for folder, package in MAPPING.items():
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            if relative.name == "__main__":  # runs the CLI when imported; `python -m sparsify` is its test
                continue
            parts = [p for p in relative.parts if p != "__init__"]
            modules.add(".".join([package, *parts]))
    return modules


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory) -> Path:
    from importlib import metadata

    import shutil

    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: a build in the checkout would reuse its build/ folder, whose stale
    # modules could hide a package missing from the list.
    source = out / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", *MAPPING):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    # The installed setuptools builds it when it is new enough (no download); otherwise pip fetches
    # one into an isolated build environment, as `pip install` does.
    try:
        recent = int(metadata.version("setuptools").split(".")[0]) >= 69
    except metadata.PackageNotFoundError:
        recent = False
    isolation = ["--no-build-isolation"] if recent else []
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out), str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    wheel = next(out.glob("sparsify_lm-*.whl"))
    target = out / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def test_the_wheel_holds_every_module_and_each_imports_from_it(unpacked_wheel):
    expected = source_modules()
    probe = (
        "import importlib, json, sys\n"
        f"names = {sorted(expected)!r}\n"
        "where = {}\n"
        "for name in names:\n"
        "    try:\n"
        "        where[name] = importlib.import_module(name).__file__\n"
        "    except ImportError as error:\n"
        "        where[name] = 'missing: ' + str(error)\n"
        "print(json.dumps(where))\n"
    )
    dependencies = sysconfig.get_paths()["purelib"]
    done = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": f"{unpacked_wheel}:{dependencies}", "PATH": "/usr/bin:/bin"}, cwd="/")
    assert done.returncode == 0, done.stderr
    import json

    where = json.loads(done.stdout.splitlines()[-1])
    missing = {name: place for name, place in where.items() if not str(place).startswith(str(unpacked_wheel))}
    assert not missing, missing


def test_the_wheel_ships_the_data_files_the_code_reads(unpacked_wheel):
    shipped = {str(p.relative_to(unpacked_wheel)) for p in unpacked_wheel.rglob("*") if p.suffix in (".cu", ".yaml", ".jsonl")}
    assert any(name.endswith("decode_kernels.cu") for name in shipped), shipped
    assert "sparsify/eval/tasks/sparsify_tiny.yaml" in shipped and "sparsify/eval/tasks/sparsify_tiny.jsonl" in shipped


def test_the_wheel_carries_every_shipped_recipe(unpacked_wheel):
    shipped = {path.name for path in (ROOT / "recipes").glob("*.yaml")}
    assert shipped and shipped == {path.name for path in (unpacked_wheel / "sparsify" / "recipes").glob("*.yaml")}
