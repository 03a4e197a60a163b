"""LoRA on fused expert weights (sparsify/experts/lora.py): peft's adapters, factored into low-rank
GEMMs under sparsify's experts implementation, give the logits and adapter gradients of peft's own
forward under transformers' eager implementation, merge to the same model, fall back to peft when
another implementation runs, and are what `sparsify.train.lora.add_adapters` sets up."""

from __future__ import annotations

import copy

import pytest
import torch

import sparsify.experts
from sparsify.experts import registry
from sparsify.experts.lora import PENDING, _factored_forward, factor_expert_adapters

HIDDEN = 32
WIDTH = 48
TINY = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture(autouse=True, scope="module")
def registered():
    sparsify.experts.register()


def tiny_moe(kind: str = "mixtral", experts: int = 4, top_k: int = 2, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_local_experts=experts,
                                                 num_experts_per_tok=top_k, **TINY))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=WIDTH,
                                                   num_experts=experts, num_experts_per_tok=top_k, head_dim=8, **TINY))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger than transformers' init: peaked routing, adapters that visibly move the logits
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.08)
    model.set_experts_implementation("eager")
    return model


def with_adapters(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERT_PARAMETERS)
    return get_peft_model(model, config)


def adapter_pair(kind: str = "mixtral", experts: int = 4, top_k: int = 2):
    """Two peft models of one base with identical, non-zero adapters: (reference, twin)."""
    base = tiny_moe(kind, experts, top_k)
    reference, twin = with_adapters(copy.deepcopy(base)), with_adapters(copy.deepcopy(base))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        own = dict(reference.named_parameters())
        copied = 0
        for name, param in twin.named_parameters():
            if "lora_" in name:
                param.copy_(own[name])
                copied += 1
    assert copied == 3 * 2 * TINY["num_hidden_layers"]  # A and B of q_proj, gate_up_proj and down_proj in each layer
    return reference, twin


def expert_wrappers(model) -> list:
    from peft.tuners.lora.layer import ParamWrapper

    return [m for m in model.modules() if isinstance(m, ParamWrapper) and m.parameter_name in ("gate_up_proj", "down_proj")]


class SeenAdapters:
    """What the experts modules found left for them (PENDING) when they ran: the factored path's trace."""

    def __init__(self, model):
        self.seen: list[set[str]] = []
        experts = {id(w.get_base_layer()): w.get_base_layer() for w in expert_wrappers(model)}.values()
        assert experts
        self.handles = [m.register_forward_pre_hook(self.record) for m in experts]

    def record(self, module, args):
        self.seen.append(set(module.__dict__.get(PENDING) or ()))

    def close(self):
        for handle in self.handles:
            handle.remove()


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: param.grad for name, param in model.named_parameters() if "lora_" in name}


def token_ids(tokens: int, rows: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (rows, tokens), generator=torch.Generator().manual_seed(seed))


CASES = {
    "mixtral-sorted": ("mixtral", 4, 2, 9),
    "mixtral-all-experts-bmm": ("mixtral", 4, 4, 7),  # 14 tokens < width 48
    "mixtral-all-experts-gemm": ("mixtral", 4, 4, 32),  # 64 tokens
    "qwen3-moe-sorted": ("qwen3_moe", 8, 2, 9),
}


