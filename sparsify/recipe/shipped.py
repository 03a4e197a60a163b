"""The recipes that ship with sparsify (the YAML files in the top-level recipes/ folder, installed
as the package data of `sparsify.recipes`), by name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sparsify.errors import SparsifyError
from sparsify.recipe.schema import closest


def shipped() -> dict[str, Path]:
    """Every shipped recipe by name (its file name without .yaml), sorted."""
    folder = resources.files("sparsify.recipes")
    return {Path(entry.name).stem: Path(str(entry)) for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".yaml")}


def summary(path: Path) -> str:
    """A recipe's first comment line: what it makes."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def find_recipe(name_or_path: str) -> Path:
    """A recipe file: a path that exists, else a shipped recipe's name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    recipes = shipped()
    if name_or_path in recipes:
        return recipes[name_or_path]
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        raise SparsifyError(f"recipe {path} not found; `sparsify recipes list` shows the shipped ones")
    raise SparsifyError(f"no recipe file or shipped recipe named '{name_or_path}'{closest(name_or_path, recipes)} "
                        f"(shipped: {', '.join(recipes)})")
