"""Few-token experts on the GPU (decode): a fused-MoE kernel pair in Triton.

At decode a step holds B tokens, S = B*k (token, slot) pairs, and the layer's cost is reading the
weights of the experts the pairs touch, plus one launch per kernel (a CUDA graph replays them,
but each still costs microseconds). Sorting pairs, computing offsets and running grouped GEMMs
sized for thousands of rows spends more time around the weights than on them. Here:

    gate_up, program (expert e, block of I):  h_p = w_p * silu(x_p G_e^T) * (x_p U_e^T)
    down_add, program (block of H):           y_t += sum over t's experts e of h_(t, e) D_e^T

gate_up reads its block of e's weights once and multiplies it by all S pair rows at once (rows of
other experts are masked off: S <= 128, so the wasted arithmetic is free next to the weight
read); a program whose expert no pair chose returns before loading anything. down_add walks the
experts the batch chose, skipping the others unread, and sums each token's experts in fp32
before one rounding and the add into y (the decode engine passes the residual stream as y, the
experts implementation a zeroed buffer). No sort, no offsets, no host synchronisation: the whole
step can be captured in a CUDA graph. Pairs are addressed in their original (token, slot)
order, so no permutation is undone afterwards. At one or two tokens down_add multiplies and sums
instead of using tl.dot (whose 16-row minimum would make each program own 16 outputs), so more,
narrower programs share the weight read; block sizes from bench/tune_moe_decode.py.

The routing weight is applied to the intermediate, as in `sparsify.experts.grouped`.
"""

from __future__ import annotations

from functools import cache

import torch

from sparsify.experts.swiglu_kernel import triton_available

MAX_PAIRS = 128  # above this (prefill, training) the sorted grouped path runs instead


def available(x: torch.Tensor) -> bool:
    """A GPU tensor in bf16 / fp16 and Triton to compile for it: what every Triton kernel here and
    in the decode engine needs."""
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

    return gate_up_swiglu, down_add


BLOCK_N, BLOCK_K = 32, 128  # gate_up
DOWN_BLOCK_N, DOWN_BLOCK_K = 16, 256  # 16 tokens or more (tl.dot)
FEW_TOKENS, FEW_BLOCK_N, FEW_BLOCK_K = 2, 8, 512  # up to FEW_TOKENS tokens: more, narrower programs (bench/tune_moe_decode.py)


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


def few_token_experts(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """x (T, H), top_k_index / weights (T, k), T*k <= MAX_PAIRS; gate_up_proj (E, 2I, H), down_proj
    (E, H, I), contiguous. Returns (T, H). No autograd: inference only."""
    experts = top_k_index.to(torch.int32)
    intermediate = gate_up_intermediate(gate_up_proj, x.contiguous(), experts.view(-1), weights.reshape(-1))
    out = torch.zeros_like(x)
    down_add(intermediate, down_proj, experts, out)
    return out