@pytest.mark.parametrize("kind, experts, top_k, tokens", CASES.values(), ids=CASES.keys())
def test_factored_expert_lora_matches_peft_eager_logits_gradients_and_merged_models(kind, experts, top_k, tokens):
    reference, twin = adapter_pair(kind, experts, top_k)
    assert factor_expert_adapters(twin) == 2 * TINY["num_hidden_layers"] > 0
    twin.get_base_model().set_experts_implementation(registry.IMPLEMENTATION)
    assert registry.execution_path(twin.get_base_model()) == "sparsify"
    assert registry.execution_path(reference.get_base_model()) == "eager"
    ids = token_ids(tokens)

    with torch.no_grad(), reference.disable_adapter():
        plain = reference(input_ids=ids).logits
    trace = SeenAdapters(twin)
    expected, got = reference(input_ids=ids).logits, twin(input_ids=ids).logits
    trace.close()
    assert trace.seen and all(seen == {"gate_up_proj", "down_proj"} for seen in trace.seen), trace.seen
    assert (expected - plain).abs().max() > 1e-2, "the adapters must change the logits, or nothing is being compared"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    expected.logsumexp(-1).mean().backward()
    got.logsumexp(-1).mean().backward()
    expected_grads, got_grads = lora_grads(reference), lora_grads(twin)
    assert expected_grads.keys() == got_grads.keys() and len(got_grads) == 3 * 2 * TINY["num_hidden_layers"]
    for name, grad in expected_grads.items():
        assert grad is not None and got_grads[name] is not None, name
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # peft's layout is untouched: the factored twin keeps the very parameters the reference has
    assert all(p.grad is None for n, p in twin.named_parameters() if "lora_" not in n)

    merged_reference, merged_twin = reference.merge_and_unload(), twin.merge_and_unload()
    assert not expert_wrappers(merged_twin) and merged_twin.config._experts_implementation == "sparsify"
    with torch.no_grad():
        torch.testing.assert_close(merged_reference(input_ids=ids).logits, expected.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged_twin(input_ids=ids).logits, got.detach(), rtol=1e-4, atol=1e-5)
    for module in merged_twin.modules():
        assert not module.__dict__.get(PENDING)


def test_a_factored_wrapper_under_eager_falls_back_to_peft_forward():
    reference, twin = adapter_pair()
    assert factor_expert_adapters(twin) > 0
    assert all(w.forward.__func__ is _factored_forward for w in expert_wrappers(twin))
    assert twin.get_base_model().config._experts_implementation == "eager"
    ids = token_ids(9)
    trace = SeenAdapters(twin)
    expected, got = reference(input_ids=ids).logits, twin(input_ids=ids).logits
    trace.close()
    assert trace.seen and all(seen == set() for seen in trace.seen), "eager must not be handed factored adapters"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    expected.sum().backward()
    got.sum().backward()
    for name, grad in lora_grads(reference).items():
        torch.testing.assert_close(lora_grads(twin)[name], grad, rtol=0, atol=0)


def test_a_factored_wrapper_with_adapters_disabled_runs_the_base_model_under_sparsify():
    reference, twin = adapter_pair(experts=4, top_k=2)
    factor_expert_adapters(twin)
    twin.get_base_model().set_experts_implementation(registry.IMPLEMENTATION)
    ids = token_ids(9)
    with torch.no_grad():
        with reference.disable_adapter():
            expected = reference(input_ids=ids).logits
        trace = SeenAdapters(twin)
        with twin.disable_adapter():
            got = twin(input_ids=ids).logits
        trace.close()
    assert all(seen == set() for seen in trace.seen)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_add_adapters_leaves_the_expert_wrappers_factored():
    from sparsify.convert.moe.decisions import find_decisions
    from sparsify.train.lora import LoraSettings, add_adapters

    model = tiny_moe()
    decisions = find_decisions(model, {})
    assert decisions is not None and len(decisions.modules) == TINY["num_hidden_layers"]
    peft_model = add_adapters(model, LoraSettings(4, 8.0), decisions)
    wrappers = expert_wrappers(peft_model)
    assert len(wrappers) == 2 * TINY["num_hidden_layers"]
    assert all(w.forward.__func__ is _factored_forward for w in wrappers)
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n or ".gate." in n)
    expert_weights = [p for n, p in peft_model.named_parameters() if "experts.base_layer.base_layer" in n]
    assert len(expert_weights) == 2 * TINY["num_hidden_layers"] and not any(p.requires_grad for p in expert_weights)

    # ...and they run factored once sparsify's implementation is chosen, computing what peft's own forward does
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    ids = token_ids(9)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        peft_model.get_base_model().set_experts_implementation(registry.IMPLEMENTATION)
        trace = SeenAdapters(peft_model)
        got = peft_model(input_ids=ids).logits
        trace.close()
    assert trace.seen and all(seen == {"gate_up_proj", "down_proj"} for seen in trace.seen)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
