"""Sigmoid routing with a selection bias (GLM-4.5-MoE target): exact conversions for every family,
the shared expert without a gate, and router math equal to transformers' own router."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from sparsify.errors import SparsifyError
from sparsify.upcycle import upcycle

PROMPT_IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 429, 2940, 12]])


def _logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(PROMPT_IDS).logits


@pytest.mark.parametrize("family, qk_norm, attention_bias", [("llama", False, False), ("qwen2", False, True), ("qwen3", True, False)])
@pytest.mark.parametrize("options", [dict(granularity=4, shared_experts=1, top_k=3), dict(granularity=4, experts=2, top_k=8),
                                     dict(granularity=4, experts=3, top_k=4)],
                         ids=["shared", "two-copies", "router-picks-one-of-three-copies"])
def test_sigmoid_targets_reproduce_the_teacher(dense_weights, tmp_path, family, qk_norm, attention_bias, options):
    result = upcycle(str(dense_weights[family]), "fine-moe", tmp_path / "out", routing="sigmoid", **options)
    assert result.plan.exactness.exact, result.plan.exactness.reason
    config = json.loads((result.output / "config.json").read_text())
    assert config["model_type"] == "glm4_moe" and config["use_qk_norm"] is qk_norm and config["attention_bias"] is attention_bias
    assert config["rope_parameters"]["partial_rotary_factor"] == 1.0 and config["first_k_dense_replace"] == 0
    assert config["n_shared_experts"] == options.get("shared_experts", 0) and config["moe_intermediate_size"] == 24
    with safe_open(str(result.output / "model.safetensors"), "pt") as weights:
        bias = weights.get_tensor("model.layers.0.mlp.gate.e_score_correction_bias")
        assert bias.dtype == torch.float32 and not bias.any()
        assert weights.get_tensor("model.layers.0.mlp.gate.weight").dtype == torch.float32  # GLM keeps routers in fp32
        assert not any("shared_expert_gate" in name for name in weights.keys())
    torch.testing.assert_close(_logits(result.output), _logits(dense_weights[family]), rtol=0, atol=1e-4)
    assert json.loads((result.output / "sparsify.json").read_text())["layout"]["routing"] == "sigmoid"


def test_qwen3_with_shared_experts_takes_the_sigmoid_target_by_default(dense_weights, tmp_path):
    result = upcycle(str(dense_weights["qwen3"]), "fine-moe", tmp_path / "out", granularity=4, shared_experts=2, top_k=2)
    assert json.loads((result.output / "config.json").read_text())["model_type"] == "glm4_moe"
    assert result.plan.exactness.exact
    plain = upcycle(str(dense_weights["qwen3"]), "fine-moe", tmp_path / "plain", granularity=4)
    assert json.loads((plain.output / "config.json").read_text())["model_type"] == "qwen3_moe"  # softmax stays the default


@pytest.mark.parametrize("options, message", [
    (dict(granularity=2, shared_experts=1, routing="sigmoid"), "at least 2 routed experts"),
    (dict(granularity=4, routing="gumbel"), "--routing must be one of softmax, sigmoid"),
])
def test_bad_routing_options_get_one_line_errors(dense_weights, tmp_path, options, message):
    with pytest.raises(SparsifyError, match=message) as error:
        upcycle(str(dense_weights["llama"]), "fine-moe", tmp_path / "out", **options)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("groups, top_groups", [(1, 1), (4, 2)])
def test_training_router_forward_equals_the_native_router(groups, top_groups):
    """sparsify's fp32 training forward (prepare_routers) chooses and weighs as Glm4MoeTopkRouter does."""
    from transformers import AutoConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    from sparsify.convert.moe.decisions import prepare_routers

    config = AutoConfig.for_model("glm4_moe", hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=groups,
                                  topk_group=top_groups, routed_scaling_factor=2.5, norm_topk_prob=True, moe_intermediate_size=8,
                                  n_shared_experts=1)
    block = Glm4MoeMoE(config)
    generator = torch.Generator().manual_seed(0)
    block.gate.weight.data = torch.randn(16, 32, generator=generator)
    block.gate.e_score_correction_bias.copy_(torch.randn(16, generator=generator) * 0.3)
    hidden = torch.randn(50, 32, generator=generator)
    native_logits, native_weights, native_index = block.gate(hidden)
    (router,) = prepare_routers(block)
    logits, weights, index = router(hidden)
    torch.testing.assert_close(logits, native_logits)
    order, native_order = index.sort(dim=-1), native_index.sort(dim=-1)
    assert torch.equal(order.values, native_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), native_weights.gather(1, native_order.indices))
