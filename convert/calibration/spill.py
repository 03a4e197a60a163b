"""Per-layer results too large to hold for every layer at once (refitted down projections) wait on
disk until the writer asks for them, so a calibrated conversion keeps the memory bound of a plain
one. The folder is temporary and goes when the last conversion step referring to it does."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


class TensorSpill:
    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="sparsify-calibration-")

    def put(self, name: str, tensor: torch.Tensor) -> Path:
        path = Path(self._folder.name) / f"{name}.pt"
        torch.save(tensor.detach().cpu().contiguous(), path)
        return path

    def get(self, path: Path) -> torch.Tensor:
        return torch.load(path, weights_only=True)
