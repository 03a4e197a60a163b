"""The teacher's top-k log-probabilities on disk (`--cache-teacher DIR`), filled the first time each
training block is seen and read back ever after: across epochs, across a resumed run, and across runs
on the same data and teacher (the four `sparsify distill --init`s of one MoE pay for one teacher pass).

Per token we keep the k largest teacher log-probabilities at the run's temperature, their token ids,
and the mass of the rest (the tail). KL(p || q) is then computed with the tail as one more outcome:
    sum_{i in top-k} p_i (log p_i - log q_i)  +  r (log r - log q_tail),   r = 1 - sum_{top-k} p_i,
which is the exact KL when k covers the vocabulary (r = 0) and, below that, the KL between the two
distributions coarsened to (top-k tokens, everything else) (DistillKit's offline logits, k = 64-128).

Layout of DIR: meta.json (what the cache is valid for: the teacher's weights, the training tokens, the
block length, k, the temperature), and four memory-mapped arrays over the training file's blocks:
logprobs (float32), ids (uint16 when the vocabulary fits, else int32), tail (float32) and filled
(uint8, one flag per block, written after the block's values so a kill never leaves a half block marked).
Processes of one DDP run write disjoint blocks of the same files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sparsify.errors import SparsifyError

META = "meta.json"


@dataclass(frozen=True)
class CacheKey:
    """What the stored values depend on; a cache is reused only where every field matches."""

    teacher: str  # digest of the teacher's weight files (or its reference where there are none here)
    tokens: str  # sha256 of the training token file
    seq_len: int
    top_k: int
    temperature: float
    vocab: int


@dataclass(frozen=True)
class TopK:
    """Teacher targets of a batch: (blocks, seq_len, k) log-probabilities and ids, (blocks, seq_len) tail mass."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    tail: torch.Tensor


def top_k_targets(teacher_logits: torch.Tensor, k: int, temperature: float) -> TopK:
    """The teacher's k most likely tokens at `temperature` and the exact mass of all the others."""
    logprobs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    k = min(k, logprobs.shape[-1])
    top, ids = logprobs.topk(k, dim=-1)
    # The tail summed over the tokens outside the top-k (not 1 - sum(top), whose rounding error would
    # stand in for a tail where k covers the vocabulary and there is none).
    outside = logprobs.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(outside, dim=-1).exp() if k < logprobs.shape[-1] else torch.zeros(logprobs.shape[:-1], device=logprobs.device)
    return TopK(top, ids, tail)


def teacher_digest(reference: str | Path) -> str:
    """A digest of the weights a teacher reference names: the sha256 of a folder's weight files (and
    config) or of a single file; a Hub id or alias is taken by name."""
    from sparsify.provenance import file_sha256, fingerprint_weights

    path = Path(reference)
    if path.is_dir():
        parts = {name: entry["sha256"] for name, entry in fingerprint_weights(path).items()}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    if path.is_file():
        return file_sha256(path)
    return f"ref:{reference}"


def token_file_digest(path: Path) -> str:
    from sparsify.provenance import file_sha256

    return file_sha256(path)


class TeacherCache:
    """The memory-mapped arrays of one cache folder, for one training token file."""

    def __init__(self, folder: Path, key: CacheKey, blocks: int):
        self.folder, self.key, self.blocks = folder, key, blocks
        ids_dtype = np.uint16 if key.vocab <= np.iinfo(np.uint16).max + 1 else np.int32
        shape = (blocks, key.seq_len)
        self._arrays = {
            "logprobs": (np.float32, (*shape, key.top_k)),
            "ids": (ids_dtype, (*shape, key.top_k)),
            "tail": (np.float32, shape),
            "filled": (np.uint8, (blocks,)),
        }
        self.logprobs = self.ids = self.tail = self.filled = None

    @classmethod
    def open(cls, folder: str | Path, key: CacheKey, blocks: int, create: bool) -> TeacherCache:
        """Open the cache in `folder` for `key`; with `create` (one process), make it if it is new.
        A folder made for another teacher, text or setting is refused, never overwritten."""
        folder = Path(folder)
        cache = cls(folder, key, blocks)
        meta_path = folder / META
        if meta_path.exists():
            found = json.loads(meta_path.read_text())
            expected = {**asdict(key), "blocks": blocks}
            differing = sorted(name for name in expected if found.get(name) != expected[name])
            if differing:
                raise SparsifyError(
                    f"--cache-teacher {folder} holds a cache for another run ({', '.join(differing)} differ); "
                    "give another folder, or delete this one to rebuild it"
                )
        elif create:
            if folder.exists() and any(folder.iterdir()):
                raise SparsifyError(f"--cache-teacher {folder} exists and is not a teacher cache; give an empty or new folder")
            folder.mkdir(parents=True, exist_ok=True)
            for name, (dtype, shape) in cache._arrays.items():
                np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
            (folder / META).write_text(json.dumps({**asdict(key), "blocks": blocks}, indent=2) + "\n")  # last: the cache exists once this does
        else:
            raise SparsifyError(f"teacher cache {folder} has not been created")
        for name in cache._arrays:
            setattr(cache, name, np.load(folder / f"{name}.npy", mmap_mode="r+"))
        return cache

    @property
    def filled_blocks(self) -> int:
        return int(self.filled.sum())

    def targets(self, blocks: torch.Tensor, teacher_logits: Callable[[], torch.Tensor], device: torch.device) -> TopK:
        """The stored targets of `blocks`; blocks not stored yet are computed from `teacher_logits()`
        (the teacher's logits of the whole batch, in `blocks` order), written, and read back, so a first
        visit trains on exactly what every later one reads."""
        index = blocks.cpu().numpy()
        missing = np.flatnonzero(self.filled[index] == 0)
        if missing.size:
            fresh = top_k_targets(teacher_logits()[torch.from_numpy(missing).to(device)], self.key.top_k, self.key.temperature)
            rows = index[missing]
            self.logprobs[rows] = fresh.logprobs.cpu().numpy()
            self.ids[rows] = fresh.ids.cpu().numpy().astype(self.ids.dtype)
            self.tail[rows] = fresh.tail.cpu().numpy()
            self.filled[rows] = 1  # after the values
        return TopK(
            torch.from_numpy(np.ascontiguousarray(self.logprobs[index])).to(device),
            torch.from_numpy(self.ids[index].astype(np.int64)).to(device),
            torch.from_numpy(np.ascontiguousarray(self.tail[index])).to(device),
        )

    def flush(self) -> None:
        for name in self._arrays:
            getattr(self, name).flush()


__all__ = ["CacheKey", "TeacherCache", "TopK", "teacher_digest", "token_file_digest", "top_k_targets"]
