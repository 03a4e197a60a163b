"""Triton kernels for the routed FFN sublayer of a decode step (sparsify/engine/routed_ffn.py).

A decode step of transformers' MoE block is about a dozen small kernels around the two that read
expert weights: the norm, the router's linear, a float cast, softmax, top-k (a sort and a
gather), the renormalisation and its cast, then after the experts the sum over slots and the
residual add. At batch 1 each costs 2-5 us of latency, more than the expert GEMMs save over a
dense FFN (measured with bench/profile_decode_step.py). Here the sublayer is three kernels:

    norm_route   per token: RMSNorm, router logits, softmax, top-k, renormalisation
    gate_up      (sparsify/experts/decode_kernel.py) h_p = w_p * silu(x G_e^T) * (x U_e^T) per pair
    down_add     per block of the hidden size: hidden += sum over the token's experts of h D_e^T

Rounding follows the model's own modules step by step (the norm's two roundings, logits in the
activations' dtype, routing weights rounded to it, the sublayer output rounded before the
residual add) so the decisions are the ones its forward would make.
"""

from __future__ import annotations

from functools import cache

import torch

from sparsify.experts.swiglu_kernel import triton_available


def available(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16) and triton_available()


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
        probs = probs / tl.sum(probs, axis=0)
        # Top-k by repeated argmax (k is small); the first pass finds the normaliser, the second writes.
        remaining = tl.where(e_ok, probs, -1.0)
        total = 0.0
        for _ in tl.static_range(TOP_K):
            best = tl.argmax(remaining, axis=0)
            total += tl.max(remaining, axis=0)
            remaining = tl.where(e == best, -1.0, remaining)
        remaining = tl.where(e_ok, probs, -1.0)
        for slot in tl.static_range(TOP_K):
            best = tl.argmax(remaining, axis=0)
            value = tl.max(remaining, axis=0)
            if RENORMALIZE:
                value = value / total
            tl.store(experts_ptr + token * TOP_K + slot, best.to(tl.int32))
            tl.store(weights_ptr + token * TOP_K + slot, value.to(dtype))
            remaining = tl.where(e == best, -1.0, remaining)

    @triton.jit
    def down_add(h_ptr, w_ptr, experts_ptr, hidden_ptr, tokens, HIDDEN: tl.constexpr, WIDTH: tl.constexpr,
                 EXPERTS: tl.constexpr, TOP_K: tl.constexpr, TOKENS: tl.constexpr, BLOCK_SLOTS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr):
        block = tl.program_id(0)
        t = tl.arange(0, TOKENS)
        t_ok = t < tokens
        s = tl.arange(0, BLOCK_SLOTS)
        chosen = tl.load(experts_ptr + t[:, None] * TOP_K + s[None, :], mask=t_ok[:, None] & (s < TOP_K)[None, :], other=-1)
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < HIDDEN
        acc = tl.zeros((TOKENS, BLOCK_N), dtype=tl.float32)
        for expert in range(EXPERTS):
            match = (chosen == expert).to(tl.int32)  # (tokens, slots): a token picks an expert at most once
            picked = tl.max(match, axis=1) > 0
            if tl.sum(picked.to(tl.int32), axis=0) > 0:  # an expert no token chose is never read
                pair = t * TOP_K + tl.argmax(match, axis=1)
                rows = w_ptr + expert * HIDDEN * WIDTH + n[:, None] * WIDTH  # D_e is (H, I)
                for k0 in range(0, WIDTH, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = k < WIDTH
                    h = tl.load(h_ptr + pair[:, None] * WIDTH + k[None, :], mask=picked[:, None] & k_ok[None, :], other=0.0)
                    d = tl.load(rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                    if USE_DOT:  # enough tokens for the tensor cores' 16-row minimum
                        acc = tl.dot(h, tl.trans(d), acc)
                    else:  # a few tokens: multiply-and-sum, so a program can own fewer than 16 outputs
                        acc += tl.sum(h.to(tl.float32)[:, None, :] * d.to(tl.float32)[None, :, :], axis=2)
        dtype = hidden_ptr.dtype.element_ty
        where = hidden_ptr + t[:, None] * HIDDEN + n[None, :]
        ok = t_ok[:, None] & n_ok[None, :]
        residual = tl.load(where, mask=ok, other=0.0).to(tl.float32)
        tl.store(where, (residual + acc.to(dtype).to(tl.float32)).to(dtype), mask=ok)

    return norm_route, down_add


DOWN_BLOCK_N, DOWN_BLOCK_K = 16, 256  # 16 tokens or more (tl.dot)
FEW_TOKENS, FEW_BLOCK_N, FEW_BLOCK_K = 2, 8, 512  # up to FEW_TOKENS tokens: more, narrower programs (bench/tune_moe_decode.py)


def norm_route(hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, router_weight: torch.Tensor, top_k: int,
               renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (T, H) -> normed (T, H), experts (T, k) int32, routing weights (T, k) in hidden's dtype."""
    import triton

    kernel, _ = _kernels()
    tokens, width = hidden.shape
    count = router_weight.shape[0]
    normed = torch.empty_like(hidden)
    experts = torch.empty(tokens, top_k, dtype=torch.int32, device=hidden.device)
    weights = torch.empty(tokens, top_k, dtype=hidden.dtype, device=hidden.device)
    kernel[(tokens,)](hidden, norm_weight, eps, router_weight, normed, experts, weights, HIDDEN=width,
                      BLOCK_H=triton.next_power_of_2(width), EXPERTS=count, BLOCK_E=max(2, triton.next_power_of_2(count)),
                      TOP_K=top_k, RENORMALIZE=renormalize, num_warps=8 if width > 1024 else 4)
    return normed, experts, weights


def down_add(intermediate: torch.Tensor, down_proj: torch.Tensor, experts: torch.Tensor, hidden: torch.Tensor) -> None:
    """hidden (T, H) += sum over each token's k experts of intermediate[pair] @ down_proj[e]^T, in
    place; intermediate (T*k, I) in (token, slot) order, experts (T, k) int32."""
    import triton

    _, kernel = _kernels()
    tokens, width = hidden.shape
    top_k = experts.shape[1]
    count, _, inner = down_proj.shape
    few = tokens <= FEW_TOKENS
    block_n, block_k = (FEW_BLOCK_N, FEW_BLOCK_K) if few else (DOWN_BLOCK_N, DOWN_BLOCK_K)
    padded = triton.next_power_of_2(tokens) if few else max(16, triton.next_power_of_2(tokens))
    kernel[(triton.cdiv(width, block_n),)](intermediate, down_proj, experts, hidden, tokens, HIDDEN=width, WIDTH=inner, EXPERTS=count,
                                           TOP_K=top_k, TOKENS=padded, BLOCK_SLOTS=max(2, triton.next_power_of_2(top_k)), BLOCK_N=block_n,
                                           BLOCK_K=block_k, USE_DOT=not few)
