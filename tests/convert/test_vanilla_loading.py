"""Converted folders load with plain transformers in a process where sparsify cannot be imported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsify.upcycle import upcycle

VANILLA = r"""
import sys, json, torch
sys.modules["sparsify"] = None  # any attempt to import sparsify now fails
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, ids = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(torch.tensor(ids)).logits
torch.save(logits, sys.argv[3])
print(type(model).__name__, tokenizer("hello world")["input_ids"])
"""


@pytest.mark.parametrize(
    "family,architecture,options",
    [("llama", "MixtralForCausalLM", {}), ("mistral", "MixtralForCausalLM", {}), ("qwen2", "Qwen2MoeForCausalLM", {}),
     ("qwen3", "Qwen3MoeForCausalLM", {}),
     # The sigmoid-routed target with shared experts, for each attention it stands in for.
     ("llama", "Glm4MoeForCausalLM", dict(routing="sigmoid", shared_experts=1, top_k=6)),
     ("qwen2", "Glm4MoeForCausalLM", dict(routing="sigmoid", shared_experts=1, top_k=6)),
     ("qwen3", "Glm4MoeForCausalLM", dict(shared_experts=1, top_k=6))],
)
def test_loads_without_sparsify(dense_models, tmp_path, family, architecture, options):
    result = upcycle(str(dense_models[family]), "fine-moe", tmp_path / "out", granularity=4, experts=2, **options)
    ids = [[1, 42, 4242, 17, 9000, 3]]
    done = subprocess.run(
        [sys.executable, "-c", VANILLA, str(result.output), json.dumps(ids), str(tmp_path / "logits.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(architecture)
    teacher = AutoModelForCausalLM.from_pretrained(dense_models[family], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = teacher(torch.tensor(ids)).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-4)


def test_hub_id_resolves_through_the_hub_cache(dense_models, tmp_path, monkeypatch):
    """The real snapshot_download code path, served offline from a Hub cache laid out on disk."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / commit
    shutil.copytree(dense_models["llama"], snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    result = upcycle("tiny-org/tiny-llama", "moe", tmp_path / "out", experts=2, top_k=1)
    record = json.loads((result.output / "sparsify.json").read_text())
    assert record["source"]["kind"] == "hub" and record["source"]["hub_id"] == "tiny-org/tiny-llama"
    assert record["source"]["revision"] == commit
    assert "base_model: tiny-org/tiny-llama" in (result.output / "README.md").read_text()
