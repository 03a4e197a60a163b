"""Tiny random dense models of every supported family, saved as real checkpoints with a real tokenizer."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sparsify.aliases import ALIASES
from sparsify.upcycle import upcycle

FAMILY_CONFIGS = {
    "llama": dict(
        model_type="llama", tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    ),
    "mistral": dict(model_type="mistral", sliding_window=8),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
}
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,  # divisible by 2, 3, 4, 6, 8, 12
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=49152,  # SmolLM2's tokenizer
    max_position_embeddings=256,
)


def build_dense(family: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**COMMON, **FAMILY_CONFIGS[family], **overrides}
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random-init weights are small and the model near-uniform; widen them so logits are peaked and
    # a wrong conversion cannot hide inside the tolerance.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 0.08)
    return model.eval()


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


def sparsify_command() -> list[str]:
    """The installed console script, next to this interpreter."""
    executable = __import__("sys").executable
    beside = [Path(executable).parent / "sparsify", Path(os.path.realpath(executable)).parent / "sparsify"]
    found = next((str(script) for script in beside if script.exists()), None) or shutil.which("sparsify")
    assert found, "the sparsify console script is not installed; run `pip install -e .`"
    return [str(found)]


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


# Two real-tokenizer-sized rows of token ids for the skip tests.
IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 429, 2940, 12], [1, 9, 99, 999, 4000, 12000, 20, 3, 77, 5, 6, 7]])


def randomise_gates(model, seed=0):
    """Gates that keep about half the tokens, differently per token, layer and sublayer."""
    generator = torch.Generator().manual_seed(seed)
    for _, _, gate in model.skip_gates():
        gate.weight.data = torch.randn(gate.weight.shape, generator=generator) * 0.5
        gate.bias.data.zero_()


def tiny_options(corpus, **overrides):
    """Training options that run in seconds on the tiny students: 12 steps of 4 x 32 tokens."""
    from sparsify.train.options import TrainOptions

    settings = dict(
        data=str(corpus["train"]), eval_data=str(corpus["valid"]), tokens="1536", seq_len=32, batch_size=4,
        eval_every=0, eval_tokens="512", checkpoint_every=0, lr=3e-3, router_lr=3e-2, lora_rank=4, lora_alpha=8.0,
    )
    return TrainOptions(**{**settings, **overrides})
