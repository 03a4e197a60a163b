"""Text in, fixed-length token blocks out: seeded, deterministic, and materialised once per run.

Documents come from a Hub dataset (streamed) or local files (txt, jsonl, parquet; gzipped or
not). They are tokenized with the model's tokenizer, joined with EOS, and the token stream is
written to a flat int32 file in the run folder; blocks are consecutive `seq_len` slices of it, so
no token is lost or duplicated across blocks. Re-using that file is what makes resuming exact.

Held-out text: `eval_sources` when given, otherwise the documents whose stable hash falls in the
`heldout_fraction` bucket, which training never sees.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from sparsify.errors import SparsifyError
from sparsify.text_files import check_sources, loader_for, local_files



@dataclass(frozen=True)
class DataSpec:
    sources: tuple[str, ...]
    eval_sources: tuple[str, ...] = ()
    text_field: str = "text"
    heldout_fraction: float = 0.01


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Documents of one source, in a fixed order (files sorted; a .txt file is one document)."""
    files = local_files(source)
    if files is None:
        from datasets import load_dataset

        check_sources([source])
        try:
            rows = load_dataset(source, split="train", streaming=True)
        except Exception as error:
            raise SparsifyError(f"could not open Hub dataset '{source}' ({type(error).__name__}: {error})") from error
        for row in rows:
            yield _text_of(row, text_field, source)
        return
    for path in files:
        loader = loader_for(path)
        opener = gzip.open if path.endswith(".gz") else open
        if loader == "text":
            with opener(path, "rt", encoding="utf-8") as handle:
                yield handle.read()
        elif loader == "json":  # JSON lines, read with the standard library: fast and dependable
            with opener(path, "rt", encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        yield _text_of(json.loads(line), text_field, path)
        else:
            from datasets import load_dataset

            for row in load_dataset(loader, data_files=path, split="train", streaming=True):
                yield _text_of(row, text_field, path)


def _text_of(row: dict[str, Any], field: str, where: str) -> str:
    if field not in row:
        raise SparsifyError(f"{where} has no '{field}' column (columns: {', '.join(row)}); pass --text-field")
    return row[field]


def is_heldout(text: str, fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % 10_000
    return bucket < fraction * 10_000


def split_documents(spec: DataSpec, heldout: bool) -> Iterator[str]:
    if heldout and spec.eval_sources:
        for source in spec.eval_sources:
            yield from iter_documents(source, spec.text_field)
        return
    for source in spec.sources:
        for text in iter_documents(source, spec.text_field):
            if spec.eval_sources or is_heldout(text, spec.heldout_fraction) == heldout:
                yield text


def tokenize_stream(documents: Iterable[str], tokenizer: Any, max_tokens: int, batch_docs: int = 64) -> Iterator[np.ndarray]:
    """int32 token chunks: each document's tokens followed by EOS, until max_tokens."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SparsifyError("the tokenizer has no EOS token to separate documents")
    produced, batch = 0, []

    def flush(texts: list[str]) -> Iterator[np.ndarray]:
        nonlocal produced
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            chunk = np.asarray([*ids, eos], dtype=np.int32)[: max_tokens - produced]
            produced += len(chunk)
            yield chunk
            if produced >= max_tokens:
                return

    for text in documents:
        if text:
            batch.append(text)
        if len(batch) == batch_docs:
            yield from flush(batch)
            batch = []
            if produced >= max_tokens:
                return
    if batch and produced < max_tokens:
        yield from flush(batch)


class TokenFile:
    """A materialised token stream and its blocks."""

    def __init__(self, path: Path, seq_len: int):
        self.tokens = torch.from_numpy(np.fromfile(path, dtype=np.int32).astype(np.int64))
        self.seq_len = seq_len
        self.num_blocks = len(self.tokens) // seq_len
        if self.num_blocks == 0:
            raise SparsifyError(f"{path} holds {len(self.tokens)} tokens, fewer than one block of {seq_len}")

    def blocks(self, indices: torch.Tensor) -> torch.Tensor:
        starts = indices.long() * self.seq_len
        return self.tokens[starts[:, None] + torch.arange(self.seq_len)]


def materialise(spec: DataSpec, tokenizer: Any, folder: Path, train_tokens: int, eval_tokens: int, on_tokens=lambda n: None) -> dict[str, Path]:
    """Write train.tokens and heldout.tokens once; later calls with the same spec reuse them."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"spec": asdict(spec), "tokenizer": getattr(tokenizer, "name_or_path", "?"), "train_tokens": train_tokens, "eval_tokens": eval_tokens}
    meta_path = folder / "data.json"
    paths = {"train": folder / "train.tokens", "heldout": folder / "heldout.tokens"}
    if meta_path.exists() and json.loads(meta_path.read_text()) == json.loads(json.dumps(meta)) and all(p.exists() for p in paths.values()):
        return paths
    for split, budget in (("train", train_tokens), ("heldout", eval_tokens)):
        partial = paths[split].with_suffix(".partial")
        with open(partial, "wb") as handle:
            count = 0
            for chunk in tokenize_stream(split_documents(spec, heldout=split == "heldout"), tokenizer, budget):
                handle.write(chunk.tobytes())
                count += len(chunk)
                on_tokens(len(chunk))
        if count == 0:
            raise SparsifyError(f"no {split} text found in {', '.join(spec.eval_sources if split == 'heldout' and spec.eval_sources else spec.sources)}")
        partial.rename(paths[split])
    meta_path.write_text(json.dumps(meta, indent=2))
    return paths


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def block_order(num_blocks: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Block indices start..start+count of an endless sequence of seeded per-epoch shuffles."""
    out: list[int] = []
    position = start
    while len(out) < count:
        epoch, offset = divmod(position, num_blocks)
        permutation = _epoch_permutation(num_blocks, seed, epoch)
        take = permutation[offset : offset + count - len(out)]
        out.extend(take.tolist())
        position += len(take)
    return torch.tensor(out, dtype=torch.long)
