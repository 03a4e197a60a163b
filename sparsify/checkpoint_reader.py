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


def read_safetensors_header(path: Path) -> dict[str, _Entry]:
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise SparsifyError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        entries[name] = _Entry(path, tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]], 8 + size + begin, end - begin)
    return entries


class SafetensorsReader:
    """Lazy reader over every `*.safetensors` file of a folder (single file or shards)."""

    def __init__(self, folder: Path):
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise SparsifyError(f"no .safetensors files in {folder}")
        self._entries: dict[str, _Entry] = {}
        for file in files:
            self._entries.update(read_safetensors_header(file))
        self._fds: dict[Path, int] = {}

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
