"""The router kernel of the routed FFN sublayer of a decode step (sparsify/engine/routed_ffn.py).

A decode step of transformers' MoE block is about a dozen small kernels around the two that read
expert weights: the norm, the router's linear, a float cast, softmax, top-k (a sort and a
gather), the renormalisation and its cast, then after the experts the sum over slots and the
residual add. At batch 1 each costs 2-5 us of latency, more than the expert GEMMs save over a
dense FFN (measured with bench/profile_decode_step.py). Here the sublayer is three kernels:

    norm_route   per token: RMSNorm, router logits, softmax, top-k, renormalisation
    gate_up      h_p = w_p * silu(x G_e^T) * (x U_e^T) per pair      } sparsify/experts/decode_kernel.py
    down_add     hidden += sum over the token's experts of h_p D_e^T  }

Rounding follows the model's own modules step by step (the norm's two roundings, logits in the
activations' dtype, routing weights rounded to it, the sublayer output rounded before the
residual add) so the decisions are the ones its forward would make.
"""

from __future__ import annotations

from functools import cache

import torch


NUM_WARPS = 8  # bench/tune_moe_decode.py


@cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def norm_route(hidden_ptr, norm_ptr, eps, router_ptr, normed_ptr, experts_ptr, weights_ptr, HIDDEN: tl.constexpr,
                   BLOCK_H: tl.constexpr, EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr, TOP_K: tl.constexpr,
                   RENORMALIZE: tl.constexpr):
        token = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)
        h_ok = h < HIDDEN
        dtype = normed_ptr.dtype.element_ty
        x = tl.load(hidden_ptr + token * HIDDEN + h, mask=h_ok, other=0.0).to(tl.float32)
        scale = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / HIDDEN + eps)
        normed = (tl.load(norm_ptr + h, mask=h_ok, other=0.0).to(tl.float32) * (x * scale).to(dtype).to(tl.float32)).to(dtype)
        tl.store(normed_ptr + token * HIDDEN + h, normed, mask=h_ok)
        e = tl.arange(0, BLOCK_E)
        e_ok = e < EXPERTS
        router = tl.load(router_ptr + e[:, None] * HIDDEN + h[None, :], mask=e_ok[:, None] & h_ok[None, :], other=0.0)
        logits = tl.sum(router.to(tl.float32) * normed.to(tl.float32)[None, :], axis=1).to(dtype).to(tl.float32)
        logits = tl.where(e_ok, logits, float("-inf"))
        probs = tl.exp(logits - tl.max(logits, axis=0))
        probs = tl.where(e_ok, probs / tl.sum(probs, axis=0), -1.0)  # padding ranks after every expert
        # Top-k by rank: an expert's slot is the number of experts ahead of it (a higher probability,
        # or an equal one at a lower index; torch.topk may order tied experts differently, which
        # changes only the fp32 summation order). Two reductions over an (E, E) comparison instead
        # of 2k arg-max passes, each a cross-warp round trip (~150 ns). NaN ranks as padding, so
        # every slot still gets a distinct, in-range expert (its weight stays NaN, as the model's).
        ranked = tl.where(probs == probs, probs, -1.0)
        ahead = (ranked[None, :] > ranked[:, None]) | ((ranked[None, :] == ranked[:, None]) & (e[None, :] < e[:, None]))
        rank = tl.sum(ahead.to(tl.int32), axis=1)
        chosen = e_ok & (rank < TOP_K)
        value = probs
        if RENORMALIZE:
            value = probs / tl.sum(tl.where(chosen, probs, 0.0), axis=0)
        tl.store(experts_ptr + token * TOP_K + rank, e.to(tl.int32), mask=chosen)
        tl.store(weights_ptr + token * TOP_K + rank, value.to(dtype), mask=chosen)

    return norm_route


def norm_route(hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, router_weight: torch.Tensor, top_k: int,
               renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (T, H) -> normed (T, H), experts (T, k) int32, routing weights (T, k) in hidden's dtype."""
    import triton

    kernel = _kernels()
    tokens, width = hidden.shape
    count = router_weight.shape[0]
    normed = torch.empty_like(hidden)
    experts = torch.empty(tokens, top_k, dtype=torch.int32, device=hidden.device)
    weights = torch.empty(tokens, top_k, dtype=hidden.dtype, device=hidden.device)
    kernel[(tokens,)](hidden, norm_weight, eps, router_weight, normed, experts, weights, HIDDEN=width,
                      BLOCK_H=triton.next_power_of_2(width), EXPERTS=count, BLOCK_E=max(2, triton.next_power_of_2(count)),
                      TOP_K=top_k, RENORMALIZE=renormalize, num_warps=NUM_WARPS)
    return normed, experts, weights
