"""Which local files a data source names, and whether sparsify can read them.

Torch-free on purpose: options are checked against the file system in milliseconds, before any
model (or torch) is loaded.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterable

from sparsify.errors import SparsifyError

LOADERS = {".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def local_files(source: str) -> list[str] | None:
    matches = sorted(glob.glob(source)) if any(c in source for c in "*?[") else ([source] if Path(source).exists() else [])
    if Path(source).is_dir():
        matches = sorted(str(p) for p in Path(source).rglob("*") if p.is_file())
    return matches or None


def loader_for(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    suffix = Path(name).suffix
    if suffix not in LOADERS:
        raise SparsifyError(f"cannot read {path}: use .txt, .jsonl or .parquet files (optionally .gz)")
    return LOADERS[suffix]


def check_sources(sources: Iterable[str], flag: str = "--data") -> None:
    """Refuse, in a blink and before any model is loaded, a source that names no readable local
    files and cannot be a Hub dataset id. (A Hub id is checked when it is opened.)"""
    for source in sources:
        files = local_files(source)
        if files is None:
            looks_local = any(c in source for c in "*?[") or source.startswith((".", "/", "~")) or Path(source).suffix in (".gz", ".jsonl", ".txt", ".parquet")
            if looks_local or "/" not in source:
                raise SparsifyError(f"{flag}: no files match '{source}', and it is not a Hub dataset id (owner/name)")
            continue
        for path in files:
            loader_for(path)
