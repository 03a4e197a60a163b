"""Read a checkpoint's tensors one at a time, knowing shapes and dtypes before reading any data.

`SafetensorsReader` parses the safetensors headers itself and reads each tensor with a plain
positioned read into a fresh buffer. It deliberately avoids memory-mapping: mapped pages that were
touched count towards the process's resident memory, so streaming a large checkpoint through a
mapping looks (and, under memory pressure, behaves) like loading it whole.
`InMemoryReader` serves tensors that had to be loaded whole (GGUF files, which transformers
dequantizes; trusted pickle checkpoints).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from sparsify.errors import SparsifyError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorReader(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class _Entry:
    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int  # absolute byte offset in the file
    nbytes: int


def _raw_header(path: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file, any dtypes; a malformed one is refused in one line."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        try:
            if not 0 < size <= file_size - 8:
                raise ValueError(f"header length {size} does not fit in {file_size} bytes")
            return size, json.loads(handle.read(size))
        except (ValueError, UnicodeDecodeError) as error:
            raise SparsifyError(f"{path} is not a readable safetensors file ({error}); re-download or re-export it") from error


def read_safetensors_header(path: Path) -> dict[str, _Entry]:
    size, header = _raw_header(path)
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise SparsifyError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        entries[name] = _Entry(path, tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]], 8 + size + begin, end - begin)
    return entries


def check_weight_files(folder: Path) -> None:
    """Every safetensors file of `folder` is whole: its header parses and the file is as long as
    the header says. Reads headers only, so a broken download is refused in milliseconds rather
    than with a loader's traceback after the model has half loaded."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        # Offsets only: a dtype sparsify cannot convert (FP8, say) is still a whole file that
        # transformers may load; it is refused only where sparsify has to read the tensor.
        size, header = _raw_header(path)
        ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
        needed = 8 + size + max(ends, default=0)
        have = os.path.getsize(path)
        if have < needed:
            raise SparsifyError(
                f"{path} is truncated: {have:,} bytes where its header needs {needed:,}; re-download, re-convert or re-save it"
            )


class SafetensorsReader:
    """Lazy reader over every `*.safetensors` file of a folder (single file or shards)."""

    def __init__(self, folder: Path):
        self._fds: dict[Path, int] = {}  # first: __del__ runs even when the checks below refuse the folder
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise SparsifyError(f"no .safetensors files in {folder}")
        check_weight_files(folder)
        self._entries: dict[str, _Entry] = {}
        for file in files:
            self._entries.update(read_safetensors_header(file))

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name].dtype

    def get(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        if entry.path not in self._fds:
            self._fds[entry.path] = os.open(entry.path, os.O_RDONLY)
        out = torch.empty(entry.shape, dtype=entry.dtype)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if entry.nbytes else memoryview(b"")
        done = 0
        while done < entry.nbytes:
            got = os.preadv(self._fds[entry.path], [view[done:]], entry.start + done)
            if got == 0:
                raise SparsifyError(f"{entry.path} is truncated (tensor {name}); re-download or re-export it")
            done += got
        return out

    def __del__(self):
        for fd in self._fds.values():
            os.close(fd)


class InMemoryReader:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def load_pickle_checkpoint(folder: Path) -> InMemoryReader:
    """Load `pytorch_model*.bin` with `weights_only=True` (refuses arbitrary objects)."""
    index = folder / "pytorch_model.bin.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(folder.glob("pytorch_model*.bin"))]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(torch.load(folder / file, map_location="cpu", weights_only=True))
    return InMemoryReader(tensors)
