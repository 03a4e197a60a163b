"""sparsify's Triton kernels against the PyTorch reference on a GPU, in bf16: the fused routed
SwiGLU (forward, and the gradients of gate_up and of the routing weight), the few-token decode
kernel pair, and the whole experts implementation (outputs, input and router gradients) against
transformers' eager loop. Skipped without a GPU; run on the GPU machine."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _close(got: torch.Tensor, want: torch.Tensor, share: float = 0.02) -> None:
    """Within `share` of the reference's largest magnitude (bf16 rounding on sums of products)."""
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=share * want.float().abs().max().item() + 1e-6)


@pytest.mark.parametrize("rows,width", [(7, 96), (300, 1024), (5, 3000)])
def test_fused_weighted_swiglu_matches_torch_forward_and_backward(rows, width):
    from sparsify.experts.swiglu_kernel import _WeightedSwiGLU

    torch.manual_seed(0)
    gate_up = torch.randn(rows, 2 * width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.rand(rows, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = _WeightedSwiGLU.apply(gate_up, weight)
    grad = torch.randn_like(out)
    out.backward(grad)
    reference_gate_up = gate_up.detach().float().requires_grad_()
    reference_weight = weight.detach().float().requires_grad_()
    gate, up = reference_gate_up.chunk(2, dim=-1)
    reference = torch.nn.functional.silu(gate) * up * reference_weight[:, None]
    reference.backward(grad.float())
    _close(out, reference)
    _close(gate_up.grad, reference_gate_up.grad)
    _close(weight.grad, reference_weight.grad)


@pytest.mark.parametrize("experts,top_k,tokens", [(8, 4, 1), (8, 8, 1), (8, 2, 16), (64, 8, 4)])
def test_few_token_kernel_matches_the_expert_loop(experts, top_k, tokens):
    from sparsify.experts.decode_kernel import few_token_experts

    torch.manual_seed(0)
    hidden, width = 256, 96
    gate_up = torch.randn(experts, 2 * width, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
    down = torch.randn(experts, hidden, width, device="cuda", dtype=torch.bfloat16) * 0.05
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    index = torch.stack([torch.randperm(experts, device="cuda")[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, device="cuda", dtype=torch.bfloat16)
    got = few_token_experts(gate_up, down, x, index, weights)
    want = torch.zeros(tokens, hidden, device="cuda")
    for t in range(tokens):
        for j in range(top_k):
            e = index[t, j]
            gate, up = (x[t].float() @ gate_up[e].float().t()).chunk(2)
            want[t] += weights[t, j].float() * (down[e].float() @ (torch.nn.functional.silu(gate) * up))
    _close(got, want)


@pytest.mark.parametrize("experts,top_k", [(8, 8), (8, 4), (8, 2)])
def test_sparsify_experts_match_eager_outputs_and_gradients_in_bf16(experts, top_k):
    """Both sides in bf16 with the same router, so a near-tie cannot route a token differently
    and the comparison isolates the experts computation."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from sparsify.experts import register

    register()
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=256, intermediate_size=128, num_local_experts=experts, num_experts_per_tok=top_k)
    config._experts_implementation = "eager"
    reference = MixtralSparseMoeBlock(config).cuda().bfloat16()
    for parameter in reference.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    fast = copy.deepcopy(reference)
    fast.experts.config = copy.deepcopy(config)
    fast.experts.config._experts_implementation = "sparsify"
    for tokens in (3, 700):  # decode-sized (no grad: the Triton pair) and training-sized
        x = torch.randn(1, tokens, 256, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            _close(fast(x), reference(x))
        x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref, out_fast = reference(x_ref), fast(x_fast)
        grad = torch.randn_like(out_ref)
        out_ref.backward(grad)
        out_fast.backward(grad)
        _close(out_fast, out_ref)
        _close(x_fast.grad, x_ref.grad)
        _close(fast.gate.weight.grad, reference.gate.weight.grad, share=0.05)
        _close(fast.experts.down_proj.grad, reference.experts.down_proj.grad, share=0.05)
        reference.zero_grad(set_to_none=True)
        fast.zero_grad(set_to_none=True)
