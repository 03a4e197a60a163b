"""Write planned tensors as safetensors shards, one tensor at a time.

The plan (names, shapes, dtypes) is known before any data is computed, so each shard's header is
written first and tensors are then produced and streamed into it in order: memory holds one tensor
(plus whatever its producer caches), never a shard. The file format is safetensors' own: an 8-byte
little-endian header size, a JSON header with byte offsets, then the raw data.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from sparsify.checkpoint_reader import SAFETENSORS_DTYPES

DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_filename(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _header(tensors: list[PlannedTensor]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        entries[tensor.name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)  # data starts 8-byte aligned


def _produced(tensors: list[PlannedTensor], lookahead: int = 2) -> Iterator[tuple[PlannedTensor, torch.Tensor]]:
    """Yield (plan, tensor) in order while one worker thread produces the next ones.

    Producing (reading, slicing, scaling) and writing then overlap: both release the GIL. One
    worker keeps the producers' calls in plan order, which their per-layer caches rely on.
    """
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending: deque = deque()
        for planned in tensors:
            pending.append((planned, worker.submit(planned.produce)))
            if len(pending) > lookahead:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _write_shard(path: Path, tensors: list[PlannedTensor], on_bytes: Callable[[int], None]) -> None:
    header = _header(tensors)
    with open(path, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little"))
        handle.write(header)
        for planned, tensor in _produced(tensors):
            if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
                raise AssertionError(
                    f"{planned.name}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                    f"planned {planned.shape} {planned.dtype}"
                )
            if planned.nbytes:
                handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            on_bytes(planned.nbytes)
        handle.flush()
        os.fsync(handle.fileno())


def write_checkpoint(
    folder: Path,
    tensors: Iterable[PlannedTensor],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> dict[str, str]:
    """Write the shards (and an index when there are several); returns the weight map."""
    shards = plan_shards(list(tensors), max_shard_bytes)
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards):
        filename = shard_filename(index, len(shards))
        _write_shard(folder / filename, shard, on_bytes)
        weight_map.update({t.name: filename for t in shard})
    if len(shards) > 1:
        total = sum(t.nbytes for shard in shards for t in shard)
        index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
    return weight_map
