"""Triton kernels for the decode step's attention sublayer and the dense FFN's activation
(sparsify/engine/graph_decode.py).

At batch 1 a decode step is bound by kernel count, not bytes (bench/profile_decode_step.py: the
dense Llama-1B step ran ~490 kernels, 30 per layer, at a third of HBM bandwidth). Between its
projections the attention sublayer spent about a dozen small kernels: rotary embedding of the
queries and of the keys (multiplies, a negation, a concatenation, an add each), per-head q/k norms
in Qwen3, two cache writes. `rope_and_cache` is one kernel for all of it:

    program (sequence, head):  query head -> norm?, rotate, write the query buffer
                               KV head    -> norm?, rotate the key, write key and value at the step's slot

reading the position from the device (no host synchronisation, so the graph replays it at every
step). `silu_mul` is transformers' act(gate) * up in one kernel instead of two.

Rounding follows transformers' modules operation by operation (each product and sum rounded to
the activations' dtype), so the engine decodes as the model's own forward does.
"""

from __future__ import annotations

from functools import cache

import torch


@cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_and_cache(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, position_ptr, query_out_ptr, keys_ptr, values_ptr,
                       q_norm_ptr, k_norm_ptr, eps, max_len, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                       HEAD_DIM: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr):
        sequence = tl.program_id(0)
        head = tl.program_id(1)
        dtype = query_out_ptr.dtype.element_ty
        half = tl.arange(0, HALF)
        ok = half < HEAD_DIM // 2
        position = tl.load(position_ptr)
        cos1 = tl.load(cos_ptr + position * HEAD_DIM + half, mask=ok, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + position * HEAD_DIM + HEAD_DIM // 2 + half, mask=ok, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + position * HEAD_DIM + half, mask=ok, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + position * HEAD_DIM + HEAD_DIM // 2 + half, mask=ok, other=0.0).to(tl.float32)
        is_query = head < HEADS
        kv_head = head - HEADS
        if is_query:
            source = q_ptr + (sequence * HEADS + head) * HEAD_DIM
            norm_ptr = q_norm_ptr
        else:
            source = k_ptr + (sequence * KV_HEADS + kv_head) * HEAD_DIM
            norm_ptr = k_norm_ptr
        x1 = tl.load(source + half, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(source + HEAD_DIM // 2 + half, mask=ok, other=0.0).to(tl.float32)
        if QK_NORM:  # Qwen3: RMSNorm over the head before the rotation
            squares = tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)
            scale = 1.0 / tl.sqrt(squares / HEAD_DIM + eps)
            w1 = tl.load(norm_ptr + half, mask=ok, other=0.0).to(tl.float32)
            w2 = tl.load(norm_ptr + HEAD_DIM // 2 + half, mask=ok, other=0.0).to(tl.float32)
            x1 = (w1 * (x1 * scale).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            x2 = (w2 * (x2 * scale).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), each operation rounded
        out1 = ((x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)).to(dtype)
        out2 = ((x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)).to(dtype)
        if is_query:
            target = query_out_ptr + (sequence * HEADS + head) * HEAD_DIM
        else:
            target = keys_ptr + ((sequence * KV_HEADS + kv_head) * max_len + position) * HEAD_DIM
            value = v_ptr + (sequence * KV_HEADS + kv_head) * HEAD_DIM
            value_target = values_ptr + ((sequence * KV_HEADS + kv_head) * max_len + position) * HEAD_DIM
            tl.store(value_target + half, tl.load(value + half, mask=ok), mask=ok)
            tl.store(value_target + HEAD_DIM // 2 + half, tl.load(value + HEAD_DIM // 2 + half, mask=ok), mask=ok)
        tl.store(target + half, out1, mask=ok)
        tl.store(target + HEAD_DIM // 2 + half, out2, mask=ok)

    @triton.jit
    def silu_mul(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        dtype = out_ptr.dtype.element_ty
        gate = tl.load(gate_ptr + i, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + i, mask=ok, other=0.0).to(tl.float32)
        activated = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        tl.store(out_ptr + i, (activated * up).to(dtype), mask=ok)

    return rope_and_cache, silu_mul


def rope_and_cache(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                   position: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, q_norm: torch.nn.Module | None,
                   k_norm: torch.nn.Module | None) -> torch.Tensor:
    """queries (B, 1, heads*d), keys / values (B, 1, kv_heads*d): the projections of one step;
    cos/sin tables (max_len, d); position (1,) on the device; caches (B, kv_heads, max_len, d).
    Writes the rotated key and the value at `position`, returns the rotated queries (B, heads, 1, d)."""
    import triton

    kernel, _ = _kernels()
    batch, kv_heads, max_len, head_dim = key_cache.shape
    heads = queries.shape[-1] // head_dim
    out = torch.empty(batch, heads, 1, head_dim, dtype=queries.dtype, device=queries.device)
    norms = q_norm is not None
    kernel[(batch, heads + kv_heads)](queries, keys, values, cos_table, sin_table, position, out, key_cache, value_cache,
                                      q_norm.weight if norms else queries, k_norm.weight if norms else queries,
                                      q_norm.variance_epsilon if norms else 0.0, max_len, HEADS=heads, KV_HEADS=kv_heads,
                                      HEAD_DIM=head_dim, HALF=triton.next_power_of_2(head_dim // 2), QK_NORM=norms, num_warps=1)
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    import triton

    _, kernel = _kernels()
    out = torch.empty_like(gate)
    block = 1024
    kernel[(triton.cdiv(gate.numel(), block),)](gate, up, out, gate.numel(), BLOCK=block)
    return out
