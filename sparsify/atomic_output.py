"""Output folders that appear whole or not at all.

Everything is written into a hidden temporary sibling of the destination, which is renamed into
place only once complete (a rename within one file system is atomic). On any failure, Ctrl-C
included, the temporary folder is removed, and an existing output is left as it was.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sparsify.errors import SparsifyError


def check_output_free(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise SparsifyError(f"{output} already exists; choose another -o/--output or pass --overwrite")


def check_disk_space(output: Path, needed_bytes: int, margin: float = 1.05) -> None:
    parent = output.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < needed_bytes * margin:
        raise SparsifyError(
            f"not enough disk space in {parent}: the output needs {needed_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free; free some space or choose another -o/--output"
        )


@contextmanager
def atomic_folder(output: Path, overwrite: bool = False) -> Iterator[Path]:
    output = output.resolve()
    check_output_free(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        _fsync_dir(staging)
        if output.exists():
            retired = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            output.rename(retired)
            staging.rename(output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(output)
        _fsync_dir(output.parent)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == 28:  # ENOSPC
            raise SparsifyError(
                f"the disk filled up while writing {output}; nothing was left behind. "
                "Free some space or choose another -o/--output"
            ) from error
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename: a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        staging.write_text(text)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
