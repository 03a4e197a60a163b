"""What the multi-stage benchmarks share (bench/distill.py, bench/mot.py, bench/conversion_quality.py's texts):
the three scoring texts, a dense model exported as a folder, and the rows log in a workdir that lets a killed
run continue and two processes split the stages (--only), a stage waiting for a folder another one writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def heldout_texts(data_dir: Path, tokenizer, tokens: int, sets: list[str] = ("tune", "valid", "ood")) -> dict[str, Any]:
    """tune: the train split's hashed held-out 1% (settings are chosen on it); valid; ood: git's documentation."""
    from sparsify.data import is_heldout, iter_documents
    from sparsify.eval.text import build_eval_text

    sources = {
        "tune": lambda: (d for d in iter_documents(str(data_dir / "corpus" / "train.jsonl.gz")) if is_heldout(d, 0.01)),
        "valid": lambda: iter_documents(str(data_dir / "corpus" / "valid.jsonl.gz")),
        "ood": lambda: iter_documents(str(data_dir / "ood-git-doc.jsonl.gz")),
    }
    return {name: build_eval_text(sources[name](), tokenizer, tokens) for name in sets}


def export_model(ref: str, target: Path) -> None:
    """Any reference (a GGUF, an alias) as a transformers folder with its tokenizer, which training reads."""
    from sparsify.sources import load_model, load_tokenizer

    if not (target / "config.json").exists():
        load_model(ref).save_pretrained(target)
        load_tokenizer(ref).save_pretrained(target)


def wait_for(path: Path, what: str) -> None:
    """Until another stage (maybe another process) has written the model folder `path`."""
    while not (path / "config.json").exists():
        print(json.dumps({"waiting_for": what}), flush=True)
        time.sleep(30)


class RowLog:
    """WORKDIR/rows.jsonl: one finished row per line, by name."""

    def __init__(self, workdir: Path):
        self.path = workdir / "rows.jsonl"

    def recorded(self) -> dict[str, dict[str, Any]]:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        return {row["name"]: row for row in map(json.loads, lines)}

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps({"row": row["name"], **{t: round(s["perplexity"], 3) for t, s in row["scores"].items()}}), flush=True)
