"""Fresh conversions reproduce the teacher's logits (fp32, 1e-4) wherever exactness is promised."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from sparsify.upcycle import upcycle

EXACT_CASES = {
    "moe-e4-k2": dict(to="moe", experts=4, top_k=2),
    "moe-e3-k1": dict(to="moe", experts=3, top_k=1),
    "fine-g4": dict(to="fine-moe", granularity=4),
    "fine-g8-e2-random": dict(to="fine-moe", granularity=8, experts=2, split="random", seed=3),
    "fine-g4-e3-k8": dict(to="fine-moe", granularity=4, experts=3, top_k=8),
    "fine-g3-e2-k6-all-active": dict(to="fine-moe", granularity=3, experts=2, top_k=6),
}
INEXACT_CASES = {
    "fine-g4-k2": dict(to="fine-moe", granularity=4, top_k=2),
    "fine-g4-e2-k6": dict(to="fine-moe", granularity=4, experts=2, top_k=6),
    "moe-reinit": dict(to="moe", experts=4, top_k=2, reinit_ratio=0.5),
    "fine-g4-random-router": dict(to="fine-moe", granularity=4, experts=2, router_init="random"),
}
PROMPT_IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 429, 2940, 12], [1, 9, 99, 999, 4000, 12000, 20, 3, 77, 5, 6, 7]])


def _logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(PROMPT_IDS).logits


def _greedy(folder) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model.generate(PROMPT_IDS[:1], max_new_tokens=12, do_sample=False, pad_token_id=0)[0].tolist()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_conversion_matches_teacher(dense_weights, tmp_path, family, case):
    options = dict(EXACT_CASES[case])
    result = upcycle(str(dense_weights[family]), options.pop("to"), tmp_path / "out", **options)
    assert result.plan.exactness.exact, result.plan.exactness.reason
    teacher, student = _logits(dense_weights[family]), _logits(result.output)
    assert teacher.abs().max() > 1.0  # peaked enough that a wrong conversion would show
    torch.testing.assert_close(student, teacher, rtol=0, atol=1e-4)
    assert _greedy(result.output) == _greedy(dense_weights[family])


@pytest.mark.parametrize("case", list(INEXACT_CASES))
def test_inexact_conversion_is_declared_and_differs(dense_weights, tmp_path, case):
    options = dict(INEXACT_CASES[case])
    result = upcycle(str(dense_weights["llama"]), options.pop("to"), tmp_path / "out", **options)
    record = json.loads((result.output / "sparsify.json").read_text())
    assert record["exact"]["expected"] is False and record["exact"]["reason"]
    student, teacher = _logits(result.output), _logits(dense_weights["llama"])
    assert torch.isfinite(student).all()
    assert (student - teacher).abs().max() > 1e-3


def test_native_per_expert_layout_on_disk(dense_weights, tmp_path):
    mixtral = upcycle(str(dense_weights["llama"]), "fine-moe", tmp_path / "mixtral", granularity=2, experts=2)
    qwen = upcycle(str(dense_weights["qwen2"]), "moe", tmp_path / "qwen", experts=2, top_k=1)
    with safe_open(mixtral.output / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
        assert f.get_tensor("model.layers.0.block_sparse_moe.gate.weight").shape == (4, 64)
        assert f.get_slice("model.layers.0.block_sparse_moe.experts.0.w1.weight").get_shape() == [48, 64]
        assert not any(".mlp." in k for k in keys)
        assert "lm_head.weight" not in keys  # tied embeddings stay tied
    with safe_open(qwen.output / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.1.gate_proj.weight" in set(f.keys())
    config = json.loads((qwen.output / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["norm_topk_prob"] is True


def test_split_and_router_are_seeded(dense_weights, tmp_path):
    a = upcycle(str(dense_weights["llama"]), "fine-moe", tmp_path / "a", granularity=4, split="random", seed=7)
    b = upcycle(str(dense_weights["llama"]), "fine-moe", tmp_path / "b", granularity=4, split="random", seed=7)
    c = upcycle(str(dense_weights["llama"]), "fine-moe", tmp_path / "c", granularity=4, split="random", seed=8)
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    tensors = []
    for result in (a, b, c):
        with safe_open(result.output / "model.safetensors", "pt") as f:
            tensors.append(f.get_tensor(name))
    assert torch.equal(tensors[0], tensors[1]) and not torch.equal(tensors[0], tensors[2])
    record = json.loads((a.output / "sparsify.json").read_text())
    assert record["layout"]["split"] == {"strategy": "random", "seed": 7}


def test_bfloat16_output_is_close_to_bfloat16_teacher(dense_weights, tmp_path):
    result = upcycle(str(dense_weights["qwen3"]), "fine-moe", tmp_path / "bf16", granularity=4, dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(result.output)
    assert model.dtype == torch.bfloat16
    teacher = AutoModelForCausalLM.from_pretrained(dense_weights["qwen3"], dtype=torch.bfloat16)
    with torch.no_grad():
        diff = (model(PROMPT_IDS).logits.float() - teacher(PROMPT_IDS).logits.float()).abs().max()
    # bf16 sums G partial FFN outputs in a different order than one dense matmul.
    assert diff < 0.1


def test_sharded_output_is_indexed_and_exact(dense_weights, tmp_path):
    result = upcycle(str(dense_weights["qwen2"]), "fine-moe", tmp_path / "out", granularity=2, max_shard_bytes=2_000_000)
    index = json.loads((result.output / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    torch.testing.assert_close(_logits(result.output), _logits(dense_weights["qwen2"]), rtol=0, atol=1e-4)
