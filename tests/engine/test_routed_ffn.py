"""The decode engine's fused MoE sublayer (norm+route, gate_up, down+add; sparsify/engine/routed_ffn.py):
when it applies and why not (CPU), and on a GPU, against the decoder layer's own modules for every
routed block sparsify writes, then inside the replayed graph."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeDecoderLayer
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

from sparsify.engine.routed_ffn import RoutedFFN
from sparsify.experts import register

ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2}
LAYERS = {
    "mixtral": lambda: MixtralDecoderLayer(MixtralConfig(hidden_size=256, intermediate_size=96, num_local_experts=8,
                                                         num_experts_per_tok=2, **ATTENTION), 0),
    "qwen2-moe": lambda: Qwen2MoeDecoderLayer(Qwen2MoeConfig(hidden_size=256, moe_intermediate_size=64, num_experts=6, num_experts_per_tok=4,
                                                             shared_expert_intermediate_size=0, norm_topk_prob=True, **ATTENTION), 0),
    "qwen3-moe": lambda: Qwen3MoeDecoderLayer(Qwen3MoeConfig(hidden_size=192, moe_intermediate_size=80, num_experts=8, num_experts_per_tok=3,
                                                             norm_topk_prob=False, head_dim=48, **ATTENTION), 0),
}


def _layer(name: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = LAYERS[name]()
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    with torch.no_grad():
        layer.post_attention_layernorm.weight.add_(1.0)
    register()
    layer.mlp.experts.config._experts_implementation = "sparsify"
    return layer.to(device, dtype).eval()


def test_the_fused_sublayer_says_why_it_does_not_apply():
    layer = _layer("mixtral")
    hidden = torch.zeros(1, 1, 256, dtype=torch.bfloat16)
    routed, why = RoutedFFN.of(layer, hidden)
    if not torch.cuda.is_available():
        assert routed is None and why == "no GPU or no Triton"
    layer.mlp.experts.config._experts_implementation = "grouped_mm"
    assert RoutedFFN.of(layer, hidden) == (None, "the experts do not run under sparsify's implementation")
    layer.mlp.experts.config._experts_implementation = "sparsify"
    assert RoutedFFN.of(layer, hidden.float())[1] == "the experts' layout or activation is not the kernels'"
    layer.mlp.gate.forward = lambda x: x
    assert RoutedFFN.of(layer, hidden) == (None, "the router's forward was replaced")
    dense = torch.nn.Module()
    dense.mlp, dense.post_attention_layernorm = torch.nn.Linear(2, 2), layer.post_attention_layernorm
    assert RoutedFFN.of(dense, hidden)[0] is None


def test_a_shared_expert_with_width_is_left_to_the_block():
    layer = Qwen2MoeDecoderLayer(Qwen2MoeConfig(hidden_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                                shared_expert_intermediate_size=32, **ATTENTION), 0).to(torch.bfloat16)
    register()
    layer.mlp.experts.config._experts_implementation = "sparsify"
    assert RoutedFFN.of(layer, torch.zeros(1, 1, 64, dtype=torch.bfloat16)) == (None, "the block has a shared expert")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_fused_sublayer_matches_the_layers_own_modules_on_gpu(name, tokens):
    from sparsify.engine import moe_kernels

    layer = _layer(name, "cuda")
    routed, why = RoutedFFN.of(layer, torch.empty(0, device="cuda", dtype=torch.bfloat16))
    assert routed is not None, why
    hidden = torch.randn(tokens, 1, layer.mlp.gate.weight.shape[1], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        normed_want = layer.post_attention_layernorm(hidden).view(tokens, -1)
        _, weights_want, experts_want = layer.mlp.gate(normed_want)
        norm = layer.post_attention_layernorm
        normed, experts, weights = moe_kernels.norm_route(hidden.view(tokens, -1), norm.weight, norm.variance_epsilon,
                                                          layer.mlp.gate.weight, routed.top_k, routed.renormalize)
        torch.testing.assert_close(normed, normed_want, rtol=0.01, atol=0.01)
        # The same experts in the same order (random logits leave no near-ties at this size), weights
        # as the model rounds them before the experts use them.
        assert experts.long().tolist() == experts_want.tolist()
        torch.testing.assert_close(weights.float(), weights_want.to(torch.bfloat16).float(), rtol=0.01, atol=1e-3)
        layer.mlp.experts.config._experts_implementation = "eager"  # the reference: transformers' loop over experts
        want = hidden + layer.mlp(normed_want.view_as(hidden))
        got = hidden.clone()
        routed.add_to(got)
    delta_want, delta_got = (want - hidden).float(), (got - hidden).float()
    torch.testing.assert_close(delta_got, delta_want, rtol=0, atol=0.02 * delta_want.abs().max().item())
