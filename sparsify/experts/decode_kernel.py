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
order, so no permutation is undone afterwards.

At one or two tokens (batch-1 decode, the case that decides whether a sparse model is faster) a
16-row tl.dot wastes most of its tile and serialises the experts, so the pair kernels run instead:
gate_up_pair is one matrix-vector program per (pair, block of I), and down_add_pairs loads the
block of every pair's expert in one gather so the k expert reads are in flight together.
Block sizes and warps from bench/tune_moe_decode.py.

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
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
                    acc = tl.dot(h, tl.trans(d), acc)
        dtype = hidden_ptr.dtype.element_ty
        where = hidden_ptr + t[:, None] * HIDDEN + n[None, :]
        ok = t_ok[:, None] & n_ok[None, :]
        residual = tl.load(where, mask=ok, other=0.0).to(tl.float32)
        tl.store(where, (residual + acc.to(dtype).to(tl.float32)).to(dtype), mask=ok)

    @triton.jit
    def gate_up_pair(x_ptr, w_ptr, pair_expert_ptr, pair_weight_ptr, out_ptr, top_k: tl.constexpr, hidden: tl.constexpr,
                     width: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # A few tokens: one program per (pair, block of I), a matrix-vector product. Products are
        # summed along K in registers and reduced once at the end.
        pair = tl.program_id(0)
        block = tl.program_id(1)
        expert = tl.load(pair_expert_ptr + pair).to(tl.int64)
        token = pair // top_k
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < width
        gate_rows = w_ptr + expert * 2 * width * hidden + n[:, None] * hidden
        up_rows = gate_rows + width * hidden
        gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < hidden
            x = tl.load(x_ptr + token * hidden + k, mask=k_ok, other=0.0).to(tl.float32)
            ok = n_ok[:, None] & k_ok[None, :]
            gate += tl.load(gate_rows + k[None, :], mask=ok, other=0.0).to(tl.float32) * x[None, :]
            up += tl.load(up_rows + k[None, :], mask=ok, other=0.0).to(tl.float32) * x[None, :]
        g = tl.sum(gate, axis=1)
        h = g * tl.sigmoid(g) * tl.sum(up, axis=1) * tl.load(pair_weight_ptr + pair).to(tl.float32)
        tl.store(out_ptr + pair * width + n, h.to(out_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def down_add_pairs(h_ptr, w_ptr, pair_expert_ptr, hidden_ptr, pairs, HIDDEN: tl.constexpr, WIDTH: tl.constexpr,
                       TOP_K: tl.constexpr, PAIRS: tl.constexpr, TOKENS: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        # A few tokens: each program loads its block of every pair's expert at once (a gather over
        # pairs), so the reads of the k experts are in flight together rather than one after another.
        block = tl.program_id(0)
        p = tl.arange(0, PAIRS)
        p_ok = p < pairs
        expert = tl.load(pair_expert_ptr + p, mask=p_ok, other=0).to(tl.int64)
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < HIDDEN
        rows = w_ptr + expert[:, None, None] * HIDDEN * WIDTH + n[None, :, None] * WIDTH  # D_e is (H, I)
        acc = tl.zeros((PAIRS, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, WIDTH, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < WIDTH
            h = tl.load(h_ptr + p[:, None] * WIDTH + k[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            d = tl.load(rows + k[None, None, :], mask=p_ok[:, None, None] & n_ok[None, :, None] & k_ok[None, None, :], other=0.0)
            acc += tl.sum(h[:, None, :] * d.to(tl.float32), axis=2)
        dtype = hidden_ptr.dtype.element_ty
        token = p // TOP_K
        for t in tl.static_range(TOKENS):  # TOKENS is the exact token count
            y = tl.sum(tl.where((token == t)[:, None], acc, 0.0), axis=0)  # t's experts, summed in fp32
            residual = tl.load(hidden_ptr + t * HIDDEN + n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(hidden_ptr + t * HIDDEN + n, (residual + y.to(dtype).to(tl.float32)).to(dtype), mask=n_ok)

    return gate_up_swiglu, down_add, gate_up_pair, down_add_pairs


BLOCK_N, BLOCK_K = 32, 128  # gate_up, tl.dot over the pairs
DOWN_BLOCK_N, DOWN_BLOCK_K = 16, 256  # down_add, tl.dot over the tokens
# Up to FEW_TOKENS tokens: one matrix-vector program per pair and block (gate_up), every pair's
# expert gathered at once (down). Block sizes and warps from bench/tune_moe_decode.py.
FEW_TOKENS = 2
PAIR_BLOCK_N, PAIR_BLOCK_K, PAIR_WARPS = 8, 256, 8
PAIRS_DOWN_BLOCK_N, PAIRS_DOWN_BLOCK_K, PAIRS_DOWN_WARPS = 8, 256, 8


def gate_up_intermediate(gate_up_proj: torch.Tensor, x: torch.Tensor, experts_of_pairs: torch.Tensor,
                         pair_weights: torch.Tensor) -> torch.Tensor:
    """Kernel 1 alone: x (T, H); experts_of_pairs (T*k,) int32 and pair_weights (T*k,) in (token,
    slot) order -> the weighted SwiGLU intermediate (T*k, I), same order."""
    import triton

    gate_up_swiglu, _, gate_up_pair, _ = _kernels()
    tokens, hidden = x.shape
    pairs = experts_of_pairs.numel()
    count, double_width, _ = gate_up_proj.shape
    width = double_width // 2
    intermediate = torch.empty(pairs, width, dtype=x.dtype, device=x.device)
    if tokens <= FEW_TOKENS:
        gate_up_pair[(pairs, triton.cdiv(width, PAIR_BLOCK_N))](x, gate_up_proj, experts_of_pairs, pair_weights, intermediate,
                                                                pairs // tokens, hidden, width, BLOCK_N=PAIR_BLOCK_N,
                                                                BLOCK_K=PAIR_BLOCK_K, num_warps=PAIR_WARPS)
    else:
        gate_up_swiglu[(count, triton.cdiv(width, BLOCK_N))](x, gate_up_proj, experts_of_pairs, pair_weights, intermediate, pairs,
                                                             pairs // tokens, hidden, width, PAIRS=max(16, triton.next_power_of_2(pairs)),
                                                             BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return intermediate


def down_add(intermediate: torch.Tensor, down_proj: torch.Tensor, experts: torch.Tensor, hidden: torch.Tensor) -> None:
    """hidden (T, H) += sum over each token's k experts of intermediate[pair] @ down_proj[e]^T, in
    place; intermediate (T*k, I) in (token, slot) order, experts (T, k) int32."""
    import triton

    _, kernel, _, few_kernel = _kernels()
    tokens, width = hidden.shape
    top_k = experts.shape[1]
    count, _, inner = down_proj.shape
    if tokens <= FEW_TOKENS:
        pairs = tokens * top_k
        few_kernel[(triton.cdiv(width, PAIRS_DOWN_BLOCK_N),)](intermediate, down_proj, experts, hidden, pairs, HIDDEN=width,
                                                               WIDTH=inner, TOP_K=top_k, PAIRS=max(2, triton.next_power_of_2(pairs)),
                                                               TOKENS=tokens, BLOCK_N=PAIRS_DOWN_BLOCK_N, BLOCK_K=PAIRS_DOWN_BLOCK_K,
                                                               num_warps=PAIRS_DOWN_WARPS)
        return
    kernel[(triton.cdiv(width, DOWN_BLOCK_N),)](intermediate, down_proj, experts, hidden, tokens, HIDDEN=width, WIDTH=inner,
                                                EXPERTS=count, TOP_K=top_k, TOKENS=max(16, triton.next_power_of_2(tokens)),
                                                BLOCK_SLOTS=max(2, triton.next_power_of_2(top_k)), BLOCK_N=DOWN_BLOCK_N,
                                                BLOCK_K=DOWN_BLOCK_K)


def few_token_experts(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """x (T, H), top_k_index / weights (T, k), T*k <= MAX_PAIRS; gate_up_proj (E, 2I, H), down_proj
    (E, H, I), contiguous. Returns (T, H). No autograd: inference only."""
    experts = top_k_index.to(torch.int32)
    intermediate = gate_up_intermediate(gate_up_proj, x.contiguous(), experts.view(-1), weights.reshape(-1))
    out = torch.zeros_like(x)
    down_add(intermediate, down_proj, experts, out)
    return out
