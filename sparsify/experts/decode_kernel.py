"""Few-token experts on the GPU (decode): a fused-MoE kernel pair in Triton.

At decode a step holds B tokens, S = B*k (token, slot) pairs, and the layer's cost is reading the
weights of the experts the pairs touch, plus one launch per kernel (a CUDA graph replays them,
but each still costs microseconds). Sorting pairs, computing offsets and running grouped GEMMs
sized for thousands of rows spends more time around the weights than on them. Here:

    kernel 1, program (expert e, block of I):  h_p = w_p * silu(x_p G_e^T) * (x_p U_e^T)
    kernel 2, program (expert e, block of H):  o_p = h_p D_e^T
    y_t = sum_slots o_(t, slot)                (one reduction, in torch)

for every pair p routed to e. Each program reads its block of e's weights once and multiplies it
by all S pair rows at once (rows of other experts are masked off: S <= 128, so the wasted
arithmetic is free next to the weight read); a program whose expert no pair chose returns
before loading anything, so an untouched expert costs no bandwidth. No sort, no offsets, no host
synchronisation: the whole step can be captured in a CUDA graph. Pairs are addressed in their
original (token, slot) order, so no permutation is undone afterwards.

The routing weight is applied to the intermediate, as in `sparsify.experts.grouped`.
"""

from __future__ import annotations

from functools import cache

import torch

from sparsify.experts.swiglu_kernel import triton_available

MAX_PAIRS = 128  # above this (prefill, training) the sorted grouped path runs instead


def available(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16) and triton_available()


@cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gate_up_swiglu(x_ptr, w_ptr, pair_expert_ptr, pair_weight_ptr, out_ptr, pairs, top_k: tl.constexpr, hidden: tl.constexpr,
                       width: tl.constexpr, PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        expert = tl.program_id(0)
        block = tl.program_id(1)
        p = tl.arange(0, PAIRS)
        mine = tl.load(pair_expert_ptr + p, mask=p < pairs, other=-1) == expert  # the pairs that chose this expert
        if tl.sum(mine.to(tl.int32)) == 0:
            return
        token = p // top_k
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < width
        gate_rows = w_ptr + expert * 2 * width * hidden + n[:, None] * hidden  # (BLOCK_N, .) rows of G_e
        up_rows = gate_rows + width * hidden  # U_e follows G_e in [gate; up]
        gate = tl.zeros((PAIRS, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((PAIRS, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < hidden
            x = tl.load(x_ptr + token[:, None] * hidden + k[None, :], mask=mine[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(gate_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            u = tl.load(up_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            gate = tl.dot(x, tl.trans(g), gate)
            up = tl.dot(x, tl.trans(u), up)
        weight = tl.load(pair_weight_ptr + p, mask=mine, other=0.0).to(tl.float32)
        h = gate * tl.sigmoid(gate) * up * weight[:, None]
        tl.store(out_ptr + p[:, None] * width + n[None, :], h.to(out_ptr.dtype.element_ty), mask=mine[:, None] & n_ok[None, :])

    @triton.jit
    def down(h_ptr, w_ptr, pair_expert_ptr, out_ptr, pairs, hidden: tl.constexpr, width: tl.constexpr,
             PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        expert = tl.program_id(0)
        block = tl.program_id(1)
        p = tl.arange(0, PAIRS)
        mine = tl.load(pair_expert_ptr + p, mask=p < pairs, other=-1) == expert  # the pairs that chose this expert
        if tl.sum(mine.to(tl.int32)) == 0:
            return
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        rows = w_ptr + expert * hidden * width + n[:, None] * width  # D_e is (H, I)
        acc = tl.zeros((PAIRS, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, width, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < width
            h = tl.load(h_ptr + p[:, None] * width + k[None, :], mask=mine[:, None] & k_ok[None, :], other=0.0)
            d = tl.load(rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(h, tl.trans(d), acc)
        tl.store(out_ptr + p[:, None] * hidden + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mine[:, None] & n_ok[None, :])

    return gate_up_swiglu, down


BLOCK_N, BLOCK_K = 32, 128


def gate_up_intermediate(gate_up_proj: torch.Tensor, x: torch.Tensor, experts_of_pairs: torch.Tensor,
                         pair_weights: torch.Tensor) -> torch.Tensor:
    """Kernel 1 alone: x (T, H); experts_of_pairs (T*k,) int32 and pair_weights (T*k,) in (token,
    slot) order -> the weighted SwiGLU intermediate (T*k, I), same order."""
    import triton

    gate_up_swiglu, _ = _kernels()
    tokens, hidden = x.shape
    pairs = experts_of_pairs.numel()
    count, double_width, _ = gate_up_proj.shape
    width = double_width // 2
    intermediate = torch.empty(pairs, width, dtype=x.dtype, device=x.device)
    gate_up_swiglu[(count, triton.cdiv(width, BLOCK_N))](x, gate_up_proj, experts_of_pairs, pair_weights, intermediate, pairs,
                                                         pairs // tokens, hidden, width, PAIRS=max(16, triton.next_power_of_2(pairs)),
                                                         BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return intermediate


def few_token_experts(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """x (T, H), top_k_index / weights (T, k), T*k <= MAX_PAIRS; gate_up_proj (E, 2I, H), down_proj
    (E, H, I), contiguous. Returns (T, H). No autograd: inference only."""
    import triton

    _, down = _kernels()
    tokens, hidden = x.shape
    top_k = top_k_index.shape[1]
    count = gate_up_proj.shape[0]
    pairs = tokens * top_k
    experts_of_pairs = top_k_index.reshape(-1).to(torch.int32)
    intermediate = gate_up_intermediate(gate_up_proj, x.contiguous(), experts_of_pairs, weights.reshape(-1))
    width = intermediate.shape[1]
    out = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    down[(count, triton.cdiv(hidden, BLOCK_N))](intermediate, down_proj, experts_of_pairs, out, pairs, hidden, width,
                                                PAIRS=max(16, triton.next_power_of_2(pairs)), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out.view(tokens, top_k, hidden).sum(1)
