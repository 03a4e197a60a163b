"""Fixtures: tiny random dense models of every supported family, saved as real checkpoints with a real
tokenizer; converted students; slices of the real corpus. Plain helpers live in support.py."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from sparsify.aliases import ALIASES
from sparsify.upcycle import upcycle
from support import FAMILY_CONFIGS, build_dense

@pytest.fixture(scope="session")
def real_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer, read once from the packaged GGUF and saved as tokenizer files."""
    from transformers import AutoTokenizer

    gguf = ALIASES["smollm2-135m"].path()
    folder = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def dense_weights(tmp_path_factory) -> dict[str, Path]:
    """family -> folder with config.json and model.safetensors only (no tokenizer)."""
    folders = {}
    for family in FAMILY_CONFIGS:
        folder = tmp_path_factory.mktemp(f"dense-{family}")
        build_dense(family).save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="session")
def dense_models(tmp_path_factory, dense_weights, real_tokenizer_dir) -> dict[str, Path]:
    """family -> folder with config.json, model.safetensors and SmolLM2's real tokenizer files."""
    folders = {}
    for family, weights in dense_weights.items():
        folder = tmp_path_factory.mktemp(f"dense-{family}-tokenized")
        shutil.copytree(weights, folder, dirs_exist_ok=True)
        for file in real_tokenizer_dir.iterdir():
            shutil.copy(file, folder / file.name)
        folders[family] = folder
    return folders


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test may reach the network; the Hub code path is exercised against a local cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Small jsonl.gz slices of the shared corpus (real text), so tests tokenize little."""
    if not (CORPUS / "train.jsonl.gz").exists():
        pytest.skip("../shared/data/corpus is not here")
    folder = tmp_path_factory.mktemp("corpus")
    slices = {}
    for split, count in (("train", 40), ("valid", 4)):
        with gzip.open(CORPUS / f"{split}.jsonl.gz", "rt") as source, gzip.open(folder / f"{split}.jsonl.gz", "wt") as target:
            for _ in range(count):
                line = json.loads(source.readline())
                target.write(json.dumps({"text": line["text"][:4000]}) + "\n")
        slices[split] = folder / f"{split}.jsonl.gz"
    return slices


@pytest.fixture(scope="session")
def students(tmp_path_factory, dense_models) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("students")
    return {
        "exact": upcycle(str(dense_models["llama"]), "fine-moe", folder / "exact", granularity=4, experts=2).output,
        "half": upcycle(str(dense_models["llama"]), "fine-moe", folder / "half", granularity=4, top_k=2).output,
        # Exact layout but a random router: top-4 mixes partitions of the two copies unevenly.
        "misrouted": upcycle(
            str(dense_models["llama"]), "fine-moe", folder / "misrouted", granularity=4, experts=2, router_init="random", router_std=0.5
        ).output,
    }


@pytest.fixture
def hub(monkeypatch, tmp_path_factory):
    """A fresh Hub-protocol server on 127.0.0.1 (tests/hub_server.py) with users alice and bob, and
    this process's huggingface_hub pointed at it, logged out, with an empty home: `.url`, `.token`
    (alice's), `.server`, `.login()`, `.env(token=True)` for a subprocess. Fails the test at the end if
    a request went unhandled."""
    from hub_server import serve_for_a_test

    yield from serve_for_a_test(monkeypatch, tmp_path_factory.mktemp("hf-home"))
