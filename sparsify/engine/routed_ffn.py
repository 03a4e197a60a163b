"""The MoE FFN sublayer of a decode step as three kernels: norm+route (sparsify/engine/moe_kernels.py),
gate_up and down+add (sparsify/experts/decode_kernel.py).

`RoutedFFN.of(layer)` recognises a decoder layer whose FFN is one of transformers' routed blocks
that sparsify writes (Mixtral, Qwen2-MoE without a shared expert, Qwen3-MoE), running under
sparsify's experts implementation, and returns what the decode engine needs to run

    hidden += block(norm(hidden))

as norm+route, gate_up, down+add. Anything else (another block, a shared expert with width, a
router whose forward was replaced, too many experts for one program's registers, no GPU or no
Triton) returns None with the reason, and the engine calls the block itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsify.engine import moe_kernels
from sparsify.experts import decode_kernel
from sparsify.experts.grouped import supports

# Routed blocks the kernels reproduce, and whether their router renormalises the top-k weights.
ROUTERS = {
    "MixtralSparseMoeBlock": lambda gate: True,
    "Qwen2MoeSparseMoeBlock": lambda gate: bool(gate.norm_topk_prob),
    "Qwen3MoeSparseMoeBlock": lambda gate: bool(gate.norm_topk_prob),
}
MAX_ROUTER_ELEMENTS = 1 << 16  # experts x hidden (both padded to powers of two) held by one program


def _width_of_shared_expert(block: nn.Module) -> int:
    shared = getattr(block, "shared_expert", None)
    return 0 if shared is None else shared.gate_proj.weight.shape[0]


@dataclass
class RoutedFFN:
    norm: nn.Module
    router: nn.Module
    experts: nn.Module
    top_k: int
    renormalize: bool

    @classmethod
    def of(cls, layer: nn.Module, hidden: torch.Tensor) -> tuple[RoutedFFN | None, str]:
        """The fused sublayer for `layer` (a decoder layer) with activations like `hidden`, or None and why not."""
        block, norm = layer.mlp, layer.post_attention_layernorm
        rule = ROUTERS.get(type(block).__name__)
        if rule is None:
            return None, f"{type(block).__name__} is not a routed block the kernels reproduce"
        router, experts = block.gate, block.experts
        if getattr(getattr(experts, "config", None), "_experts_implementation", None) != "sparsify":
            return None, "the experts do not run under sparsify's implementation"
        if "forward" in vars(router) or "forward" in vars(block):
            return None, "the router's forward was replaced"
        if _width_of_shared_expert(block):
            return None, "the block has a shared expert"
        if not (supports(experts) and "SiLU" in type(experts.act_fn).__name__ and experts.gate_up_proj.is_contiguous()
                and experts.down_proj.is_contiguous() and experts.gate_up_proj.dtype == hidden.dtype):
            return None, "the experts' layout or activation is not the kernels'"
        if not (type(norm).__name__.endswith("RMSNorm") and norm.weight.dtype == hidden.dtype == router.weight.dtype):
            return None, "the norm or router is not an RMSNorm / linear in the activations' dtype"
        count, width = router.weight.shape
        if _next_power_of_2(count) * _next_power_of_2(width) > MAX_ROUTER_ELEMENTS:
            return None, f"{count} experts x hidden {width} is more router than one kernel program holds"
        if not decode_kernel.available(hidden):
            return None, "no GPU or no Triton"
        return cls(norm, router, experts, router.top_k, rule(router)), ""

    def fits(self, tokens: int) -> bool:
        return tokens * self.top_k <= decode_kernel.MAX_PAIRS

    def add_to(self, hidden: torch.Tensor) -> None:
        """hidden (B, 1, H) += block(norm(hidden)), in place."""
        rows = hidden.view(-1, hidden.shape[-1])
        normed, experts, weights = moe_kernels.norm_route(rows, self.norm.weight, self.norm.variance_epsilon, self.router.weight,
                                                          self.top_k, self.renormalize)
        intermediate = decode_kernel.gate_up_intermediate(self.experts.gate_up_proj, normed, experts.view(-1), weights.view(-1))
        decode_kernel.down_add(intermediate, self.experts.down_proj, experts, rows)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
