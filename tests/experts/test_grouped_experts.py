"""sparsify's experts implementation (sparsify/experts/grouped.py) against transformers' eager one:
outputs and every gradient, on the all-experts path (k = E, both of its branches) and the sorted
grouped path (k < E); frozen expert weights; the grouped GEMM helper; and which implementation
runs where (sparsify/experts/registry.py). Tiny models built here, fp32 unless said otherwise."""

from __future__ import annotations

import copy

import pytest
import torch

import sparsify.experts
from sparsify.experts import registry
from sparsify.experts.grouped import grouped_mm, sparsify_experts_forward, supports

HIDDEN = 32
WIDTH = 48  # expert intermediate size: the all-experts path uses bmm below this many tokens, one GEMM from it on
TINY = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


@pytest.fixture(autouse=True, scope="module")
def registered():
    sparsify.experts.register()


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(registry.OVERRIDE_VARIABLE, raising=False)


def widen(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Weights larger than transformers' init, so routing is peaked and a wrong expert shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def moe_block(experts: int, top_k: int, dtype: torch.dtype = torch.float32):
    """(eager block, a deepcopy of it running sparsify's implementation)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_local_experts=experts, num_experts_per_tok=top_k)
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config)
    widen(block)
    block = block.to(dtype)
    fast = copy.deepcopy(block)
    fast.experts.config._experts_implementation = registry.IMPLEMENTATION
    assert fast.experts.config is not block.experts.config and block.experts.config._experts_implementation == "eager"
    assert supports(fast.experts), "the Mixtral layout must run sparsify's own path, not its fallback"
    return block, fast


def run(block, tokens: torch.Tensor, probe: torch.Tensor):
    """Forward and backward of <block(x), probe> from a fresh leaf; returns (output, input gradient)."""
    x = tokens.clone().requires_grad_(True)
    out = block(x)
    (out.float() * probe).sum().backward()
    return out.detach(), x.grad


def inputs(tokens: int, dtype: torch.dtype = torch.float32, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, HIDDEN, generator=generator).to(dtype)
    probe = torch.randn(1, tokens, HIDDEN, generator=generator)
    return x, probe


def close(got: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert got is not None and expected is not None, f"{what}: missing gradient"
    assert expected.abs().max() > 1e-3, f"{what}: the reference is ~0, so the comparison would prove nothing"
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same_output_and_routing_gradients(eager, fast, tokens: int) -> None:
    """Both blocks on the same input: equal outputs, input gradients and router gradients."""
    x, probe = inputs(tokens)
    expected, expected_dx = run(eager, x, probe)
    got, got_dx = run(fast, x, probe)
    close(got, expected, "output")
    close(got_dx, expected_dx, "input gradient")
    close(fast.gate.weight.grad, eager.gate.weight.grad, "router gradient")


# (experts, top_k, tokens): k = E below and above the expert width (bmm and one-GEMM branches), and k < E,
# including few tokens over many experts, so some experts get no rows at all.
CASES = {
    "all-experts-bmm": (4, 4, 5),
    "all-experts-gemm": (4, 4, 64),
    "all-of-two-gemm": (2, 2, WIDTH),
    "sorted-4-top2": (4, 2, 24),
    "sorted-8-top2-empty-experts": (8, 2, 3),
    "sorted-8-top3": (8, 3, 40),
}


@pytest.mark.parametrize("experts, top_k, tokens", CASES.values(), ids=CASES.keys())
def test_sorted_path_matches_eager_outputs_and_gradients(experts, top_k, tokens):
    eager, fast = moe_block(experts, top_k)
    assert_same_output_and_routing_gradients(eager, fast, tokens)
    close(fast.experts.gate_up_proj.grad, eager.experts.gate_up_proj.grad, "gate_up_proj gradient")
    close(fast.experts.down_proj.grad, eager.experts.down_proj.grad, "down_proj gradient")
    if tokens * top_k < experts:  # the case meant to leave experts empty does: their weight gradient is exactly 0
        unused = eager.experts.down_proj.grad.flatten(1).abs().sum(1) == 0
        assert unused.any() and (fast.experts.down_proj.grad[unused] == 0).all()


@pytest.mark.parametrize("experts, top_k, tokens", [(4, 4, 6), (4, 4, 64), (8, 2, 40)], ids=["all-bmm", "all-gemm", "sorted"])
def test_bf16_forward_matches_eager_within_bf16_tolerance(experts, top_k, tokens):
    eager, fast = moe_block(experts, top_k, dtype=torch.bfloat16)
    x, _ = inputs(tokens, dtype=torch.bfloat16)
    with torch.no_grad():
        expected, got = eager(x), fast(x)
    assert got.dtype == torch.bfloat16
    scale = expected.float().abs().max()
    assert scale > 1e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * scale.item())


@pytest.mark.parametrize("experts, top_k, tokens", [(4, 4, 5), (4, 4, 64), (8, 2, 24)], ids=["all-bmm", "all-gemm", "sorted"])
def test_frozen_expert_weights_still_give_input_and_router_gradients_and_no_weight_gradient(experts, top_k, tokens):
    eager, fast = moe_block(experts, top_k)
    for block in (eager, fast):
        block.experts.requires_grad_(False)
    assert_same_output_and_routing_gradients(eager, fast, tokens)
    assert fast.experts.gate_up_proj.grad is None and fast.experts.down_proj.grad is None


def test_a_frozen_router_and_frozen_experts_still_give_the_input_gradient():
    eager, fast = moe_block(8, 2)
    for block in (eager, fast):
        block.requires_grad_(False)
    x, probe = inputs(16)
    _, expected_dx = run(eager, x, probe)
    _, got_dx = run(fast, x, probe)
    close(got_dx, expected_dx, "input gradient")
    assert all(param.grad is None for param in fast.parameters())


def test_the_forward_function_takes_transformers_experts_signature_and_keeps_the_input_dtype():
    _, fast = moe_block(4, 2)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, HIDDEN, generator=generator, dtype=torch.float64)
    index = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(7)])
    weights = torch.rand(7, 2, generator=generator)
    out = sparsify_experts_forward(fast.experts, hidden, index, weights)
    assert out.shape == (7, HIDDEN) and out.dtype == torch.float64
    # The same sum, written out per (token, slot).
    experts = fast.experts
    expected = torch.zeros(7, HIDDEN)
    for t in range(7):
        for j in range(2):
            e = index[t, j]
            gate, up = (experts.gate_up_proj[e] @ hidden[t].float()).chunk(2)
            expected[t] += weights[t, j] * (experts.down_proj[e] @ (experts.act_fn(gate) * up))
    torch.testing.assert_close(out.float(), expected.detach(), rtol=1e-4, atol=1e-5)


def tiny_causal(kind: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_local_experts=4,
                                                 num_experts_per_tok=2, **TINY))
    elif kind == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=WIDTH, num_experts=4,
                                                   num_experts_per_tok=2, head_dim=8, norm_topk_prob=True, **TINY))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, **TINY))
    widen(model, std=0.08, seed=seed)
    return model


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_whole_models_switched_with_set_experts_implementation_match_eager_logits_and_gradients(kind):
    eager = tiny_causal(kind)
    eager.set_experts_implementation("eager")
    fast = copy.deepcopy(eager)
    fast.set_experts_implementation(registry.IMPLEMENTATION)
    assert registry.execution_path(fast) == "sparsify" and registry.execution_path(eager) == "eager"
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    expected, got = eager(input_ids=ids).logits, fast(input_ids=ids).logits
    close(got, expected, "logits")
    expected.logsumexp(-1).mean().backward()
    got.logsumexp(-1).mean().backward()
    eager_params = dict(eager.named_parameters())
    for name, param in fast.named_parameters():
        if ".mlp." in name:  # routers and experts; the rest is transformers' on both sides
            torch.testing.assert_close(param.grad, eager_params[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert any(".experts." in name and p.grad.abs().max() > 0 for name, p in fast.named_parameters())


def test_grouped_mm_matches_a_loop_over_groups_including_empty_groups():
    generator = torch.Generator().manual_seed(0)
    counts = [0, 3, 0, 5, 1, 0]  # empty first, middle and last groups
    rows = torch.randn(sum(counts), 16, generator=generator)
    weight = torch.randn(len(counts), 24, 16, generator=generator).transpose(1, 2)  # (G, K, N), transposed as the experts use it
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    expected = torch.cat([rows[s:e] @ weight[g] for g, (s, e) in enumerate(zip([0, *ends[:-1].tolist()], ends.tolist()))])
    got = grouped_mm(rows, weight, ends)
    assert got.shape == (sum(counts), 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_grouped_mm_loop_fallback_for_unaligned_rows_matches_too_with_gradients():
    generator = torch.Generator().manual_seed(1)
    counts = [2, 0, 4, 0]
    storage = torch.randn(sum(counts) * 8 + 1, generator=generator)
    rows = storage[1:].view(sum(counts), 8)  # 4 bytes past an aligned start: not 16-byte aligned
    assert rows.data_ptr() % 16 != 0
    rows = rows.detach().requires_grad_(True)
    weight = torch.randn(len(counts), 8, 5, generator=generator, requires_grad=True)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    got = grouped_mm(rows, weight, ends)
    probe = torch.randn(got.shape, generator=generator)
    (got * probe).sum().backward()
    got_rows, got_weight = rows.grad, weight.grad
    rows.grad = weight.grad = None
    groups = [0, 0, 2, 2, 2, 2]
    expected = torch.stack([rows[i] @ weight[g] for i, g in enumerate(groups)])
    (expected * probe).sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_rows, rows.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_weight, weight.grad, rtol=1e-5, atol=1e-5)
    assert (got_weight[[1, 3]] == 0).all()


def test_preferred_implementation_on_cpu_keeps_transformers_choice():
    assert registry.preferred_implementation(torch.device("cpu")) is None


@pytest.mark.parametrize("value, expected", [("keep", None), ("sparsify", "sparsify")])
def test_the_environment_override_is_honoured(monkeypatch, value, expected):
    monkeypatch.setenv(registry.OVERRIDE_VARIABLE, value)
    assert registry.preferred_implementation(torch.device("cpu")) == expected


def test_use_fast_experts_leaves_a_dense_model_alone():
    model = tiny_causal("llama")
    before = model.config._experts_implementation
    assert registry.use_fast_experts(model) is None
    assert registry.execution_path(model) is None
    assert model.config._experts_implementation == before


def test_use_fast_experts_on_cpu_returns_transformers_choice_unchanged():
    model = tiny_causal("mixtral")
    chosen = model.config._experts_implementation
    assert chosen is not None and chosen != registry.IMPLEMENTATION
    assert registry.use_fast_experts(model) == chosen
    assert model.config._experts_implementation == chosen == registry.execution_path(model)
    assert model.model.layers[0].mlp.experts.config._experts_implementation == chosen


def test_use_fast_experts_follows_the_override_and_the_switched_model_still_computes_the_same(monkeypatch):
    model = tiny_causal("mixtral")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    monkeypatch.setenv(registry.OVERRIDE_VARIABLE, "sparsify")
    assert registry.use_fast_experts(model) == "sparsify"
    assert registry.execution_path(model) == "sparsify"
    assert model.model.layers[1].mlp.experts.config._experts_implementation == "sparsify"
    with torch.no_grad():
        after = model(input_ids=ids).logits
    close(after, before, "logits")
